"""Model configuration: a frozen, keyword-only dataclass, named presets, and strict overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

INT32_MAX = 2**31 - 1  # every int a config holds becomes a 32-bit integer on the device unless marked ANY_INT


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric config field; ``check_field_types`` checks it."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    fix: str = ""

    def __contains__(self, v) -> bool:
        return (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (
            self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        )

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"


def bounds(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    fix: str = "",
    **metadata,
) -> dict:
    """Field metadata for a range: ``lr: float = dataclasses.field(default=1e-3, metadata=bounds(0, lo_open=True))``."""
    return {"bounds": Bounds(lo, hi, lo_open, hi_open, fix), **metadata}


POSITIVE = bounds(0, lo_open=True)  # > 0
NON_NEGATIVE = bounds(0)  # >= 0
ANY_INT = {"any_int": True}  # a Python int of any size (seeds): not limited to 32 bits


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that determines the parameter shapes and the forward computation.

    Widths follow the usual names: ``d_model`` is the residual width, ``d_ff`` the MLP hidden
    width, ``n_kv_heads < n_heads`` turns on grouped-query attention.
    """

    vocab_size: int = dataclasses.field(metadata=POSITIVE)
    max_len: int = dataclasses.field(metadata=POSITIVE)  # longest sequence (positions) the model is built for
    n_layers: int = dataclasses.field(metadata=POSITIVE)
    n_heads: int = dataclasses.field(metadata=POSITIVE)
    d_model: int = dataclasses.field(metadata=POSITIVE)
    # None: same as n_heads (plain multi-head attention)
    n_kv_heads: int | None = dataclasses.field(default=None, metadata=POSITIVE)
    head_dim: int | None = dataclasses.field(default=None, metadata=POSITIVE)  # None: d_model // n_heads
    # None: 4 * d_model (gelu) or the Llama 8/3 rule rounded to 64 (swiglu)
    d_ff: int | None = dataclasses.field(default=None, metadata=POSITIVE)
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = dataclasses.field(default=10000.0, metadata=POSITIVE)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = dataclasses.field(default=1e-5, metadata=POSITIVE)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True  # biases in attention/MLP projections and LayerNorm (GPT-2 yes, Llama no)
    tie_embeddings: bool = True
    dropout: float = dataclasses.field(default=0.0, metadata=bounds(0, 1, hi_open=True))
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype; params stay fp32
    # The teacher-forced pass's attention (model/attention.py): auto is cuDNN flash attention on GPUs
    # (bf16/fp16), the Pallas flash kernel on TPUs, XLA's elsewhere; a kernel that refuses falls back.
    attention: Literal["auto", "xla", "cudnn", "pallas"] = "auto"
    # Rematerialisation of each block in the backward pass (memory for long contexts, at the price of
    # recomputing): none keeps every activation, dots keeps only the matmul outputs (recomputes the
    # norms, activations and attention), full keeps only each block's input.
    remat: Literal["none", "dots", "full"] = "none"
    init_std: float = dataclasses.field(default=0.02, metadata=NON_NEGATIVE)

    def __post_init__(self):
        check_field_types(self)
        if self.n_heads % self.num_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.num_kv_heads}; "
                "grouped-query attention shares each kv head among n_heads // n_kv_heads query heads"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.pos == "rope" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim_per_head}")

    # Derived sizes: one place, so that model, cache and converters agree.
    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return 64 * -(-int(8 * self.d_model / 3) // 64)
        return 4 * self.d_model

    def replace(self, **overrides: Any) -> ModelConfig:
        return from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _allowed(hint) -> tuple[tuple[type, ...], tuple | None]:
    """(accepted Python types, Literal choices or None) for one field annotation."""
    if typing.get_origin(hint) is Literal:
        return (str,), typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    accepted: list[type] = []
    choices = None
    for a in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(a) is Literal:  # Literal[...] | None: the choices, or None
            accepted.append(str)
            choices = (*typing.get_args(a), None)
        elif a is float:
            accepted += [int, float]  # YAML and JSON write 1 for 1.0
        else:
            accepted.append(typing.get_origin(a) or a)
    return tuple(accepted), choices


def _items(hint) -> type | None:
    """The item type of a ``tuple[X, ...]`` annotation (inside an Optional too), else None."""
    for a in (hint, *typing.get_args(hint)):
        if typing.get_origin(a) is tuple:
            args = [x for x in typing.get_args(a) if x is not Ellipsis]
            return args[0] if len(args) == 1 and isinstance(args[0], type) else None
    return None


def check_field_types(obj) -> None:
    """Every field of a config dataclass holds a value of its annotated type, or raise naming it.

    The one type check behind every strict config (model, run, scheduled sampling, study): ``bool``
    is not accepted for an ``int`` (a YAML ``true`` for ``steps`` is a mistake, not 1),
    ``Literal`` fields must hold one of their choices, and ``tuple[X, ...]`` fields hold X's.
    Numbers too: every float is finite, every int fits 32 bits (unless the field's metadata says
    ``ANY_INT``, as seeds do), and a field with ``bounds(...)`` metadata is in its range; the error
    names the field, the value and the allowed range.
    """
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        accepted, choices = _allowed(hints[f.name])
        if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
            raise TypeError(f"{cls.__name__}.{f.name}={value!r} ({type(value).__name__}) should be {names}")
        if choices and value not in choices:
            raise ValueError(f"{cls.__name__}.{f.name}={value!r}; choose one of {choices}")
        _check_number(f"{cls.__name__}.{f.name}", value, f.metadata)
        item = _items(hints[f.name])
        if item is not None and isinstance(value, tuple):
            for i, x in enumerate(value):
                if not isinstance(x, item) or (isinstance(x, bool) and item is not bool):
                    raise TypeError(
                        f"{cls.__name__}.{f.name}[{i}]={x!r} ({type(x).__name__}) should be {item.__name__}"
                    )


def _check_number(name: str, value, metadata) -> None:
    """Finite, within 32 bits (ints, unless ``ANY_INT``), and within the field's ``bounds``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if isinstance(value, int) and not metadata.get("any_int") and abs(value) > INT32_MAX:
        raise ValueError(f"{name}={value} does not fit a 32-bit integer; use a value below 2**31 = {INT32_MAX + 1}")
    b = metadata.get("bounds")
    if b is not None and value not in b:
        raise ValueError(f"{name}={value!r} must be {b.describe()}" + (f"; {b.fix}" if b.fix else ""))


def _is_config(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _convert(hint, value, where: str):
    """A YAML/JSON value shaped for ``hint``: mappings become nested configs, lists become tuples.

    Everything else is passed through unchanged; the dataclass's own ``check_field_types`` then
    says what is wrong with it.
    """
    if value is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for a in typing.get_args(hint):
            if (_is_config(a) and isinstance(value, Mapping)) or (
                typing.get_origin(a) is tuple and isinstance(value, list)
            ):
                return _convert(a, value, where)
        return value
    if _is_config(hint) and isinstance(value, Mapping):
        return strict_from_dict(hint, value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        item = _items(hint)
        return tuple(_convert(item, x, f"{where}[{i}]") if item else x for i, x in enumerate(value))
    return value


def strict_from_dict(cls, d: Mapping[str, Any], where: str | None = None):
    """Build config dataclass ``cls`` from mapping ``d``, nested configs included.

    The one strict loader behind every config (model, run, scheduled sampling, study): an unknown
    key is an error naming it and the known ones (a typo is never ignored), a mapping under a
    field typed as a config dataclass becomes that dataclass (recursively, with the same rules),
    and a list under a ``tuple[X, ...]`` field becomes a tuple of X. ``where`` names the place in
    the file for error messages (e.g. ``study.methods[1].scheduled_sampling``).
    """
    where = where or cls.__name__
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} keys, got {d!r:.80}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = sorted(f.name for f in fields)
    unknown = sorted((k for k in d if k not in known), key=str)
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; known keys are {known}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where} needs {'keys' if len(missing) > 1 else 'key'} {missing}; known keys are {known}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if where == cls.__name__ or str(e).startswith(where):
            raise
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{where}: {e}") from None


PRESETS: dict[str, ModelConfig] = {
    # For tests: compiles in seconds, still has every moving part (2 layers, GQA-capable widths).
    "tiny": ModelConfig(vocab_size=256, max_len=64, n_layers=2, n_heads=4, d_model=32),
    # nanoGPT's "baby GPT" for shakespeare_char (config/train_shakespeare_char.py).
    "shakespeare-char": ModelConfig(
        vocab_size=65, max_len=256, n_layers=6, n_heads=6, d_model=384, dropout=0.2, use_bias=False
    ),
    # nanoGPT's CPU variant of the same run: small enough for a laptop in minutes.
    "shakespeare-char-cpu": ModelConfig(vocab_size=65, max_len=64, n_layers=4, n_heads=4, d_model=128, use_bias=False),
    # The byte-level demo model: trains on 2 CPU cores in a few minutes.
    "demo": ModelConfig(vocab_size=256, max_len=128, n_layers=4, n_heads=4, d_model=128, use_bias=False),
    "gpt2-small": ModelConfig(vocab_size=50257, max_len=1024, n_layers=12, n_heads=12, d_model=768),
    # A small Llama-style model: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head.
    "llama-small": ModelConfig(
        vocab_size=32000,
        max_len=2048,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        d_model=512,
        pos="rope",
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
    ),
}


def from_dict(d: dict[str, Any]) -> ModelConfig:
    """Strict: an unknown key is an error (a typo must never be silently ignored)."""
    return strict_from_dict(ModelConfig, d)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with strict overrides, e.g. ``get_config("tiny", n_kv_heads=2)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
