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

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.model.int8 import int8_operands, quantize_int8
from arjax.model.params import role
from arjax.model.transformer import Transformer

QUANTIZE_MODES = ("int8",)


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
    are quantized (the parameters ``arjax.model.params.ROLES`` marks ``quantized``; see the module
    docstring); norms, biases and ``pos_embed`` are shared with the original as they are. The result
    is an ordinary ``Transformer``: ``generate``, ``stream`` and ``nnx.split`` / ``nnx.merge`` take it
    as they take the float model. It is for inference: train,
    checkpoint and convert the float model. ``mode=None`` returns ``model`` itself.
    """
    check_quantize(mode)
    if not isinstance(model, Transformer):
        raise TypeError(f"quantize takes an arjax Transformer, got {type(model).__name__}")
    if mode is None:
        return model
    if quantized_as(model) is not None:
        raise ValueError(f"the model is already quantized ({quantized_as(model)}); quantize the float model")
    # A new module graph over the same arrays (nothing copied); the swaps below replace modules in it
    # only. Which parameters become int8 is the table of parameter roles' (arjax.model.params.ROLES).
    out = nnx.merge(*nnx.split(model))
    for path, _ in nnx.to_flat_state(nnx.state(out, nnx.Param)):
        r = role(path)
        if r.quantized:
            *parents, name = path[:-1]  # the module holding the parameter, and its name in its parent
            parent = _module_at(out, parents)
            swap = QuantLinear if r.kind == "kernel" else QuantEmbed
            setattr(parent, name, swap(getattr(parent, name)))
    return out


def _module_at(model, path) -> nnx.Module:
    """The submodule of ``model`` at ``path`` (names and list indices, e.g. ``("blocks", 0, "attn")``)."""
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model
