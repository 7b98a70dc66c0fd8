"""The one next-token cross-entropy, used by teacher forcing, scheduled sampling and evaluation.

``hidden_loss`` computes it from the final hidden states without materialising float32
``[B, T, V]`` logits: the output head and the cross-entropy run over chunks of tokens, each chunk
rematerialised in the backward pass, so only one chunk's logits are ever alive (GPT-2 small at
16 x 1024 tokens: 3.3 GB of logits become 0.2 GB). A batch that fits one chunk is one plain pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# A chunk's float32 logits take at most this many bytes (and at least 256 tokens a chunk).
LOSS_CHUNK_BYTES = 256 * 2**20


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood. logits: [B, T, V] (any float), targets: [B, T] -> [B, T] fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
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


def loss_chunk_tokens(vocab_size: int, n_tokens: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per loss chunk: a power of two whose float32 logits fit ``chunk_bytes`` (at least 256),
    or every token when they all fit."""
    per_token = 4 * vocab_size
    if n_tokens * per_token <= chunk_bytes:
        return n_tokens
    fits = chunk_bytes // per_token
    return max(256, 1 << fits.bit_length() - 1 if fits else 0)


def hidden_loss(
    model, h: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *, chunk_bytes: int = LOSS_CHUNK_BYTES
) -> tuple[jax.Array, jax.Array]:
    """``next_token_loss(model.logits(h), targets, mask)`` from hidden states h [B, T, D], chunk by chunk.

    The head matmul takes the compute dtype's operands and accumulates in float32
    (``Transformer.logits``); each chunk's logits are recomputed in the backward pass
    (``jax.checkpoint``) instead of being stored. Equal to the unchunked loss and gradient up to
    float summation order (tested).
    """
    B, T, D = h.shape
    N = B * T
    C = loss_chunk_tokens(model.cfg.vocab_size, N, chunk_bytes)
    if C >= N:
        return next_token_loss(model.logits(h), targets, mask)
    weights = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    K = -(-N // C)
    pad = K * C - N  # the last chunk is padded with weight-0 tokens
    x = jnp.pad(h.reshape(N, D), ((0, pad), (0, 0))).reshape(K, C, D)
    y = jnp.pad(targets.reshape(N), (0, pad)).reshape(K, C)
    w = jnp.pad(weights.reshape(N), (0, pad)).reshape(K, C)

    @jax.checkpoint
    def chunk_sum(xc, yc, wc):  # [C, D], [C], [C] -> the chunk's weighted NLL sum
        logits = model.logits(xc[None])[0]  # [C, V] float32
        return (token_nll(logits, yc) * wc).sum()

    def body(total, xs):
        return total + chunk_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x, y, w))
    n = weights.sum()
    return total / jnp.maximum(n, 1.0), n
