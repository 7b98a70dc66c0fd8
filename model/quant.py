"""int8 for decoding: per-output-channel int8 weights (``quantize``) and the int8 KV cache's per-token scales.

Both use one symmetric rule, ``quantize_int8``: a scale per row, ``max|x| / 127`` over the reduced
axis, and ``q = round(x / scale)`` in [-127, 127], so ``|x - q * scale| <= scale / 2``.

- Weights: every ``nnx.Linear`` kernel [in, out] gets a scale per output column [out]; the token
  embedding [V, D] (the tied output head) a scale per vocabulary row [V]. Norms, biases and
  learned positions stay float. The matmul runs on the int8 values converted to the compute
  dtype and multiplies the scales onto its output (``(x @ q) * scale``, the same as
  ``x @ (q * scale)`` since the scale is per output column), so the fused q/k/v and gate/up
  matmul of ``transformer._fused_linear`` concatenates kernels and scales alike.
- KV cache: each written key and value vector (one token, one KV head, Dh values) gets its own
  scale, stored beside the cache as [B, Hkv, S] float32. A token's int8 entry depends on that
  token alone, so prefill in one pass, in chunks, or token by token all store the same cache (up
  to an entry that float rounding puts on the other side of a half step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.model.cache import write_slots

QUANTIZE_MODES = ("int8",)

# See int8_operands. bench/quant.py turns it off to measure what XLA's hoisting would do instead.
CONVERT_EACH_STEP = True


def check_quantize(mode) -> None:
    """None or 'int8'; anything else is a one-line error."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r} is not supported; use 'int8' or None")


def check_kv_cache_dtype(dtype) -> str | None:
    """None (the model's dtype), 'int8' or a float dtype ('float32', 'bfloat16', ...); returns its name."""
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name != "int8" and (name is None or not jnp.issubdtype(jnp.dtype(name), jnp.floating)):
        raise ValueError(
            f"kv_cache_dtype={dtype!r} is not supported; use 'int8', a float dtype ('float32', 'bfloat16') "
            "or None (the model's dtype)"
        )
    return name


@functools.partial(jax.jit, static_argnames="axis")
def quantize_int8(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one float32 scale per slice along ``axis`` (the axis reduced away).

    Returns ``(q int8 shaped like x, scale float32 shaped like x without axis)``. A slice of
    zeros gets scale 0 and dequantizes to zeros exactly.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
    q = jnp.clip(jnp.round(x / jnp.where(scale == 0, 1.0, scale)), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis)


def int8_operands(x: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, q)`` for a matmul with int8 weights q, with q's conversion to float tied to x.

    Inside the jitted decode loop the weights are loop-invariant, so XLA hoists ``q.astype(dtype)``
    out of the loop: a float copy of every weight for the whole call (the memory int8 is meant to
    save), and every step reads float weights again. An optimization barrier over (x, q) makes the
    conversion depend on each step's input, so each step reads the int8 weights and converts them
    on the fly: fused into the matmul on a GPU; a separate, slow pass on XLA:CPU (docs/benchmarks.md).
    """
    if not CONVERT_EACH_STEP:
        return x, q
    return jax.lax.optimization_barrier((x, q))


class QuantLinear(nnx.Module):
    """An ``nnx.Linear`` with an int8 kernel [in, out] and a float32 scale per output column [out].

    Same attribute names as ``nnx.Linear`` (``kernel``, ``bias``, ``dtype``, ``use_bias``,
    ``out_features``), so the parameter paths and ``_fused_linear`` work unchanged.
    """

    def __init__(self, linear: nnx.Linear):
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.use_bias, self.dtype = linear.use_bias, linear.dtype
        q, scale = quantize_int8(linear.kernel[...], axis=0)
        self.kernel = nnx.Param(q)  # [in, out] int8
        self.scale = nnx.Param(scale)  # [out] float32
        self.bias = nnx.Param(linear.bias[...]) if linear.use_bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x, kernel = int8_operands(x, self.kernel[...])
        y = (x.astype(dtype) @ kernel.astype(dtype)) * self.scale[...].astype(dtype)
        return y + self.bias[...].astype(dtype) if self.use_bias else y


class QuantEmbed(nnx.Module):
    """An ``nnx.Embed`` with an int8 table [V, D] and a float32 scale per row [V].

    The lookup dequantizes the rows it takes; as the tied output head, ``Transformer.logits``
    multiplies the scales onto the logits.
    """

    def __init__(self, embed: nnx.Embed):
        self.num_embeddings, self.features, self.dtype = embed.num_embeddings, embed.features, embed.dtype
        q, scale = quantize_int8(embed.embedding[...], axis=1)
        self.embedding = nnx.Param(q)  # [V, D] int8
        self.scale = nnx.Param(scale)  # [V] float32

    def __call__(self, tokens: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.float32
        rows = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [..., D]
        return rows * jnp.take(self.scale[...], tokens, axis=0)[..., None].astype(dtype)


def quantized_as(model) -> str | None:
    """'int8' for a model returned by ``quantize``, else None."""
    return "int8" if isinstance(getattr(model, "embed", None), QuantEmbed) else None


def quantize(model, mode: str | None = "int8"):
    """A copy of ``model`` (a ``Transformer``) for decoding with int8 weights; ``model`` is left as it is.

    Every linear layer (attention q/k/v/o, the MLP, an untied ``lm_head``) and the token embedding
    are quantized (see the module docstring); norms, biases and ``pos_embed`` are shared with the
    original as they are. The result is an ordinary ``Transformer``: ``generate``, ``stream`` and
    ``nnx.split`` / ``nnx.merge`` take it as they take the float model. It is for inference: train,
    checkpoint and convert the float model. ``mode=None`` returns ``model`` itself.
    """
    from arjax.model.transformer import Transformer

    check_quantize(mode)
    if not isinstance(model, Transformer):
        raise TypeError(f"quantize takes an arjax Transformer, got {type(model).__name__}")
    if mode is None:
        return model
    if quantized_as(model) is not None:
        raise ValueError(f"the model is already quantized ({quantized_as(model)}); quantize the float model")
    # A new module graph over the same arrays (nothing copied); the swaps below replace modules in it only.
    out = nnx.merge(*nnx.split(model))
    for block in out.blocks:
        for name in ("q", "k", "v", "o"):
            setattr(block.attn, name, QuantLinear(getattr(block.attn, name)))
        for name in ("gate", "up", "down"):
            if hasattr(block.mlp, name):
                setattr(block.mlp, name, QuantLinear(getattr(block.mlp, name)))
    if hasattr(out, "lm_head"):
        out.lm_head = QuantLinear(out.lm_head)
    out.embed = QuantEmbed(out.embed)
    return out


def write_int8(layer_cache, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, ...]:
    """Quantize this call's keys and values k, v [B, Hkv, T, Dh] into an int8 layer cache at slot ``index``.

    layer_cache: (k int8 [B, Hkv, S, Dh], v int8, k_scale float [B, Hkv, S], v_scale); returns the
    same, updated. ``index`` is one slot or one per row, as ``cache.write_slots`` takes it.
    """
    ck, cv, ks, vs = layer_cache
    kq, k_scale = quantize_int8(k, axis=-1)  # [B, Hkv, T, Dh], [B, Hkv, T]
    vq, v_scale = quantize_int8(v, axis=-1)
    return (
        write_slots(ck, kq, index, axis=2),
        write_slots(cv, vq, index, axis=2),
        write_slots(ks, k_scale.astype(ks.dtype), index, axis=2),
        write_slots(vs, v_scale.astype(vs.dtype), index, axis=2),
    )
