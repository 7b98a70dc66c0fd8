"""Exposure-bias metrics: exact against brute-force enumeration, ExAccErr ~ 0 when the model is the oracle."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from arjax.model import ModelConfig, Transformer
from arjax.train.exposure.metrics import (
    Decoding,
    ModelScorer,
    accumulated_error,
    bootstrap_ci,
    evaluate,
    losses_along,
    mean_ci,
    policy_log_probs,
    repetition_rates,
)
from arjax.train.exposure.oracles import HMMOracle, TransformerOracle, make_dataset

L = 4  # generated tokens; vocabulary 3 -> 81 sequences, all enumerated


@pytest.fixture(scope="module")
def world():
    oracle = HMMOracle(vocab_size=3, n_states=2, seed=0, concentration=0.5)
    cfg = ModelConfig(vocab_size=3, max_len=8, n_layers=1, n_heads=1, d_model=8, init_std=0.5)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    seqs = np.array([[0, *x] for x in itertools.product(range(3), repeat=L)], np.int32)  # [81, 5]
    return oracle, ModelScorer(model), seqs


def _joint(log_probs, seqs):
    """Sequence probabilities by the chain rule: prod_t p(x_t | x_<t), [N]."""
    lp = np.asarray(log_probs, np.float64)[:, :-1]
    return np.exp(np.take_along_axis(lp, seqs[:, 1:, None], -1)[..., 0].sum(1))


def test_kl_and_nll_oracle_equal_brute_force_enumeration(world):
    oracle, scorer, seqs = world
    o = _joint(oracle.log_probs(seqs), seqs)
    m = _joint(jax.nn.log_softmax(scorer.logits(seqs), -1), seqs)
    assert abs(o.sum() - 1) < 1e-5 and abs(m.sum() - 1) < 1e-5

    anc = losses_along(oracle, scorer, seqs, Decoding(name="ancestral"))
    # Forward KL per token: sum_x o(x) log o(x)/m(x) / L, against the per-step full-distribution KLs.
    brute_fwd = (o * np.log(o / m)).sum() / L
    assert np.isclose(np.tensordot(o, anc["kl"], 1).mean(), brute_fwd, rtol=1e-4)
    brute_rev = (m * np.log(m / o)).sum() / L
    assert np.isclose(np.tensordot(m, anc["reverse_kl"], 1).mean(), brute_rev, rtol=1e-4)
    assert brute_fwd > 1e-3 and brute_rev > 1e-3  # the model really differs from the oracle

    # NLL-oracle of samples of a filtered decoder: sum_x m^F(x) (-log o(x)) / L.
    dec = Decoding(name="t0.7-k2", temperature=0.7, top_k=2)
    mf = _joint(policy_log_probs(scorer.logits(seqs), dec), seqs)
    assert abs(mf.sum() - 1) < 1e-5 and (mf == 0).any()  # top-2 of 3 removes sequences
    pol = losses_along(oracle, scorer, seqs, dec)
    brute_nll = (mf * -np.log(o)).sum() / L
    assert np.isclose(np.tensordot(mf, pol["oracle_nll"], 1).mean(), brute_nll, rtol=1e-4)


def test_greedy_accumulated_error_follows_the_greedy_path(world):
    """R(l) under greedy roll-in is the oracle NLL along the single greedy path, step by step."""
    oracle, scorer, seqs = world
    greedy = Decoding(name="greedy", temperature=0.0)
    w_model = _joint(policy_log_probs(scorer.logits(seqs), greedy), seqs)
    assert np.isclose(w_model.max(), 1.0)  # one path carries all the mass
    w_oracle = _joint(oracle.log_probs(seqs), seqs)
    loss = losses_along(oracle, scorer, seqs, greedy)["oracle_nll"]
    acc = accumulated_error(loss, loss, w_model=w_model, w_oracle=w_oracle)

    path = [0]
    for _ in range(L):
        path.append(int(np.argmax(np.asarray(scorer.logits(np.array([path])))[0, -1])))
    o_lp = np.asarray(oracle.log_probs(np.array([path])))[0]
    expected_R = np.cumsum([-o_lp[t, path[t + 1]] for t in range(L)])
    np.testing.assert_allclose(acc["R"], expected_R, rtol=1e-4)
    np.testing.assert_allclose(acc["ex_acc_err"], (acc["R"] / acc["l_eps"] - 1) * 100, rtol=1e-6)


def test_ex_acc_err_is_zero_when_the_model_is_the_oracle():
    cfg = ModelConfig(vocab_size=16, max_len=32, n_layers=1, n_heads=2, d_model=16)
    oracle = TransformerOracle.random(cfg, seed=0, init_std=0.4)
    # One batch shape (256 x 16) everywhere, so the decoder and scorers compile once.
    test = make_dataset(oracle, seed=1, n=256, length=16)
    decs = (Decoding(name="ancestral"), Decoding(name="greedy", temperature=0.0))
    res = evaluate(oracle.model, oracle, test, decs, n_rollouts=256, seed=0, n_boot=100)
    assert np.allclose(res["teacher_forced"]["kl"], 0.0, atol=1e-5)
    d = res["decodings"]["ancestral"]
    e = d["ex"]["oracle_nll"]
    ex, lo, hi = e["ex_acc_err"][-1], e["lo"][-1], e["hi"][-1]
    assert lo <= 0.0 <= hi and abs(ex) < 3.0, (ex, lo, hi)
    # Rao-Blackwellised and plain sample estimates of NLL-oracle agree, and equal the entropy rate.
    assert abs(d["nll_oracle"] - d["nll_oracle_sampled"]) < 0.05
    assert abs(d["nll_oracle"] - res["nll_test"]) < 0.05
    assert abs(d["reverse_kl_per_token"]) < 1e-5
    # The oracle decoded greedily has zero regret against itself at every context it visits.
    g = res["decodings"]["greedy"]
    assert np.allclose(g["free_running"]["regret"], 0.0, atol=1e-5) and g["nll_oracle"] < d["nll_oracle"]
    # Greedy is deterministic: the model's roll-in IS the oracle's greedy roll-in, so against the
    # oracle decoded alike there is exactly no excess error.
    np.testing.assert_allclose(g["ex_vs_oracle_decoded"]["oracle_nll"]["ex_acc_err"], 0.0, atol=1e-3)

    # A different model has a positive divergence and a finite excess error.
    other = Transformer(cfg.replace(init_std=0.4), rngs=nnx.Rngs(5))
    res2 = evaluate(other, oracle, test, (Decoding(name="greedy", temperature=0.0),), n_rollouts=256, n_boot=20)
    assert res2["forward_kl_per_token"] > 0.1
    g = res2["decodings"]["greedy"]
    assert np.isfinite(g["ex"]["kl"]["ex_acc_err"]).all() and np.all(np.asarray(g["eb_c"]["tv"]) > 0)


def test_policy_distribution_matches_the_decoder_filters():
    logits = np.array([[[2.0, 1.0, 0.5, -1.0]]], np.float32)  # [1, 1, 4]
    greedy = np.exp(np.asarray(policy_log_probs(logits, Decoding(name="g", temperature=0.0))))
    np.testing.assert_allclose(greedy[0, 0], [1, 0, 0, 0])
    k2 = np.exp(np.asarray(policy_log_probs(logits, Decoding(name="k", top_k=2))))[0, 0]
    np.testing.assert_allclose(k2, np.r_[np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum(), 0, 0], rtol=1e-5)
    p = np.exp(np.asarray(policy_log_probs(logits, Decoding(name="p", top_p=0.6))))[0, 0]
    assert p[0] == 1.0  # the top token alone holds > 60% of the mass
    with pytest.raises(ValueError, match="top_p=0"):
        Decoding(name="bad", top_p=0.0)


def test_bootstrap_ci_repetition_and_mean_ci():
    x = np.random.default_rng(0).normal(1.0, 1.0, size=(400, 1))
    est, lo, hi = bootstrap_ci(lambda a: a.mean(0), x, n_boot=300)
    assert lo[0] < 1.0 < hi[0] and hi[0] - lo[0] < 0.3
    m, half = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and np.isclose(half, 4.303 * 1.0 / np.sqrt(3), rtol=1e-3)
    r = repetition_rates(np.array([[1, 1, 1, 1], [1, 2, 1, 2]]), ns=(1,), windows=(4,))
    assert np.isclose(r["seq_rep_1"], (0.75 + 0.5) / 2)
    assert np.isclose(r["rep_4"], (3 / 3 + 2 / 3) / 2)
