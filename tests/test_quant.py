"""int8 weights (arjax.model.quantize) and the int8 KV cache: error bounds, closeness to fp32, decoding, bad values."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.decode import PromptLookup, generate, loop
from arjax.model import Transformer, get_config, init_cache, quantize
from arjax.model.int8 import quantize_int8
from arjax.model.quant import QuantEmbed, QuantLinear
from arjax.train import cli
from arjax.train.tokenizer import ByteTokenizer

CONFIGS = {
    "tiny": get_config("tiny"),  # GPT-2 style: learned positions, biases, tied head
    "llama-style": get_config("tiny").replace(
        pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, use_bias=False, tie_embeddings=False
    ),
}
PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12]]
N = 16  # new tokens; every generate call here fits one bucket (prompt 16, 16 slots)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    model = Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0))
    return request.param, model, quantize(model)


def _forward(model, tokens):
    """The teacher-forced logits [B, T, V], jitted (one compile, not hundreds of eager ops)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)


def _paths(model):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def test_quantization_error_is_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (64, 48)) * jnp.linspace(0.01, 3.0, 48)  # [in, out], varied column scales
    w = w.at[:, 7].set(0.0)  # an all-zero output column
    q, scale = quantize_int8(w, axis=0)
    assert q.dtype == jnp.int8 and scale.shape == (48,) and scale.dtype == jnp.float32
    err = jnp.abs(w - q.astype(jnp.float32) * scale)
    assert bool(jnp.all(err <= scale / 2 * (1 + 1e-6)))
    assert float(scale[7]) == 0.0 and bool(jnp.all(q[:, 7] == 0))  # zeros stay exactly zero
    assert int(jnp.abs(q).max()) == 127 and bool(jnp.all(jnp.abs(q).max(axis=0)[jnp.arange(48) != 7] == 127))


def test_quantized_model_keeps_names_and_leaves_the_float_model_alone(pair):
    _, model, qmodel = pair
    assert _paths(qmodel) - _paths(model) == {
        p.replace("['kernel']", "['scale']") for p in _paths(model) if "kernel" in p
    } | {"['embed']['scale'].value"}
    assert isinstance(qmodel.blocks[0].attn.q, QuantLinear) and isinstance(qmodel.embed, QuantEmbed)
    assert qmodel.blocks[0].attn.q.kernel[...].dtype == jnp.int8 and qmodel.ln_f.scale[...].dtype == jnp.float32
    assert model.blocks[0].attn.q.kernel[...].dtype == jnp.float32 and isinstance(model.embed, nnx.Embed)
    # Every kernel dequantizes to within half a step of the float one.
    for lf, lq in [
        (model.blocks[1].mlp.down, qmodel.blocks[1].mlp.down),
        (model.blocks[0].attn.k, qmodel.blocks[0].attn.k),
    ]:
        deq = lq.kernel[...].astype(jnp.float32) * lq.scale[...]
        assert bool(jnp.all(jnp.abs(lf.kernel[...] - deq) <= lq.scale[...] / 2 * (1 + 1e-6)))


def test_int8_weights_logits_are_close_to_fp32(pair):
    """Tolerances for these random tiny models: max |logit change| < 2% of the logits' spread, KL < 1e-3."""
    name, model, qmodel = pair
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)
    ref, got = _forward(model, tokens), _forward(qmodel, tokens)
    assert float(jnp.abs(got - ref).max()) < 0.02 * float(ref.max() - ref.min())
    kl = jnp.sum(jax.nn.softmax(ref) * (jax.nn.log_softmax(ref) - jax.nn.log_softmax(got)), -1)
    assert float(kl.max()) < 1e-3
    agree = float(jnp.mean(ref.argmax(-1) == got.argmax(-1)))  # teacher-forced greedy agreement
    print(f"{name}: max |dlogit| {float(jnp.abs(got - ref).max()):.4f}, teacher-forced argmax agreement {agree:.3f}")
    assert agree >= 0.95


