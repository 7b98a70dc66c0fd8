"""Speculative decoding: greedy output identical to plain decoding, sampling exactly the target's
distribution (and a wrong acceptance rule caught), the cache it leaves, compile counts, bad drafts."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, filter_logits, generate, speculative, stream
from arjax.decode import loop as decode_loop
from arjax.decode.speculative import DraftModel, PromptLookup, lookup_drafts
from arjax.model import Transformer, get_config

LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, use_bias=False)
# Mixed lengths; rows 0 and 2 repeat themselves (prompt lookup accepts there), rows 1 and 3 do not.
PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5], [6, 7, 8, 9, 10, 6, 7], [11]]


@pytest.fixture(scope="module")
def models():
    target = Transformer(get_config("tiny", **LLAMA), rngs=nnx.Rngs(0))
    other = Transformer(get_config("tiny", n_layers=1), rngs=nnx.Rngs(5))  # same vocabulary, unrelated weights
    return target, other


@pytest.mark.parametrize("name", ["self", "random", "lookup", "lookup_k1"])
def test_greedy_speculative_equals_plain_greedy(models, name):
    target, other = models
    # (The tests share programs: one bucket of max_new_tokens, the same drafters.)
    draft = {
        "self": DraftModel(target, k=4),
        "random": DraftModel(other, k=3),
        "lookup": PromptLookup(ngram=2, k=4),
        "lookup_k1": PromptLookup(ngram=1, k=1),
    }[name]
    ref = generate(target, PROMPTS, max_new_tokens=12)
    out = generate(target, PROMPTS, max_new_tokens=12, draft=draft)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    assert list(out.stop_reason) == list(ref.stop_reason)
    if name == "self":  # the target drafting for itself: everything accepted, k+1 tokens per pass
        assert out.acceptance_rate == 1.0 and out.num_steps == 3  # 1 + 3 x 5 >= 12
    if name == "random":
        assert out.acceptance_rate < 0.9


def test_eos_and_max_new_tokens_inside_a_block(models):
    target, _ = models
    ref = generate(target, PROMPTS, max_new_tokens=12)
    eos = int(ref.tokens[0, 5])  # a token the first row emits mid-way: it must end there
    for draft in (DraftModel(target, k=4), PromptLookup(ngram=2, k=4)):
        for max_new in (7, 12):  # 7: reached inside a block of k+1 = 5
            want = generate(target, PROMPTS, max_new_tokens=max_new, eos_ids=eos, pad_id=0)
            got = generate(target, PROMPTS, max_new_tokens=max_new, eos_ids=eos, pad_id=0, draft=draft)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.lengths, want.lengths)
            assert list(got.stop_reason) == list(want.stop_reason)
    assert "eos" in list(want.stop_reason) and "length" in list(want.stop_reason)


def test_streaming_and_sampling_values_do_not_recompile(models):
    target, _ = models
    draft = DraftModel(target, k=4)
    whole = generate(target, PROMPTS, max_new_tokens=12, draft=draft)
    it = stream(target, PROMPTS, max_new_tokens=12, draft=draft, chunk_steps=1)
    pieces = [[] for _ in PROMPTS]
    while True:
        try:
            for i, new in enumerate(next(it)):
                pieces[i].extend(new.tolist())
        except StopIteration as stop:
            final = stop.value
            break
    np.testing.assert_array_equal(final.tokens, whole.tokens)
    assert [len(p) for p in pieces] == list(whole.lengths)
    assert all(p == whole.tokens[i, : len(p)].tolist() for i, p in enumerate(pieces))
    before = dict(decode_loop.TRACE_COUNTS)
    # New prompt lengths in the same bucket, new sampling values, new seeds: no new program.
    generate(
        target,
        [[3, 4, 5], [1], [2, 2], [9, 8, 7, 6]],
        max_new_tokens=12,
        draft=draft,
        seed=3,
        sampling=SamplingParams.make(4, temperature=0.7, top_k=5, top_p=0.9),
    )
    generate(
        target, PROMPTS, max_new_tokens=9, draft=draft, sampling=SamplingParams.make(4, temperature=1.3, min_p=0.1)
    )
    assert decode_loop.TRACE_COUNTS["spec_start"] == before["spec_start"]
    generate(target, PROMPTS, max_new_tokens=12, draft=DraftModel(target, k=2))  # a new k: one new program
    assert decode_loop.TRACE_COUNTS["spec_start"] == before["spec_start"] + 1


def test_the_target_cache_holds_the_keys_and_values_of_plain_decoding(models):
    target, other = models
    plan = decode_loop._plan(
        target,
        PROMPTS,
        max_new_tokens=12,
        sampling=None,
        eos_ids=(),
        pad_id=0,
        max_len=None,
        buckets=decode_loop.DEFAULT_BUCKETS,
        extra_slots=3,
    )
    B = len(PROMPTS)
    g, p = nnx.split(target)
    dg, dp = nnx.split(other)
    args = (
        jnp.asarray(plan.tokens),
        jnp.asarray(plan.positions),
        jax.random.key(0),
        jnp.int32(12),
        SamplingParams.greedy(B),
        jnp.asarray(plan.eos_ids),
        jnp.int32(0),
        jnp.int32(12),
    )
    spec = decode_loop._spec_start(g, dg, plan.num_slots, plan.cache_len, 3, 0, p, dp, *args)
    plain = decode_loop._start(g, plan.num_slots, plan.cache_len, None, p, *args)
    np.testing.assert_array_equal(spec.tokens[:, :12], plain.tokens[:, :12])
    # Every emitted token but the last (still pending) is in the cache, at the slot plain decoding used.
    P = plan.tokens.shape[1]
    for b in range(B):
        valid = P + int(spec.lengths[b]) - 1  # slots [0, valid) hold the prompt (left-padded) and the output
        assert np.array_equal(np.asarray(spec.cache.pos[b, :valid]), np.asarray(plain.cache.pos[b, :valid]))
        for layer in range(target.cfg.n_layers):
            for name in ("k", "v"):
                a = np.asarray(getattr(spec.cache, name)[layer][b, :, :valid])
                c = np.asarray(getattr(plain.cache, name)[layer][b, :, :valid])
                np.testing.assert_allclose(a, c, atol=1e-5)


def test_prompt_lookup_drafts_continue_the_latest_earlier_ngram():
    history = jnp.asarray([[5, 6, 7, 8, 5, 6, 9, 5, 6, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    length = jnp.asarray([9, 4], jnp.int32)
    d = np.asarray(lookup_drafts(history, length, ngram=2, k=3))
    assert d[0].tolist() == [9, 5, 6]  # "5 6" last seen at 4..5, followed by 9 5 6
    assert d[1].tolist() == [4, 4, 4]  # no earlier "3 4", "4": the last token repeated


# ----------------------------------------------------------------------------- distribution


def _exact_joint(target, prompt, sampling, V):
    """P(t2, t3) under plain sampling: sum over t1 of P(t1) P(t2 | t1) P(t3 | t1, t2), filters included."""
    seqs = np.array([prompt + list(t) for t in itertools.product(range(V), repeat=3)], np.int32)  # [V^3, L+3]
    logits, _ = target(jnp.asarray(seqs))
    L = len(prompt)
    rows = jax.tree.map(lambda x: jnp.repeat(x[:1], len(seqs)), sampling)
    probs = []
    for j in range(3):  # the distribution of token j given the prompt and tokens before it
        seen = np.zeros((len(seqs), V), bool)
        for c in range(L + j):
            seen[np.arange(len(seqs)), seqs[:, c]] = True
        f = filter_logits(logits[:, L - 1 + j], rows, jnp.asarray(seen))
        probs.append(np.asarray(jax.nn.softmax(f, axis=-1))[np.arange(len(seqs)), seqs[:, L + j]])
    total = (probs[0] * probs[1] * probs[2]).reshape(V, V, V)
    return total.sum(axis=0)  # [V, V] over (t2, t3)


def _draws(target, draft, prompt, sampling, n, batch=8192):
    """Counts of (t2, t3) over n draws: the jitted program called directly with one plan, a new seed each time."""
    V = target.cfg.vocab_size
    plan = decode_loop._plan(
        target,
        [prompt] * batch,
        max_new_tokens=3,
        sampling=None,
        eos_ids=(),
        pad_id=0,
        max_len=None,
        buckets=(4,),
        extra_slots=draft.k,
    )  # small buckets: a small cache, fast
    (g, p), (dg, dp) = nnx.split(target), nnx.split(draft.model)
    rows = jax.tree.map(lambda x: jnp.repeat(x[:1], batch), sampling)
    counts = np.zeros((V, V))
    for seed in range(-(-n // batch)):
        state = decode_loop._spec_start(
            g,
            dg,
            plan.num_slots,
            plan.cache_len,
            draft.k,
            0,
            p,
            dp,
            jnp.asarray(plan.tokens),
            jnp.asarray(plan.positions),
            jax.random.key(seed),
            jnp.int32(3),
            rows,
            jnp.asarray(plan.eos_ids),
            jnp.int32(0),
            jnp.int32(3),
        )
        tokens = np.asarray(state.tokens)
        np.add.at(counts, (tokens[:, 1], tokens[:, 2]), 1)
    return counts


def _chi2(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 5  # pool the rare cells
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rest_e, rest_c = expected[~keep].sum(), counts[~keep].sum()
    if rest_e > 0:
        stat += (rest_c - rest_e) ** 2 / rest_e
    return stat, int(keep.sum())  # dof ~ cells - 1


@pytest.fixture(scope="module")
def small_vocab():
    cfg = get_config("tiny", vocab_size=6, n_layers=1, init_std=0.2, **LLAMA)
    target = Transformer(cfg, rngs=nnx.Rngs(1))
    draft = Transformer(cfg, rngs=nnx.Rngs(2))  # another distribution over the same vocabulary
    return target, draft


SETTINGS = {
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=1.0, top_k=3),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.2),
    "repetition_penalty": dict(temperature=1.0, repetition_penalty=2.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_speculative_sampling_preserves_the_targets_distribution(small_vocab, name):
    target, draft_model = small_vocab
    sampling = SamplingParams.make(1, **SETTINGS[name])
    prompt = [1, 2, 3]
    exact = _exact_joint(target, prompt, sampling, 6)
    counts = _draws(target, DraftModel(draft_model, k=2), prompt, sampling, 100_000)
    stat, cells = _chi2(counts, exact)
    assert cells >= 6, (name, cells)  # enough of the joint survives the filter for the test to mean something
    # chi-square with ~cells-1 degrees of freedom: 99.9th percentile < dof + 4.5 sqrt(2 dof)
    assert stat < (cells - 1) + 4.5 * np.sqrt(2 * (cells - 1)), (name, stat, cells)
    tv = 0.5 * np.abs(counts / counts.sum() - exact).sum()
    assert tv < 0.02, (name, tv)


@pytest.mark.slow
def test_a_wrong_acceptance_rule_is_caught(small_vocab, monkeypatch):
    """Accepting every draft (q's distribution, not p's): the same test must fail."""
    target, draft_model = small_vocab
    sampling = SamplingParams.make(1, temperature=1.0)
    prompt = [1, 2, 3]
    exact = _exact_joint(target, prompt, sampling, 6)
    monkeypatch.setattr(speculative, "accept_drafts", lambda u, p_d, q_d: jnp.ones_like(p_d, bool))
    jax.clear_caches()
    try:
        counts = _draws(target, DraftModel(draft_model, k=2), prompt, sampling, 40_000)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    stat, cells = _chi2(counts, exact)
    assert stat > 10 * cells, stat


def test_bad_drafts_are_one_line_errors(models):
    target, _ = models
    wrong_vocab = Transformer(get_config("tiny", vocab_size=300), rngs=nnx.Rngs(0))
    cases = [
        (DraftModel(target, k=0), r"draft k=0 must be an int in 1..64"),
        (PromptLookup(ngram=0), r"PromptLookup ngram=0 must be an int in 1..16"),
        (DraftModel(wrong_vocab, k=2), r"the draft model's vocabulary has 300 ids but the target's has 256"),
        ("model", r"draft must be DraftModel\(model, k=...\) or PromptLookup"),
    ]
    for draft, match in cases:
        with pytest.raises(ValueError, match=match):
            generate(target, PROMPTS, max_new_tokens=4, draft=draft)


def test_the_cli_refuses_a_draft_with_another_tokenizer(models, monkeypatch):
    import argparse

    from arjax.train import load as load_lib
    from arjax.train.cli import generate as cli_generate
    from arjax.train.tokenizer import ByteTokenizer, CharTokenizer

    target, _ = models
    byte, char = ByteTokenizer(), CharTokenizer(["a", "b", "c"])
    monkeypatch.setattr(load_lib, "load_model", lambda run: (target, char, None))
    args = argparse.Namespace(draft_ckpt="runs/draft", prompt_lookup=False, draft_k=2, ngram=3)
    with pytest.raises(ValueError, match=r"the draft in 'runs/draft' uses another tokenizer than the target"):
        cli_generate._draft_for(args, target, byte)
    monkeypatch.setattr(load_lib, "load_model", lambda run: (target, ByteTokenizer(), None))
    assert isinstance(cli_generate._draft_for(args, target, byte), DraftModel)


def test_the_cache_fits_every_block_near_a_learned_context():
    """Learned positions end at max_len: the speculative cache (prompt + max_new_tokens + k, shrinking
    the bucketed prompt width first) never lets a block write past its end; a draft's shorter
    context and a given max_len cap it too; what cannot fit is one clear error."""
    learned = Transformer(get_config("tiny"), rngs=nnx.Rngs(0))  # max_len 64
    short_draft = Transformer(get_config("tiny", n_layers=1, max_len=32), rngs=nnx.Rngs(1))
    plan = lambda model, prompts, new, k, cap=None, max_len=None: decode_loop._plan(
        model,
        prompts,
        max_new_tokens=new,
        sampling=None,
        eos_ids=(),
        pad_id=0,
        max_len=max_len,
        buckets=decode_loop.DEFAULT_BUCKETS,
        extra_slots=k,
        spec_cap=cap,
    )
    for prompts, new, k, cap, max_len in (
        ([list(range(1, 21))], 30, 4, 64, None),
        ([[1, 2, 3]], 10, 4, 32, None),
        ([[1, 2, 3] * 5], 40, 8, 64, None),
        ([[1, 2]], 10, 8, None, 24),
    ):
        p = plan(learned, prompts, new, k, cap, max_len)
        assert p.tokens.shape[1] + new + k <= p.cache_len <= min(c for c in (cap, max_len, 10**9) if c), (p.cache_len,)
    with pytest.raises(
        ValueError, match=r"longest prompt \(16 tokens\) \+ max_new_tokens \(45\) \+ k \(4\) = 65 cache slots"
    ):
        generate(learned, [[1, 2, 3] * 5 + [1]], max_new_tokens=45, draft=PromptLookup(ngram=2, k=4))
    ref = generate(learned, [list(range(1, 21)), [5]], max_new_tokens=30)
    out = generate(learned, [list(range(1, 21)), [5]], max_new_tokens=30, draft=PromptLookup(ngram=2, k=4))
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    rope = Transformer(get_config("tiny", **LLAMA), rngs=nnx.Rngs(0))
    out = generate(
        rope, [[1, 2, 3]], max_new_tokens=10, draft=DraftModel(short_draft, k=4)
    )  # the draft's 32 caps the cache
    np.testing.assert_array_equal(out.tokens, generate(rope, [[1, 2, 3]], max_new_tokens=10).tokens)
