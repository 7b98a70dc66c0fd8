"""The one next-token cross-entropy, used by teacher forcing, scheduled sampling and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood. logits: [B, T, V] (any float), targets: [B, T] -> [B, T] fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean NLL over the positions where ``mask`` is true, and the number of such positions.

    ``targets[:, t]`` is the token that should follow input position t (inputs shifted by one);
    ``mask`` ([B, T] bool/0-1) removes padding. Returns ``(mean_loss, n_tokens)``; the count lets
    gradient accumulation weight micro-batches by tokens rather than by batch.
    """
    nll = token_nll(logits, targets)  # [B, T]
    if mask is None:
        mask = jnp.ones_like(nll)
    mask = mask.astype(jnp.float32)
    n = mask.sum()
    return (nll * mask).sum() / jnp.maximum(n, 1.0), n
