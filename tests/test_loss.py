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


def _grads_with_head(cfg, head):
    """Loss and gradient leaves of the chunk-free pass with ``transformer.head_matmul`` replaced by ``head``."""
    import arjax.model.transformer as tr

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)
    saved, tr.head_matmul = tr.head_matmul, head
    try:
        loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(tokens[:, :-1])[0], tokens[:, 1:])[0])(model)
    finally:
        tr.head_matmul = saved
    return loss, [x.astype(jnp.float32) for x in jax.tree.leaves(nnx.state(grads))]


def _autodiff_head(stored_vd, x, w):  # the head's forward, differentiated by JAX itself
    spec = ("vd,nd->nv", w, x) if stored_vd else ("nd,dv->nv", x, w)
    return jnp.einsum(*spec, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_heads_gradient_runs_in_the_compute_dtype_and_equals_autodiff(tied, dtype):
    """head_matmul's custom gradient casts the logits' float32 cotangent to the compute dtype (bf16
    GEMMs instead of float32 ones): in float32 it is autodiff's gradient exactly; in bf16 within
    bf16 rounding of it (leaves with a gradient that is zero in exact arithmetic, such as the key
    bias, are noise in both and left out)."""
    from arjax.model.transformer import head_matmul

    cfg = get_config("tiny", dtype=dtype, tie_embeddings=tied)
    loss, ours = _grads_with_head(cfg, head_matmul)
    loss_ref, ref = _grads_with_head(cfg, _autodiff_head)
    assert float(loss) == float(loss_ref)  # the forward pass is the same computation
    total = float(jnp.sqrt(sum(jnp.sum(r**2) for r in ref)))
    for a, r in zip(ours, ref):
        if dtype == "float32":
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-9)
        elif float(jnp.linalg.norm(r)) > 1e-3 * total:
            assert float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r)) < 3e-2

    # and the gradient's matmuls really take bf16 operands: no float32 x float32 dot in the backward pass
    if dtype == "bfloat16":
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        tokens = jnp.zeros((2, 16), jnp.int32)
        hlo = jax.jit(nnx.grad(lambda m: m(tokens)[0].sum())).lower(model).as_text()
        f32_dots = [ln for ln in hlo.splitlines() if "dot_general" in ln and "tensor<" in ln and ln.count("xf32>") >= 3]
        assert not f32_dots, f32_dots[:2]


@pytest.mark.parametrize("remat", ["dots", "full"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_remat_changes_nothing_but_memory(remat, use_bias):
    """ModelConfig.remat recomputes each block in the backward pass: the same loss and gradients."""
    cfg = get_config("tiny", use_bias=use_bias, dropout=0.1)
    tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, cfg.vocab_size)

    def run(c):
        graphdef, params = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))

        def loss(p):
            m = nnx.merge(graphdef, p)
            h, _ = m.hidden(tokens[:, :-1], dropout_rng=jax.random.key(5))
            return hidden_loss(m, h, tokens[:, 1:])[0]

        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = run(cfg), run(cfg.replace(remat=remat))
    assert float(l0) == float(l1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
