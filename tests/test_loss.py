"""The chunked loss (``hidden_loss``): the unchunked cross-entropy's value and gradient, without its
[B, T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.model import Transformer, get_config
from arjax.train.loss import hidden_loss, loss_chunk_tokens, next_token_loss


def test_chunk_sizes():
    assert loss_chunk_tokens(256, 1000) == 1000  # 1 MB of logits: one chunk, no scan
    assert loss_chunk_tokens(50257, 16 * 1024) == 1024  # GPT-2 small's step: 1024-token chunks of 206 MB
    assert loss_chunk_tokens(50257, 16 * 1024, chunk_bytes=1) == 256  # never below 256 tokens


def _losses(cfg, mask_pad: bool, chunk_bytes: int):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (3, 101), 0, cfg.vocab_size)  # 300 targets: 2 chunks of 256, padded
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = (targets != 7) if mask_pad else None

    def full(p):
        m = nnx.merge(graphdef, p)
        return next_token_loss(m(inputs)[0], targets, mask)

    def chunked(p):
        m = nnx.merge(graphdef, p)
        return hidden_loss(m, m.hidden(inputs)[0], targets, mask, chunk_bytes=chunk_bytes)

    out = []
    for fn in (full, chunked):
        (loss, n), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
        out.append((loss, n, grads))
    return out


@pytest.mark.parametrize("tied, mask_pad", [(True, False), (False, True)])
def test_chunked_loss_and_gradients_equal_the_full_logits_pass(tied, mask_pad):
    cfg = get_config("tiny", tie_embeddings=tied, max_len=128)
    (l1, n1, g1), (l2, n2, g2) = _losses(cfg, mask_pad, chunk_bytes=256 * 4 * 256)  # 256-token chunks
    assert float(n1) == float(n2) and (float(n1) < 300) == mask_pad
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_bf16_logits_accumulate_in_float32():
    cfg = get_config("tiny", dtype="bfloat16", max_len=128)
    (l1, _, g1), (l2, _, g2) = _losses(cfg, False, chunk_bytes=256 * 4 * 256)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-3)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.logits(jnp.ones((1, 2, cfg.d_model), jnp.bfloat16)).dtype == jnp.float32


def test_the_chunked_loss_never_holds_the_whole_logits():
    """XLA's own memory analysis of the compiled gradient, over what the model without its head
    needs: the full pass adds at least the [N, V] float32 logits (64 MiB here), the chunked one
    less than a quarter of that (one 4 MiB chunk's)."""
    cfg = get_config("tiny", vocab_size=8192, max_len=1024, n_layers=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 1025), jnp.int32)

    def temp_bytes(chunk_bytes):
        def loss(p):
            m = nnx.merge(graphdef, p)
            h = m.hidden(tokens[:, :-1])[0]
            if chunk_bytes is None:  # the body alone
                return h.sum()
            return hidden_loss(m, h, tokens[:, 1:], chunk_bytes=chunk_bytes)[0]

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    body = temp_bytes(None)
    full, chunked = temp_bytes(2**40) - body, temp_bytes(4 * 2**20) - body
    logits = 2 * 1024 * 8192 * 4
    assert full >= logits and chunked < logits / 4, (full, chunked)
