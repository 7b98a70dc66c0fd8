"""The KV cache: an explicit, static-shape pytree that goes into the model and comes back out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from arjax.model.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values for every layer, plus the position held in each slot.

    Prompts are left-padded, so every row writes its next token into the same slot ``index``:
    one ``lax.dynamic_update_slice`` per layer per step, no scatter. ``pos`` says which token
    position each slot holds (``-1``: empty or padding); the attention mask is computed from it,
    so the same mask function serves training, prefill and decode.

    An int8 cache (``init_cache(..., dtype="int8")``) holds int8 k, v and one float32 scale per
    slot per KV head in ``k_scale``, ``v_scale`` (model/quant.py); a float cache has None there.
    """

    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, Dh]
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, S, Dh]
    pos: jax.Array  # [B, S] int32, position id stored in each slot, -1 where empty
    index: jax.Array  # [] int32, next slot to write; or [B], each row's own (speculative decoding)
    k_scale: tuple[jax.Array, ...] | None = None  # int8 cache only: per layer [B, Hkv, S] float32
    v_scale: tuple[jax.Array, ...] | None = None

    def layer(self, i: int) -> tuple[jax.Array, ...]:
        """Layer i's (k, v), or (k, v, k_scale, v_scale) for an int8 cache: what Attention takes."""
        if self.k_scale is None:
            return self.k[i], self.v[i]
        return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]

    def with_layers(self, layers, pos: jax.Array, index: jax.Array) -> KVCache:
        """The cache holding ``layers`` (a list of what ``layer(i)`` returns, updated) at ``pos``, ``index``."""
        parts = tuple(tuple(p) for p in zip(*layers))  # (k, v) or (k, v, k_scale, v_scale), each per layer
        k_scale, v_scale = parts[2:] if len(parts) == 4 else (None, None)
        return KVCache(k=parts[0], v=parts[1], pos=pos, index=index, k_scale=k_scale, v_scale=v_scale)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]


def write_slots(buf: jax.Array, x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``buf`` with ``x`` written at slot ``index`` along ``axis`` (axis > 0; axis 0 is the batch).

    ``index`` is one slot for every row ([]: one ``dynamic_update_slice``), or one per row ([B]:
    rows that advance by different counts, as in speculative decoding). The caller keeps
    ``index + x.shape[axis] <= buf.shape[axis]``: an update past the end would be shifted back.
    """
    if jnp.ndim(index) == 0:
        start = [0] * buf.ndim
        start[axis] = index
        return jax.lax.dynamic_update_slice(buf, x, tuple(start))

    def one(b, u, i):  # one row: the batch axis is gone
        start = [0] * b.ndim
        start[axis - 1] = i
        return jax.lax.dynamic_update_slice(b, u, tuple(start))

    return jax.vmap(one)(buf, x, index)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
    """An empty cache of static shape ``[batch_size, max_len]`` (default: the model's ``max_len``).

    dtype: the model's dtype (None), a float dtype, or ``"int8"`` (int8 keys and values with a
    float32 scale per slot and KV head: a quarter of float32's bytes plus 4 / Dh).
    """
    max_len = cfg.max_len if max_len is None else max_len
    if max_len > cfg.max_len and cfg.pos == "learned":
        raise ValueError(
            f"cache max_len={max_len} exceeds the model's max_len={cfg.max_len} (learned positions "
            "end there); use a cache no longer than the model's context"
        )
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    scales = None
    if dtype == jnp.int8:
        scales = [tuple(jnp.zeros(shape[:3], jnp.float32) for _ in range(cfg.n_layers)) for _ in "kv"]
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"cache dtype {dtype.name!r} is not supported; use 'int8', a float dtype, or None (the model's)"
        )
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        pos=jnp.full((batch_size, max_len), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
        k_scale=None if scales is None else scales[0],
        v_scale=None if scales is None else scales[1],
    )
