"""Model configuration: a frozen, keyword-only dataclass, named presets, and strict overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that determines the parameter shapes and the forward computation.

    Widths follow the usual names: ``d_model`` is the residual width, ``d_ff`` the MLP hidden
    width, ``n_kv_heads < n_heads`` turns on grouped-query attention.
    """

    vocab_size: int
    max_len: int  # longest sequence (positions) the model is built for
    n_layers: int
    n_heads: int
    d_model: int
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 * d_model (gelu) or the Llama 8/3 rule rounded to 64 (swiglu)
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True  # biases in attention/MLP projections and LayerNorm (GPT-2 yes, Llama no)
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype; params stay fp32
    init_std: float = 0.02

    def __post_init__(self):
        check_field_types(self)
        for name in ("vocab_size", "max_len", "n_layers", "n_heads", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.num_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.num_kv_heads}; "
                "grouped-query attention shares each kv head among n_heads // n_kv_heads query heads"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.pos == "rope" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

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

    def replace(self, **overrides: Any) -> "ModelConfig":
        return from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _allowed(hint) -> tuple[tuple[type, ...], tuple | None]:
    """(accepted Python types, Literal choices or None) for one field annotation."""
    if typing.get_origin(hint) is Literal:
        return (str,), typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    accepted: list[type] = []
    for a in typing.get_args(hint) if union else (hint,):
        if a is float:
            accepted += [int, float]  # YAML and JSON write 1 for 1.0
        else:
            accepted.append(typing.get_origin(a) or a)
    return tuple(accepted), None


def check_field_types(obj) -> None:
    """Every field of a config dataclass holds a value of its annotated type, or raise naming it.

    The one type check behind every strict config (model, run, scheduled sampling): ``bool`` is
    not accepted for an ``int`` (a YAML ``true`` for ``steps`` is a mistake, not 1), and
    ``Literal`` fields must hold one of their choices.
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


def strict_from_dict(cls, d: dict[str, Any]):
    """Build config dataclass ``cls`` from ``d``; an unknown key is an error (a typo is never ignored)."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {known}")
    return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # For tests: compiles in seconds, still has every moving part (2 layers, GQA-capable widths).
    "tiny": ModelConfig(vocab_size=256, max_len=64, n_layers=2, n_heads=4, d_model=32),
    # nanoGPT's "baby GPT" for shakespeare_char (config/train_shakespeare_char.py).
    "shakespeare-char": ModelConfig(
        vocab_size=65, max_len=256, n_layers=6, n_heads=6, d_model=384, dropout=0.2, use_bias=False
    ),
    # nanoGPT's CPU variant of the same run: small enough for a laptop in minutes.
    "shakespeare-char-cpu": ModelConfig(
        vocab_size=65, max_len=64, n_layers=4, n_heads=4, d_model=128, use_bias=False
    ),
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
