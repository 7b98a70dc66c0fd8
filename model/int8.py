"""The int8 numerics the model runs on: one symmetric quantizer, the matmul operands' barrier and the
int8 KV cache's write. ``model/quant.py`` builds int8 models from them (``quantize``); the transformer
only calls them, so neither imports the other's module in a loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from arjax.model.cache import write_slots

# See int8_operands. bench/quant.py turns it off to measure what XLA's hoisting would do instead.
CONVERT_EACH_STEP = True


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
