"""generate / stream / decode_step: greedy == a naive uncached loop, EOS bookkeeping, seeds,
buckets, gradients, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, decode_step, generate, init_state, loop, prefill, stream
from arjax.model import Transformer, get_config, init_cache

CONFIGS = {
    "tiny": get_config("tiny"),
    "llama-style": get_config("tiny").replace(
        pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, use_bias=False, tie_embeddings=False
    ),
}
# Every generate call below fits one bucket (prompt width 16, 16 output slots), so each file run
# compiles the loop once per model.
PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12]]
N = 8


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny():
    return Transformer(CONFIGS["tiny"], rngs=nnx.Rngs(1))


def _naive_greedy(model, prompts, n):
    """Re-run the full forward pass without a cache for every new token; returns tokens, logprobs."""
    graphdef, params = nnx.split(model)
    width = max(map(len, prompts)) + n
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])  # [B, width, V]
    seqs = [list(p) for p in prompts]
    logprobs = [[] for _ in prompts]
    for _ in range(n):
        batch = np.zeros((len(seqs), width), np.int32)  # right-padded: causality hides the padding
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = s
        logits = np.asarray(forward(params, batch))
        for i, s in enumerate(seqs):
            row = logits[i, len(s) - 1]
            s.append(int(np.argmax(row)))
            logprobs[i].append(float(jax.nn.log_softmax(row)[s[-1]]))
    return np.array([s[len(p) :] for s, p in zip(seqs, prompts)]), np.array(logprobs)


def test_greedy_generate_equals_a_naive_uncached_loop(model):
    out = generate(model, PROMPTS, max_new_tokens=N)
    want_tokens, want_logprobs = _naive_greedy(model, PROMPTS, N)
    np.testing.assert_array_equal(out.tokens, want_tokens)
    np.testing.assert_allclose(out.logprobs, want_logprobs, atol=1e-4)
    assert out.tokens.shape == (3, N) and out.lengths.tolist() == [N] * 3
    assert out.stop_reason.tolist() == ["length"] * 3 and out.num_steps == N


def test_eos_stops_each_row_pads_the_rest_and_exits_early(tiny):
    free = generate(tiny, PROMPTS, max_new_tokens=N).tokens
    # Stop row 0 at its 2nd token and row 2 at its 4th, on two different EOS ids; row 1 only
    # stops if it happens to emit one of them.
    eos = [int(free[0, 1]), int(free[2, 3])]
    out = generate(tiny, PROMPTS, max_new_tokens=N, eos_ids=eos, pad_id=0)
    for i in range(3):
        hits = [j for j in range(N) if free[i, j] in eos]
        want_len = hits[0] + 1 if hits else N
        assert out.lengths[i] == want_len
        assert out.stop_reason[i] == ("eos" if hits else "length")
        np.testing.assert_array_equal(out.tokens[i, :want_len], free[i, :want_len])
        assert (out.tokens[i, want_len:] == 0).all() and (out.logprobs[i, want_len:] == 0).all()
    assert out.lengths[0] <= 2 and out.lengths[2] <= 4

    # When every row stops, the loop exits: fewer steps than max_new_tokens.
    eos_all = sorted({int(free[i, 1]) for i in range(3)})
    out = generate(tiny, PROMPTS, max_new_tokens=N, eos_ids=eos_all, pad_id=7)
    assert (out.stop_reason == "eos").all() and out.lengths.max() <= 2
    assert out.num_steps == out.lengths.max() < N
    assert all((out.tokens[i, out.lengths[i] :] == 7).all() for i in range(3))


def test_sampling_is_reproducible_and_stream_matches_generate(tiny):
    sampling = SamplingParams.make(3, temperature=[1.0, 0.8, 0.0], top_k=[0, 20, 0], top_p=[0.95, 1.0, 1.0])
    a = generate(tiny, PROMPTS, max_new_tokens=N, sampling=sampling, seed=3)
    b = generate(tiny, PROMPTS, max_new_tokens=N, sampling=sampling, seed=3)
    c = generate(tiny, PROMPTS, max_new_tokens=N, sampling=sampling, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens[:2] != c.tokens[:2]).any()  # a random model over 256 ids: a new seed differs
    np.testing.assert_array_equal(a.tokens[2], c.tokens[2])  # the greedy row ignores the seed

    eos = [int(a.tokens[1, 4])]
    want = generate(tiny, PROMPTS, max_new_tokens=N, sampling=sampling, seed=3, eos_ids=eos)
    it = stream(tiny, PROMPTS, max_new_tokens=N, sampling=sampling, seed=3, eos_ids=eos, chunk_steps=3)
    chunks = []
    while True:
        try:
            chunks.append(next(it))
        except StopIteration as stop:
            final = stop.value
            break
    assert len(chunks) == -(-want.num_steps // 3)
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([c[i] for c in chunks]), want.tokens[i, : want.lengths[i]])
    np.testing.assert_array_equal(final.tokens, want.tokens)
    np.testing.assert_array_equal(final.stop_reason, want.stop_reason)


def test_no_recompile_within_a_bucket_or_for_new_settings(tiny):
    generate(tiny, PROMPTS, max_new_tokens=N)
    before = loop.TRACE_COUNTS["start"]
    generate(tiny, [[1, 2], [3], [4, 5, 6, 7, 8]], max_new_tokens=N - 3, seed=9, eos_ids=[1, 2, 3])
    sampling = SamplingParams.make(3, temperature=0.3, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.3)
    generate(tiny, [[1] * 16, [2], [3]], max_new_tokens=N + 8, sampling=sampling, eos_ids=4)
    generate(tiny, np.array([[1, 2], [3, 4], [5, 6]]), max_new_tokens=1)  # a [B, P] array works too
    assert loop.TRACE_COUNTS["start"] == before
    generate(tiny, [[1] * 17, [2], [3]], max_new_tokens=N)  # a longer bucket: the counter does move
    assert loop.TRACE_COUNTS["start"] == before + 1


def test_cache_is_sized_to_the_call():
    cfg = CONFIGS["tiny"]
    # _plan only reads model.cfg: a stand-in avoids building weights.
    fake = type("M", (), {"cfg": cfg})()
    plan = loop._plan(
        fake,
        [[1, 2, 3]],
        max_new_tokens=10,
        sampling=None,
        eos_ids=(),
        pad_id=0,
        max_len=None,
        buckets=loop.DEFAULT_BUCKETS,
    )
    assert (plan.tokens.shape[1], plan.num_slots, plan.cache_len) == (16, 16, 32)
    plan = loop._plan(
        fake,
        [[1] * 40],
        max_new_tokens=20,
        sampling=None,
        eos_ids=(),
        pad_id=0,
        max_len=None,
        buckets=loop.DEFAULT_BUCKETS,
    )
    assert plan.cache_len == cfg.max_len and plan.tokens.shape[1] == cfg.max_len - 20  # capped: prompt width shrinks
    assert plan.positions[0, -1] == 39 and (plan.positions[0, :4] == -1).all()


def test_gradients_flow_through_decode_step_under_scan():
    # One small layer: compiling a backward pass is the cost here, not running it.
    small = Transformer(get_config("tiny", n_layers=1, d_model=16, vocab_size=64, max_len=16), rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(small)
    tokens = jnp.asarray([[0, 3, 4, 5], [6, 7, 8, 9]], jnp.int32)
    positions = jnp.asarray([[-1, 0, 1, 2], [0, 1, 2, 3]], jnp.int32)
    sampling = SamplingParams.make(2, temperature=1.0, top_k=10)

    def total_logprob(params):
        m = nnx.merge(graphdef, params)
        logits, cache = prefill(m, tokens, positions, init_cache(m.cfg, 2, 8))
        state = init_state(logits, cache, tokens, positions, num_slots=3, rng=jax.random.key(0))
        state, _ = jax.lax.scan(lambda s, _: (decode_step(m, s, sampling), None), state, None, length=3)
        return state.logprobs.sum()

    grads = jax.jit(jax.grad(total_logprob))(params)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, r"prompts must be a non-empty list"),
        ([[1, 2], []], {}, r"prompt 1 is empty"),
        ([[1, 2], [3, 256]], {}, r"prompt 1 has token id 256 outside \[0, 256\)"),
        ([[-1]], {}, r"prompt 0 has token id -1"),
        ([[1.5]], {}, r"prompt 0 holds float64 values"),
        (
            [[1] * 60],
            dict(max_new_tokens=10),
            r"longest prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds the cache length 64"
            r".*lower max_new_tokens to <= 4",
        ),
        ([[1] * 10], dict(max_new_tokens=10, max_len=16), r"= 20 exceeds the cache length 16"),
        ([[1]], dict(max_len=100), r"max_len=100 exceeds the model's max_len=64"),
        ([[1] * 60], dict(max_new_tokens=10, rope=True), r"= 70 exceeds the cache length 64.*or pass max_len=70"),
        ([[1]], dict(max_new_tokens=0), r"max_new_tokens=0 must be an int >= 1"),
        ([[1]], dict(eos_ids=[300]), r"eos id 300 is outside \[0, 256\)"),
        ([[1]], dict(pad_id=-1), r"pad_id=-1 must be a token id"),
        (
            [[1], [2]],
            dict(sampling=SamplingParams.make(3)),
            r"SamplingParams.temperature has shape \(3,\), expected \(2,\)",
        ),
        (
            [[1]],
            dict(sampling=SamplingParams.make(1, top_k=300)),
            r"top_k=300 \(row 0\) exceeds the vocabulary size 256",
        ),
        ([[1]], dict(chunk_steps=0), r"chunk_steps=0 must be an int >= 1"),
        ([[1]], dict(seed=1.5), r"seed=1.5 must be an int"),
        ("hello", {}, r"prompts must be a non-empty list of token-id lists, got str"),
    ],
)
def test_bad_input_raises_before_tracing(prompts, kwargs, match):
    kwargs = dict(kwargs)
    cfg = CONFIGS["llama-style" if kwargs.pop("rope", False) else "tiny"]
    fake = type("M", (), {"cfg": cfg})()  # errors come before the model is touched
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        stream(fake, prompts, **kwargs)
    if "chunk_steps" not in kwargs:
        with pytest.raises(ValueError, match=match):
            generate(fake, prompts, **kwargs)
