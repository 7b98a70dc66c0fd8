"""Oracles: exact conditionals against brute force, samples drawn from the distribution being scored, validity."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.model import ModelConfig
from arjax.train.exposure.oracles import DyckOracle, HMMOracle, TransformerOracle, entropy_rate, make_dataset


def _joint_log_prob(oracle, tokens):
    lp = np.asarray(oracle.log_probs(tokens))[:, :-1]  # [B, T-1, V]
    return np.take_along_axis(lp, np.asarray(tokens)[:, 1:, None], -1)[..., 0].sum(1)


def test_hmm_forward_filter_equals_sum_over_hidden_paths():
    h = HMMOracle(vocab_size=3, n_states=2, seed=3, concentration=0.5)
    pi, A, E = (np.asarray(a, np.float64) for a in (h.init_probs, h.trans, h.emit))
    seqs = np.array([[0, *x] for x in itertools.product(range(3), repeat=3)], np.int32)  # [27, 4]
    brute = []
    for x in seqs[:, 1:]:
        total = 0.0
        for path in itertools.product(range(2), repeat=3):
            p = pi[path[0]] * E[path[0], x[0]]
            for t in range(1, 3):
                p *= A[path[t - 1], path[t]] * E[path[t], x[t]]
            total += p
        brute.append(total)
    np.testing.assert_allclose(np.exp(_joint_log_prob(h, seqs)), brute, rtol=1e-4)
    assert abs(np.sum(brute) - 1.0) < 1e-6


@pytest.mark.parametrize("oracle", [HMMOracle(vocab_size=3, n_states=2, seed=0), DyckOracle(n_types=1, max_depth=2)])
def test_samples_follow_the_scored_distribution(oracle):
    """Empirical frequencies of (x1, x2) from `sample` match the joint that `log_probs` defines."""
    n = 4000
    x = np.asarray(oracle.sample(jax.random.key(0), n, 2))
    assert x.shape == (n, 3) and (x[:, 0] == oracle.bos_id).all()
    V = oracle.vocab_size
    seqs = np.array([[oracle.bos_id, a, b] for a in range(V) for b in range(V)], np.int32)
    exact = np.exp(_joint_log_prob(oracle, seqs))
    emp = np.array([np.mean((x[:, 1] == a) & (x[:, 2] == b)) for a in range(V) for b in range(V)])
    # 4000 draws: standard error <= 0.008 per cell.
    np.testing.assert_allclose(emp, exact, atol=0.03)


def test_log_probs_normalised_and_dataset_deterministic():
    h = HMMOracle(vocab_size=6, n_states=4, seed=1)
    a = make_dataset(h, seed=7, n=40, length=9, chunk=16)
    b = make_dataset(h, seed=7, n=40, length=9, chunk=16)
    c = make_dataset(h, seed=8, n=40, length=9, chunk=16)
    assert a.shape == (40, 10) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_allclose(np.exp(np.asarray(h.log_probs(a))).sum(-1), 1.0, atol=1e-5)
    assert 0.1 < entropy_rate(h, a) < np.log(6)


def test_dyck_validity_and_grammar():
    d = DyckOracle(n_types=2, max_depth=3)
    x = np.asarray(d.sample(jax.random.key(1), 64, 12))
    assert d.is_valid(x).all()
    # "( ]" closes the wrong type; a close at depth 0 is illegal; four opens exceed max_depth=3.
    bad = np.array([[0, 1, 4, 1, 3], [0, 3, 1, 3, 1], [0, 1, 1, 1, 1]], np.int32)
    good = np.array([[0, 1, 3, 2, 4], [0, 2, 4, 1, 1], [0, 1, 2, 4, 3]], np.int32)
    assert not d.is_valid(bad).any() and d.is_valid(good).all()
    p = np.exp(np.asarray(d.log_probs(np.array([[0, 1, 1, 2]]))))[0]  # depths 0, 1, 2, 3
    np.testing.assert_allclose(p[0], [0, 0.5, 0.5, 0, 0])  # depth 0: open only
    np.testing.assert_allclose(p[1], [0, 0.25, 0.25, 0.5, 0])  # close the "(" on top
    np.testing.assert_allclose(p[3], [0, 0, 0, 0, 1.0])  # max depth: must close "[" (id 4)
    noisy = DyckOracle(n_types=2, max_depth=3, noise=0.1)
    assert np.isfinite(np.asarray(noisy.log_probs(bad))).all()
    assert not noisy.is_valid(bad).any()


def test_bad_arguments_name_the_value():
    h = HMMOracle(vocab_size=4, n_states=2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        h.log_probs(np.array([[0, 5]]))
    with pytest.raises(ValueError, match="p_open"):
        DyckOracle(p_open=1.0)
    with pytest.raises(ValueError, match="length=0"):
        h.sample(jax.random.key(0), 2, 0)
    with pytest.raises(ValueError, match="temperature"):
        TransformerOracle.random(ModelConfig(vocab_size=8, max_len=8, n_layers=1, n_heads=1, d_model=8), temperature=0)


def test_transformer_oracle_is_a_tempered_model_and_samples_with_the_decoder():
    cfg = ModelConfig(vocab_size=8, max_len=16, n_layers=1, n_heads=2, d_model=16)
    o = TransformerOracle.random(cfg, seed=0, init_std=0.5, temperature=0.8)
    x = np.asarray(o.sample(jax.random.key(0), 2000, 2))
    assert x.shape == (2000, 3) and (x[:, 0] == 0).all()
    logits, _ = o.model(jnp.asarray(x[:1, :-1]))
    np.testing.assert_allclose(o.log_probs(x[:1, :-1]), jax.nn.log_softmax(logits / 0.8, -1), atol=1e-5)
    p1 = np.exp(np.asarray(o.log_probs(x[:1, :1])))[0, 0]
    emp = np.bincount(x[:, 1], minlength=8) / len(x)
    np.testing.assert_allclose(emp, p1, atol=0.04)  # 2000 draws: s.e. <= 0.011
    # Scaled-up init: far from uniform, yet not deterministic.
    assert 0.2 < entropy_rate(o, x) < 0.95 * np.log(8)
