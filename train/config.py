"""The run config: a frozen keyword-only `TrainConfig`, and the one YAML loader (strict keys and
types) for every config file."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Literal

import yaml

from arjax.model.config import (
    ANY_INT,
    NON_NEGATIVE,
    POSITIVE,
    ModelConfig,
    bounds,
    check_field_types,
    get_config,
    strict_from_dict,
)
from arjax.model.sharding import check_mesh_spec
from arjax.train.exposure.scheduled_sampling import ScheduledSamplingConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs besides the output directory. Defaults suit a tiny CPU run."""

    # Model: a preset from arjax.model.config.PRESETS plus strict overrides (e.g. {dropout: 0.1}).
    model: str = "demo"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    # Data: a UTF-8 text file, a directory written by `arjax data prepare` (token shards + manifest +
    # tokenizer), or None for the bundled default corpus (CPython's pydoc topics).
    data: str | None = None
    # Bytes that are not UTF-8: "strict" refuses the file (naming the byte offset), "replace" reads them as U+FFFD.
    data_errors: Literal["strict", "replace"] = "strict"
    # the last fraction of the tokens is validation
    val_fraction: float = dataclasses.field(default=0.1, metadata=bounds(0, 1, lo_open=True, hi_open=True))
    tokenizer: Literal["byte", "char", "hf"] = "byte"
    tokenizer_path: str | None = None  # directory of a Hugging Face tokenizer (kind "hf" only)
    # Batches: batch_size windows of seq_len tokens per micro-batch; accum_steps micro-batches per update.
    batch_size: int = dataclasses.field(default=16, metadata=POSITIVE)
    seq_len: int | None = dataclasses.field(default=None, metadata=POSITIVE)  # None: the model's max_len
    accum_steps: int = dataclasses.field(default=1, metadata=POSITIVE)
    steps: int = dataclasses.field(default=1000, metadata=POSITIVE)  # optimizer updates
    # Optimizer: AdamW, linear warmup then cosine decay to min_lr at lr_decay_steps (None: steps).
    lr: float = dataclasses.field(default=1e-3, metadata=POSITIVE)
    warmup_steps: int = dataclasses.field(default=100, metadata=NON_NEGATIVE)
    lr_decay_steps: int | None = dataclasses.field(default=None, metadata=POSITIVE)
    min_lr: float = dataclasses.field(default=1e-4, metadata=NON_NEGATIVE)
    weight_decay: float = dataclasses.field(default=0.1, metadata=NON_NEGATIVE)
    beta1: float = dataclasses.field(default=0.9, metadata=bounds(0, 1, hi_open=True))
    beta2: float = dataclasses.field(default=0.95, metadata=bounds(0, 1, hi_open=True))
    # global-norm clip; None turns it off
    grad_clip: float | None = dataclasses.field(
        default=1.0, metadata=bounds(0, lo_open=True, fix="use null to turn clipping off")
    )
    decay_embeddings: bool = False  # nanoGPT decays the (tied) embedding; we default to not
    # initialisation, batch sampling, dropout and scheduled-sampling coins all derive from it; any int
    seed: int = dataclasses.field(default=0, metadata=ANY_INT)
    # Evaluation, logging and checkpoints (all in optimizer steps).
    eval_interval: int = dataclasses.field(default=250, metadata=POSITIVE)
    eval_iters: int = dataclasses.field(
        default=20, metadata=POSITIVE
    )  # validation batches of batch_size windows per evaluation
    # how often the host fetches the loss (each fetch is a device sync)
    log_interval: int = dataclasses.field(default=10, metadata=POSITIVE)
    ckpt_interval: int = dataclasses.field(default=500, metadata=POSITIVE)
    max_to_keep: int = dataclasses.field(default=3, metadata=POSITIVE)
    # The objective: teacher forcing when null, else scheduled sampling with these settings
    # (method, feed, coins, schedule: arjax.train.exposure.scheduled_sampling.ScheduledSamplingConfig).
    scheduled_sampling: ScheduledSamplingConfig | None = None
    # Devices: mesh axis sizes {data, fsdp, model} (-1: the devices left over; null: data-parallel over
    # every device) and the rules preset that places parameters on it (arjax.model.sharding; null: auto).
    mesh: dict | None = None
    sharding: Literal["auto", "dp", "fsdp", "tp", "fsdp_tp"] | None = None

    def __post_init__(self):
        check_field_types(self)
        if self.mesh is not None:
            check_mesh_spec(self.mesh)
        if self.min_lr > self.lr:
            raise ValueError(
                f"TrainConfig.min_lr={self.min_lr} exceeds lr={self.lr}; the decay ends at min_lr, so use min_lr <= lr"
            )
        # A prepared directory carries its tokenizer (one that does not exist yet is reported when training starts).
        if self.tokenizer == "hf" and not self.tokenizer_path and (self.data is None or os.path.isfile(self.data)):
            raise ValueError(
                "tokenizer: hf needs tokenizer_path, a directory with a Hugging Face tokenizer.json (or data: "
                "a directory from `arjax data prepare`, which carries its tokenizer)"
            )
        model_cfg = self.model_config(vocab_size=None)  # unknown preset or bad overrides fail here, at load time
        ss = self.scheduled_sampling
        if ss is not None and model_cfg.dropout > 0 and ss.method == "sequential" and not ss.soft:
            raise ValueError(
                f"scheduled_sampling method 'sequential' with feed {ss.feed!r} runs the decoder's decode_step, which "
                f"has no dropout, but the model has dropout={model_cfg.dropout}; set model_overrides: {{dropout: 0}} "
                "or use method 'parallel'"
            )

    def model_config(self, *, vocab_size: int | None) -> ModelConfig:
        """The model this run trains; ``vocab_size`` (the tokenizer's) fills in when not overridden."""
        overrides = dict(self.model_overrides)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return get_config(self.model, **overrides)

    def context_len(self, model_cfg: ModelConfig) -> int:
        """Training window length; checked against the model's max_len."""
        T = self.seq_len or model_cfg.max_len
        if model_cfg.max_len < T:
            raise ValueError(
                f"seq_len={T} exceeds the model's max_len={model_cfg.max_len}; lower seq_len or set "
                f"model_overrides: {{max_len: {T}}}"
            )
        return T

    def replace(self, **overrides: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Strict: an unknown key is an error naming it and listing the valid keys."""
    return strict_from_dict(TrainConfig, d)


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string; read it as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """One value as the config files read it (``--set lr=1e-3``: a float, ``null``: None)."""
    return yaml.load(text, Loader=_Loader) if text else None


def load_yaml(path: str, what: str, examples: str) -> dict[str, Any]:
    """The mapping in a YAML config file; ``what`` and ``examples`` name it in errors."""
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist; see {examples} for examples") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path!r} is a directory; pass a YAML file (see {examples})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path!r} must hold a mapping of keys, got {type(d).__name__}")
    return d


def load_config(path: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML file (tpu_configs/*.yaml), then ``overrides`` (e.g. from CLI flags)."""
    d = load_yaml(path, "config file", "tpu_configs/")
    try:
        return from_dict({**d, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
