"""The decoder-only transformer: one call, ``model(tokens, positions, cache) -> (logits, cache)``,
serves teacher-forced training (no cache), prefill and one-token decode steps with the same weights."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.model.attention import causal_attention, xla_attention
from arjax.model.cache import KVCache, write_slots
from arjax.model.config import ModelConfig
from arjax.model.int8 import int8_operands, write_int8
from arjax.model.sharding import constrain_rows


def attention_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """The one causal + padding mask: query at position p sees keys at positions 0..p.

    q_pos: [B, T], k_pos: [B, S] integer positions; ``-1`` marks padding or an empty cache slot.
    Returns [B, 1, T, S] bool (broadcast over heads). A padded query sees nothing; its output is
    ignored by the loss and by the decoder.
    """
    q = q_pos[:, None, :, None]
    k = k_pos[:, None, None, :]
    return (k >= 0) & (k <= q)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the Hugging Face Llama layout (rotate the two halves of each head).

    x: [B, T, N, Dh], positions: [B, T].
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))  # [Dh/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(
    cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, *, std: float | None = None, bias=None, out_dtype=None
):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=cfg.use_bias if bias is None else bias,
        dtype=jnp.dtype(cfg.dtype),
        kernel_init=nnx.initializers.normal(cfg.init_std if std is None else std),
        preferred_element_type=out_dtype,
        rngs=rngs,
    )


def _norm(cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
    return nnx.LayerNorm(
        cfg.d_model, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=jnp.dtype(cfg.dtype), rngs=rngs
    )


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads; takes this layer's cache and returns a new one."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd, nq, nkv = cfg.dim_per_head, cfg.n_heads, cfg.num_kv_heads
        # Residual projections are scaled down with depth (GPT-2 / nanoGPT init).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.q = _linear(cfg, cfg.d_model, nq * hd, rngs)
        self.k = _linear(cfg, cfg.d_model, nkv * hd, rngs)
        self.v = _linear(cfg, cfg.d_model, nkv * hd, rngs)
        self.o = _linear(cfg, nq * hd, cfg.d_model, rngs, std=out_std)

    def __call__(self, x, positions, k_pos, layer_cache=None, index=None, contiguous=False):
        """x: [B, T, D]; positions: [B, T]; k_pos: [B, S] positions of the keys attended to;
        ``contiguous``: every row is at positions 0..T-1 (the teacher-forced pass: fused kernels apply).

        layer_cache: None (keys are this call's tokens, S == T) or (k, v) each [B, Hkv, S, Dh],
        into which this call's keys and values are written at slot ``index``; an int8 cache adds
        their scales, (k, v, k_scale, v_scale) with scales [B, Hkv, S] (model/quant.py).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nq, nkv = cfg.dim_per_head, cfg.n_heads, cfg.num_kv_heads
        # One [B*T, D] x [D, (Nq + 2 Hkv) Dh] matmul for q, k and v (see _fused_linear).
        q, k, v = _fused_linear(x.reshape(B * T, -1), self.q, self.k, self.v)
        q = q.reshape(B, T, nq, hd)  # [B, T, N, Dh]
        k = k.reshape(B, T, nkv, hd)  # [B, T, Hkv, Dh]
        v = v.reshape(B, T, nkv, hd)
        if cfg.pos == "rope":
            q = rope(q, positions, cfg.rope_theta)
            k = rope(k, positions, cfg.rope_theta)
        mask = attention_mask(positions, k_pos)  # [B, 1, T, S]
        if layer_cache is None and contiguous:  # cuDNN / Pallas flash attention where the backend has one
            out = causal_attention(q, k, v, mask, implementation=cfg.attention)  # [B, T, N, Dh]
            new_cache = None
        elif layer_cache is None:  # padded prompts: XLA's attention under the position mask
            out = xla_attention(q, k, v, mask)  # [B, T, N, Dh]
            new_cache = None
        elif len(layer_cache) == 4:  # int8: writes quantize; the scales are applied inside the attention
            new_cache = write_int8(layer_cache, k.swapaxes(1, 2), v.swapaxes(1, 2), index)
            ck, cv, ks, vs = new_cache
            out = _cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, ks, vs)
        else:
            ck, cv = layer_cache  # [B, Hkv, S, Dh]
            ck = write_slots(ck, k.swapaxes(1, 2).astype(ck.dtype), index, axis=2)
            cv = write_slots(cv, v.swapaxes(1, 2).astype(cv.dtype), index, axis=2)
            new_cache = (ck, cv)
            out = _cached_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask)
        return self.o(out.reshape(B * T, nq * hd)).reshape(B, T, -1), new_cache