def test_int8_cache_holds_keys_and_values_within_half_a_step_and_decodes_like_the_full_pass():
    """Token-by-token decoding through an int8 cache vs the uncached fp32 pass (within 2e-3), and vs
    one prefill through an int8 cache (equal to 1e-5: a token's int8 entry depends on that token alone)."""
    cfg = CONFIGS["llama-style"]  # grouped-query heads, RoPE
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    B, T = 2, 10
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    step = jax.jit(lambda c, t, p: model(t, p, c))
    full = _forward(model, tokens)  # [B, T, V]
    _, fcache = step(init_cache(cfg, B, 16), tokens, positions)
    one_pass, qcache = step(init_cache(cfg, B, 16, "int8"), tokens, positions)
    assert qcache.k[0].dtype == jnp.int8 and qcache.k_scale[0].shape == (B, cfg.num_kv_heads, 16)
    assert fcache.k_scale is None  # a float cache has no scales
    # Layer 0's keys and values do not depend on the cache's precision, so they compare exactly.
    for x, q, s in [(fcache.k[0], qcache.k[0], qcache.k_scale[0]), (fcache.v[0], qcache.v[0], qcache.v_scale[0])]:
        deq = q.astype(jnp.float32) * s[..., None]
        assert bool(jnp.all(jnp.abs(x - deq) <= s[..., None] / 2 * (1 + 1e-6) + 1e-12))
        assert bool(jnp.all(s[:, :, T:] == 0)) and bool(jnp.all(q[:, :, T:] == 0))  # unwritten slots stay empty

    cache, stepwise = init_cache(cfg, B, 16, "int8"), []
    for t in range(T):
        logits, cache = step(cache, tokens[:, t : t + 1], positions[:, t : t + 1])
        stepwise.append(logits[:, 0])
    stepwise = jnp.stack(stepwise, axis=1)
    np.testing.assert_allclose(stepwise, full, atol=2e-3)
    np.testing.assert_allclose(stepwise, one_pass, atol=1e-5)


def test_greedy_decoding_int8_cache_equals_fp32_and_compiles_once():
    model = Transformer(CONFIGS["tiny"], rngs=nnx.Rngs(0))
    ref = generate(model, PROMPTS, max_new_tokens=N)
    before = loop.TRACE_COUNTS["start"]
    generate(model, [[1, 2]] * 3, max_new_tokens=N - 3, kv_cache_dtype=None)  # the float program, reused
    assert loop.TRACE_COUNTS["start"] == before
    out = generate(model, PROMPTS, max_new_tokens=N, kv_cache_dtype="int8")  # one program for the int8 cache
    differ = int((ref.tokens != out.tokens).sum())
    print(f"int8 cache: {differ} of {ref.tokens.size} greedy tokens differ from fp32")
    assert differ == 0
    generate(model, [[1, 2]] * 3, max_new_tokens=N - 1, kv_cache_dtype=jnp.int8)  # a new length in the bucket
    assert loop.TRACE_COUNTS["start"] == before + 1
    # The quantized model through the same jitted loop (split / merge), alone and with the int8 cache.
    qmodel = quantize(model)
    for kv in (None, "int8"):
        out = generate(qmodel, PROMPTS, max_new_tokens=N, kv_cache_dtype=kv)
        agree = float(np.mean(ref.tokens == out.tokens))
        print(f"int8 weights, {kv or 'fp32'} cache: greedy tokens equal to fp32 on {agree:.1%} of {ref.tokens.size}")
        assert agree >= 0.9


def test_bad_values_are_one_line_errors():
    model = Transformer(CONFIGS["tiny"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^quantize='int4' is not supported; use 'int8' or None$"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(model), "int8")
    with pytest.raises(TypeError, match="takes an arjax Transformer"):
        quantize(object(), "int8")
    assert quantize(model, None) is model
    for bad in ("int4", "int32", "fp8x", 3):
        with pytest.raises(ValueError, match=f"kv_cache_dtype={bad!r} is not supported; use 'int8'"):
            generate(model, PROMPTS, max_new_tokens=2, kv_cache_dtype=bad)
    # The int8 cache serves speculative decoding too: the same greedy tokens as plain decoding with it.
    plain = generate(model, PROMPTS, max_new_tokens=6, kv_cache_dtype="int8")
    spec = generate(model, PROMPTS, max_new_tokens=6, kv_cache_dtype="int8", draft=PromptLookup(ngram=2, k=2))
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    with pytest.raises(ValueError, match="cache dtype 'int32' is not supported"):
        init_cache(CONFIGS["tiny"], 1, 8, "int32")


def test_cli_flags_reach_the_model_and_the_cache(monkeypatch, capsys):
    from arjax.train.cli import generate as cli_generate

    model = Transformer(CONFIGS["tiny"], rngs=nnx.Rngs(0))
    monkeypatch.setattr(cli_generate, "load_from_flags", lambda args: (model, ByteTokenizer()))
    seen = {}

    def spy(m, prompts, **kw):  # records what the command passes; decoding itself is tested above
        seen.update(quantized=isinstance(m.embed, QuantEmbed), kv=kw["kv_cache_dtype"])
        yield [""]
        return SimpleNamespace(lengths=[0], stop_reason=["length"])

    monkeypatch.setattr(cli_generate, "stream_text", spy)
    argv = [
        "generate",
        "--ckpt",
        "x",
        "--prompt",
        "ab",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--quantize",
        "int8",
        "--kv-cache-dtype",
        "int8",
    ]
    assert cli.main(argv) == 0 and seen == {"quantized": True, "kv": "int8"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's own choice check: one line, exit status 2
        cli.main(["generate", "--ckpt", "x", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--quantize: invalid choice: 'int4'" in err and err.count("\n") == 1
