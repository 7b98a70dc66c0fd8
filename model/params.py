"""Parameter roles: one table of what each Transformer parameter is (axes, decay, int8), and the one key-path helper.

Every parameter is named by its module and its own name, the last two keys of its path
(``blocks/0/attn/q/kernel`` -> ``("q", "kernel")``), and that pair has one row in ``ROLES``:

- ``kind``: ``kernel`` (a linear map's ``[in, out]`` matrix), ``bias``, ``norm`` (a norm's scale or
  bias) or ``embedding`` (a ``[rows, d_model]`` table).
- ``axes``: the logical axis name of each dimension, which ``arjax.model.sharding``'s rules map to
  mesh axes (``embed`` = d_model, ``heads`` / ``kv_heads`` = heads x head_dim, ``mlp``, ``vocab``;
  None: never split).
- ``decays``: whether AdamW's weight decay applies (``arjax.train.optim.decay_mask``). Shrinking a
  norm's scale or a bias toward zero is not regularisation, it changes what the layer computes
  (nanoGPT decays only tensors with ndim >= 2); None for embeddings: the run config's
  ``decay_embeddings`` decides (nanoGPT decays the tied embedding).
- ``quantized``: whether ``arjax.model.quantize(model, "int8")`` stores it as int8 with scales
  (kernels per output column, the token embedding per row); norms, biases and learned positions
  stay float.

The Hugging Face conversion tables (``arjax.model.hf``) stay their own: they map names per HF
family (GPT-2's Conv1D is already ``[in, out]``, its ``c_attn`` holds q, k and v, a bias-free model
exports zero biases) and write every name and transpose out, which no role can say.
"""

from __future__ import annotations

import dataclasses
from typing import Any

KINDS = ("kernel", "bias", "norm", "embedding")


@dataclasses.dataclass(frozen=True)
class Role:
    """What one parameter is: see the module docstring."""

    kind: str  # one of KINDS
    axes: tuple[str | None, ...]  # a logical axis name per dimension
    decays: bool | None  # weight decay; None: the run's decay_embeddings decides
    quantized: bool  # int8 under quantize()


def _kernel(*axes: str) -> Role:
    return Role("kernel", axes, decays=True, quantized=True)


def _bias(axis: str) -> Role:
    return Role("bias", (axis,), decays=False, quantized=False)


_NORM = Role("norm", ("embed",), decays=False, quantized=False)

# (module, parameter) -> role. Kernels are [in, out]; q/k/v and gate/up run as one matmul over
# their concatenated kernels but stay separate parameters here.
ROLES: dict[tuple[str, str], Role] = {
    ("embed", "embedding"): Role("embedding", ("vocab", "embed"), decays=None, quantized=True),  # also the tied head
    ("pos_embed", "embedding"): Role("embedding", (None, "embed"), decays=None, quantized=False),  # learned positions
    ("q", "kernel"): _kernel("embed", "heads"),
    ("q", "bias"): _bias("heads"),
    ("k", "kernel"): _kernel("embed", "kv_heads"),
    ("k", "bias"): _bias("kv_heads"),
    ("v", "kernel"): _kernel("embed", "kv_heads"),
    ("v", "bias"): _bias("kv_heads"),
    ("o", "kernel"): _kernel("heads", "embed"),
    ("o", "bias"): _bias("embed"),
    ("gate", "kernel"): _kernel("embed", "mlp"),
    ("gate", "bias"): _bias("mlp"),
    ("up", "kernel"): _kernel("embed", "mlp"),
    ("up", "bias"): _bias("mlp"),
    ("down", "kernel"): _kernel("mlp", "embed"),
    ("down", "bias"): _bias("embed"),
    ("lm_head", "kernel"): _kernel("embed", "vocab"),  # untied models only
    ("ln1", "scale"): _NORM,
    ("ln1", "bias"): _NORM,
    ("ln2", "scale"): _NORM,
    ("ln2", "bias"): _NORM,
    ("ln_f", "scale"): _NORM,
    ("ln_f", "bias"): _NORM,
}


def key_name(key: Any) -> str:
    """One key of a path as a string: a JAX ``DictKey``'s key, ``GetAttrKey``'s name, ``SequenceKey``'s
    index, or the key itself (the plain strings and ints of an ``nnx.to_flat_state`` path)."""
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def path_names(path) -> list[str]:
    """Every key of ``path`` (a JAX key path or a tuple of names) as a string."""
    return [key_name(k) for k in path]


def path_str(path) -> str:
    """``blocks/0/attn/q/kernel``: how checkpoints name an array (its fingerprint's key)."""
    return "/".join(path_names(path))


def role(path) -> Role:
    """The role of the parameter at ``path`` (e.g. ``blocks/0/attn/q/kernel``, with or without the
    ``.value`` an ``nnx.State`` adds); a ValueError for a parameter the table lacks."""
    names = [n for n in path_names(path) if n != "value"]
    try:
        return ROLES[tuple(names[-2:])]
    except KeyError:
        raise ValueError(
            f"parameter {'/'.join(names)!r} has no role in arjax.model.params; add its (module, parameter) row to ROLES"
        ) from None