def _cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, k_scale=None, v_scale=None
) -> jax.Array:
    """Softmax attention of q [B, T, N, Dh] over a cache k, v [B, Hkv, S, Dh] (N = G * Hkv heads).

    The same math as jax.nn.dot_product_attention (which the uncached pass uses; a test holds
    the two to 1e-4), written against the cache's heads-major layout with the cache as each
    product's left operand. For one decode token over gpt2-small's 12 layers this ran in half
    the time of dot_product_attention on the same cache (1.4 vs 2.7 ms on the 2-core CPU).

    k_scale, v_scale [B, Hkv, S]: an int8 cache's per-slot scales (k, v then hold the int8 values
    as floats). One scale per key slot multiplies that slot's score, and one per value slot its
    probability: the same as dequantizing the cache first, with S products instead of S * Dh.
    """
    B, T, N, Dh = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, T, Hkv, N // Hkv, Dh)
    scores = jnp.einsum("bksd,btkgd->bkgts", k, q, preferred_element_type=jnp.float32) / math.sqrt(Dh)
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :].astype(jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # mask [B, 1, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :].astype(jnp.float32)
    probs = probs.astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(B, T, N, Dh)


def _fused_linear(x: jax.Array, *linears: nnx.Linear) -> tuple[jax.Array, ...]:
    """``tuple(l(x) for l in linears)`` as one matmul over the concatenated kernels.

    The parameters stay separate (their names map one-to-one onto Hugging Face's); the
    concatenation is loop-invariant, so inside the jitted decode loop XLA hoists it and every
    step streams one [D, sum(out)] matrix, not several small ones, each with its own overhead.
    """
    dtype = linears[0].dtype
    kernel = jnp.concatenate([l.kernel[...] for l in linears], axis=1)
    quantized = hasattr(linears[0], "scale")  # int8 kernels (model/quant.py): per-output-column scales
    if quantized:
        x, kernel = int8_operands(x, kernel)
    y = x.astype(dtype) @ kernel.astype(dtype)
    if quantized:
        y = y * jnp.concatenate([l.scale[...] for l in linears]).astype(dtype)
    if linears[0].use_bias:
        y = y + jnp.concatenate([l.bias[...] for l in linears]).astype(dtype)
    splits = np.cumsum([l.out_features for l in linears])[:-1]
    return tuple(jnp.split(y, splits, axis=-1))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if cfg.mlp == "swiglu":
            self.gate = _linear(cfg, cfg.d_model, cfg.ff_dim, rngs)
            self.up = _linear(cfg, cfg.d_model, cfg.ff_dim, rngs)
            self.down = _linear(cfg, cfg.ff_dim, cfg.d_model, rngs, std=out_std)
        else:
            self.up = _linear(cfg, cfg.d_model, cfg.ff_dim, rngs)
            self.down = _linear(cfg, cfg.ff_dim, cfg.d_model, rngs, std=out_std)

    def __call__(self, x):
        return _flat(self._mlp, x)

    def _mlp(self, x):
        if self.kind == "swiglu":
            gate, up = _fused_linear(x, self.gate, self.up)
            return self.down(jax.nn.silu(gate) * up)
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


def _flat(fn, x: jax.Array) -> jax.Array:
    """Apply a token-wise ``fn`` to [B, T, D] as one [B*T, D] matrix.

    Same math; but XLA's CPU backend runs the 3-D dot_generals of nnx.Linear (and especially
    their gradients) much slower than plain 2-D matmuls (26% of a train step measured here).
    """
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln1 = _norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, positions, k_pos, layer_cache=None, index=None, dropout_rng=None, contiguous=False):
        h, new_cache = self.attn(self.ln1(x), positions, k_pos, layer_cache, index, contiguous)
        x = x + _dropout(self.dropout, h, dropout_rng, 0)
        x = x + _dropout(self.dropout, self.mlp(self.ln2(x)), dropout_rng, 1)
        return x, new_cache


