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
    """

    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, Dh]
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, S, Dh]
    pos: jax.Array  # [B, S] int32, position id stored in each slot, -1 where empty
    index: jax.Array  # [] int32, next slot to write

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
    """An empty cache of static shape ``[batch_size, max_len]`` (default: the model's ``max_len``)."""
    max_len = cfg.max_len if max_len is None else max_len
    if max_len > cfg.max_len and cfg.pos == "learned":
        raise ValueError(
            f"cache max_len={max_len} exceeds the model's max_len={cfg.max_len} (learned positions "
            "end there); use a cache no longer than the model's context"
        )
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
        pos=jnp.full((batch_size, max_len), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
