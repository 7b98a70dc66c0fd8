"""Sampling filters: each filter's guarantee, hand examples, draw frequencies, validation, no recompiles."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.decode import SamplingParams, filter_logits, sample

V = 12


def _logits(b=4, seed=0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, V)).astype(np.float32) * scale)


def _kept(filtered):
    return np.isfinite(np.asarray(filtered))


DRAWS = 8000
ROWS = 4  # every call is padded to this many rows so that one compiled program serves all tests
_filter_jit = jax.jit(filter_logits)
_sample_jit = jax.jit(sample)


def _pad_rows(params: SamplingParams, logits, presence):
    b = logits.shape[0]
    idx = np.minimum(np.arange(ROWS), b - 1)
    presence = jnp.zeros(logits.shape, bool) if presence is None else presence
    return jax.tree.map(lambda a: a[idx], params), logits[idx], presence[idx]


def filt(logits, params, presence=None):
    """filter_logits, jitted once for [ROWS, V]."""
    p, l, pr = _pad_rows(params, logits, presence)
    return _filter_jit(l, p, pr)[: logits.shape[0]]


_draw_many_jit = jax.jit(jax.vmap(sample, in_axes=(0, None, None, None)))


def draw_many(key, logits, params, n=DRAWS):
    """[n, b] tokens: n independent draws for each row, one compiled program for every test."""
    p, l, pr = _pad_rows(params, logits, None)
    return np.asarray(_draw_many_jit(jax.random.split(key, n), l, p, pr))[:, : logits.shape[0]]


def draw(key, logits, params, presence=None):
    """sample, jitted once for [ROWS, V]."""
    p, l, pr = _pad_rows(params, logits, presence)
    return _sample_jit(key, l, p, pr)[: logits.shape[0]]


def test_temperature_zero_is_argmax_and_rows_are_independent():
    logits = _logits(4)
    params = SamplingParams.make(4, temperature=[0.0, 1.0, 0.0, 0.7], top_k=[0, 3, 5, 0])
    tokens = np.asarray(draw(jax.random.key(0), logits, params))
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    # A greedy row's distribution is a point mass on the argmax; a sampled row's filters are its own.
    kept = _kept(filt(logits, params))
    assert kept[0].sum() == 1 and kept[0, argmax[0]]
    assert kept[1].sum() == 3 and kept[3].sum() == V
    # Each row equals the same row filtered alone: no setting leaks across the batch.
    for i in range(4):
        alone = SamplingParams.make(
            1,
            **{
                f: np.asarray(getattr(params, f))[i : i + 1]
                for f in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
            },
        )
        np.testing.assert_array_equal(
            np.asarray(filt(logits[i : i + 1], alone))[0], np.asarray(filt(logits, params))[i]
        )


def test_top_k_keeps_exactly_the_k_best_and_ties_at_the_kth():
    logits = _logits(3, seed=1)
    params = SamplingParams.make(3, top_k=[1, 4, V])
    kept = _kept(filt(logits, params))
    for i, k in enumerate([1, 4, V]):
        best = set(np.argsort(-np.asarray(logits[i]))[:k])
        assert set(np.flatnonzero(kept[i])) == best
    tied = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0] + [-5.0] * (V - 6)])
    kept = _kept(filt(tied, SamplingParams.make(1, top_k=2)))
    assert np.flatnonzero(kept[0]).tolist() == [0, 1, 2, 3]  # as HF: everything >= the 2nd largest


def test_top_p_keeps_the_nucleus():
    # probs 0.5, 0.25, 0.125, 0.0625, ...: the nucleus for top_p=0.8 is the first three tokens
    # (0.875 >= 0.8; the token that crosses the threshold is kept).
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125] + [0.03125 / (V - 5)] * (V - 5))
    logits = jnp.asarray(np.log(probs)[None].astype(np.float32))
    kept = _kept(filt(logits, SamplingParams.make(1, top_p=0.8)))
    assert np.flatnonzero(kept[0]).tolist() == [0, 1, 2]
    kept = _kept(filt(logits, SamplingParams.make(1, top_p=0.01)))
    assert np.flatnonzero(kept[0]).tolist() == [0]  # the top token always survives
    # Exact ties across the boundary: like HF with a stable sort, the lowest ids are removed first.
    tied = jnp.asarray([[1.0, 1.0, 5.0, 1.0, 1.0] + [-30.0] * (V - 5)])
    u = float(jax.nn.softmax(tied[0])[0])  # each tied token's probability
    kept = _kept(filt(tied, SamplingParams.make(1, top_p=1 - 2.5 * u)))  # mass 2.5u may go: 2 ties
    assert np.flatnonzero(kept[0]).tolist() == [2, 3, 4]  # two of the four tied tokens survive
    # On random logits: the kept set is the smallest prefix of the descending order with mass >= top_p.
    logits = _logits(4, seed=2)
    top_p = np.array([0.3, 0.6, 0.9, 1.0], np.float32)
    kept = _kept(filt(logits, SamplingParams.make(4, top_p=top_p)))
    for i in range(4):
        p = np.asarray(jax.nn.softmax(logits[i]))
        order = np.argsort(-p)
        n = np.searchsorted(np.cumsum(p[order]), top_p[i] - 1e-6) + 1 if top_p[i] < 1 else V
        assert set(np.flatnonzero(kept[i])) == set(order[:n])
    # Sampling never leaves the nucleus.
    tokens = draw_many(jax.random.key(0), logits, SamplingParams.make(4, top_p=top_p))
    assert all(kept[i, tokens[:, i]].all() for i in range(4))


def test_min_p_hand_example():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * (V - 5)) + 1e-9
    logits = jnp.asarray(np.log(probs / probs.sum())[None].astype(np.float32))
    # threshold 0.3 * 0.4 = 0.12: keeps 0.4, 0.3, 0.15.
    assert np.flatnonzero(_kept(filt(logits, SamplingParams.make(1, min_p=0.3)))[0]).tolist() == [0, 1, 2]
    assert _kept(filt(logits, SamplingParams.make(1, min_p=0.0)))[0].all()


def test_repetition_penalty_hand_example():
    logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0] + [0.0] * (V - 4)])
    presence = jnp.asarray([[True, True, False, False] + [False] * (V - 4)])
    params = SamplingParams.make(1, temperature=1.0, repetition_penalty=2.0)
    out = np.asarray(filt(logits, params, presence))[0]
    np.testing.assert_array_equal(out[:4], [1.0, -4.0, 1.0, -1.0])  # seen: 2/2, -2*2; unseen untouched
    # Greedy decoding sees the penalty too (HF applies it as a processor, before warpers).
    greedy = SamplingParams.make(1, temperature=0.0, repetition_penalty=4.0)
    assert int(draw(jax.random.key(0), logits, greedy, presence)[0]) == 2  # 2/4 = 0.5 < 1.0


def test_filters_apply_in_hf_order_temperature_before_top_p():
    # Temperature sharpens first, so top-p at 0.9 keeps fewer tokens at a low temperature.
    logits = _logits(1, seed=3, scale=1.0)
    hot = _kept(filt(logits, SamplingParams.make(1, temperature=2.0, top_p=0.9))).sum()
    cold = _kept(filt(logits, SamplingParams.make(1, temperature=0.25, top_p=0.9))).sum()
    assert cold < hot


def test_draw_frequencies_match_the_filtered_distribution():
    stats = pytest.importorskip("scipy.stats")
    logits = _logits(1, seed=4, scale=1.0)
    params = SamplingParams.make(1, temperature=0.8, top_k=6, top_p=0.9)
    filtered = filt(logits, params)[0]
    p = np.asarray(jax.nn.softmax(filtered)).astype(np.float64)
    p /= p.sum()
    n = DRAWS
    counts = np.bincount(draw_many(jax.random.key(1), logits, params)[:, 0], minlength=V)
    assert counts[p == 0].sum() == 0
    support = p > 0
    _, pvalue = stats.chisquare(counts[support], n * p[support])
    assert pvalue > 1e-3, (counts, n * p)


def test_same_key_same_tokens_and_new_values_do_not_recompile():
    traces = collections.Counter()

    @jax.jit
    def draw(key, logits, params):
        traces["draw"] += 1
        return sample(key, logits, params)

    logits = _logits(4)
    a = draw(jax.random.key(5), logits, SamplingParams.make(4, temperature=1.0))
    b = draw(jax.random.key(5), logits, SamplingParams.make(4, temperature=1.0))
    np.testing.assert_array_equal(a, b)
    draw(
        jax.random.key(6),
        logits,
        SamplingParams.make(
            4, temperature=[0.0, 0.5, 1.5, 1.0], top_k=[0, 2, 3, 7], top_p=0.7, min_p=0.1, repetition_penalty=1.2
        ),
    )
    assert traces["draw"] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), r"temperature=-0.5 \(row 0\) must be a finite number >= 0"),
        (dict(temperature=[1.0, float("nan")]), r"temperature=nan must be a finite number"),
        (dict(temperature=float("inf")), r"temperature=inf must be a finite number"),
        (dict(top_k=2**32 + 5), r"top_k=4294967301 does not fit a int32"),
        (dict(top_k=-1), r"top_k=-1 .* must be >= 0"),
        (dict(top_k=V + 1, vocab_size=V), rf"top_k={V + 1} .*exceeds the vocabulary size {V}"),
        (dict(top_k=1.5), r"top_k=1.5 must be a whole number"),
        (dict(top_p=0.0), r"top_p=0.0 .* must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 .* must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p=-0.1.* must be in \[0, 1\]"),
        (dict(min_p=2.0), r"min_p=2.0 .* must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 .* must be a finite number > 0"),
        (dict(temperature=[1.0, 1.0, 1.0]), r"temperature has 3 values for 2 prompts"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.make(2, **kwargs)