def _call_block(block: Block, x, positions, k_pos, layer_cache, index, rng, contiguous):
    return block(x, positions, k_pos, layer_cache, index, rng, contiguous)


# What a rematerialised block keeps for the backward pass (jax.checkpoint policies); None keeps its input only.
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


def _remat_block(kind: str):
    """The uncached block call under ``ModelConfig.remat``: the same values, less memory kept for the
    gradient (recomputed in the backward pass instead)."""
    if kind == "none":
        return _call_block
    policy = REMAT_POLICIES[kind]

    def run(block, x, positions, k_pos, layer_cache, index, rng, contiguous):
        # jax.checkpoint over the block's state as an explicit argument (split/merge): the pure-function
        # form that composes with the train step's jit and grad whatever transform wraps them.
        graphdef, state = nnx.split(block)

        def pure(state, x, positions, k_pos, rng):
            return nnx.merge(graphdef, state)(x, positions, k_pos, None, None, rng, contiguous)[0]

        return jax.checkpoint(pure, policy=policy)(state, x, positions, k_pos, rng), None

    return run


def _dropout(layer: nnx.Dropout, x, rng, salt: int):
    """Dropout is on exactly when a key is passed: no train/eval mode stored on the module."""
    if rng is None or layer.rate == 0.0:
        return x
    return layer(x, deterministic=False, rngs=jax.random.fold_in(rng, salt))


class Transformer(nnx.Module):
    """Decoder-only transformer. Parameter names follow GPT-2/Llama so HF conversion is a table."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        if cfg.pos == "learned":
            self.pos_embed = nnx.Embed(
                cfg.max_len, cfg.d_model, embedding_init=init, dtype=jnp.dtype(cfg.dtype), rngs=rngs
            )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            # Logits accumulate and come out in float32 whatever the compute dtype: the loss and
            # the sampler read them, and bf16 logits keep ~3 significant digits.
            self.lm_head = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs, bias=False, out_dtype=jnp.float32)
        self.dropout = nnx.Dropout(cfg.dropout)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int -> [B, T, D]: the input embeddings (before positions are added)."""
        return self.embed(tokens)

    def embed_soft(self, probs: jax.Array) -> jax.Array:
        """[B, T, V] distribution -> [B, T, D]: the probability-weighted mixture of token embeddings."""
        table = self.embed.embedding[...]
        if hasattr(self.embed, "scale"):  # int8 table (model/quant.py): one scale per row
            table = table * self.embed.scale[...][:, None]
        return jnp.einsum("btv,vd->btd", probs.astype(table.dtype), table).astype(jnp.dtype(self.cfg.dtype))

    def hidden(self, tokens=None, positions=None, cache: KVCache | None = None, *, embeddings=None, dropout_rng=None):
        """Final-norm hidden states [B, T, D] and the updated cache (None when no cache is given)."""
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens [B, T] or embeddings [B, T, D]")
        x = self.embed_tokens(tokens) if tokens is not None else embeddings.astype(jnp.dtype(self.cfg.dtype))
        B, T = x.shape[:2]
        contiguous = positions is None  # every row at positions 0..T-1 (the teacher-forced pass)
        if contiguous:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if self.cfg.pos == "learned":
            if contiguous and self.cfg.max_len >= T:
                # A slice of the table, not a gather: its gradient is a pad, not a scatter-add.
                x = x + self.pos_embed.embedding[:T].astype(x.dtype)
            else:
                x = x + self.pos_embed(jnp.clip(positions, 0, self.cfg.max_len - 1))
        # Salt n_layers: distinct from the block indices below, and fold_in needs a non-negative int.
        x = _dropout(self.dropout, x, dropout_rng, self.cfg.n_layers)
        x = constrain_rows(x)

        if cache is None:
            k_pos, index = positions, None
        else:
            index = cache.index
            k_pos = write_slots(cache.pos, positions.astype(jnp.int32), index, axis=1)  # [B, S]
        new_layers = []
        run = _remat_block(self.cfg.remat) if cache is None else _call_block
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layer(i)
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            x, layer_cache = run(block, x, positions, k_pos, layer_cache, index, rng, contiguous and cache is None)
            x = constrain_rows(x)  # the residual stream: rows split over the batch axes, the width whole
            new_layers.append(layer_cache)
        x = self.ln_f(x)
        if cache is None:
            return x, None
        return x, cache.with_layers(new_layers, pos=k_pos, index=index + T)

    def logits(self, h: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] float32 logits."""
        if self.cfg.tie_embeddings:
            # The table [V, D] as the dot's left operand, as stored: XLA:CPU then streams it as a
            # plain matrix-vector product when decoding (h @ table.T instead is a fused transposed
            # loop, ~20% slower for gpt2-small's 154 MB head). Same math as nnx.Embed.attend.
            table = self.embed.embedding[...]
            quantized = hasattr(self.embed, "scale")  # int8 table (model/quant.py): one scale per vocabulary row
            if quantized:
                h, table = int8_operands(h, table)
            table = table.astype(h.dtype)
            logits = _flat(lambda x: head_matmul(True, x, table), h)
            if quantized:
                logits = logits * self.embed.scale[...].astype(logits.dtype)
            return logits
        if hasattr(self.lm_head, "scale"):  # int8 kernel (decoding only): the layer's own quantized matmul
            return _flat(self.lm_head, h).astype(jnp.float32)
        kernel = self.lm_head.kernel[...].astype(jnp.dtype(self.cfg.dtype))
        return _flat(lambda x: head_matmul(False, x.astype(kernel.dtype), kernel), h)

    def __call__(self, tokens=None, positions=None, cache: KVCache | None = None, *, embeddings=None, dropout_rng=None):
        """tokens: [B, T] int (or embeddings: [B, T, D]); positions: [B, T] int, -1 for padding.

        Without a cache: the teacher-forced forward pass under the causal mask.
        With a cache: the tokens are written into slots ``cache.index .. cache.index + T`` and
        attend to everything the cache holds. Returns ``(logits [B, T, V] float32, new_cache)``.
        """
        h, new_cache = self.hidden(tokens, positions, cache, embeddings=embeddings, dropout_rng=dropout_rng)
        return self.logits(h), new_cache


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def head_matmul(stored_vd: bool, x: jax.Array, w: jax.Array) -> jax.Array:
    """The output head: x [N, D] times w ([V, D] if ``stored_vd``, else [D, V]) -> [N, V] float32,
    operands in the compute dtype, float32 accumulation.

    Its gradient is taken in the compute dtype too: the float32 cotangent of the logits is cast to
    x's dtype before the two gradient matmuls (float32 accumulation again). Left to autodiff, the
    float32 cotangent promotes both gradient matmuls of the largest layer to float32 (TF32 GEMMs on
    a GPU: 20% of GPT-2 small's bf16 step on an H200, the profile's top two kernels). In float32
    the two are the same computation.
    """
    if stored_vd:  # the table as the left operand, as stored (see Transformer.logits)
        return jnp.einsum("vd,nd->nv", w, x, preferred_element_type=jnp.float32)
    return jnp.einsum("nd,dv->nv", x, w, preferred_element_type=jnp.float32)


def _head_fwd(stored_vd, x, w):
    return head_matmul(stored_vd, x, w), (x, w)


def _head_bwd(stored_vd, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("nv,vd->nd" if stored_vd else "nv,dv->nd", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("nv,nd->vd" if stored_vd else "nv,nd->dv", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


head_matmul.defvjp(_head_fwd, _head_bwd)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (``nnx.eval_shape``: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
