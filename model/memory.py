"""What a command will need in memory, from its settings alone, against what the host and the devices have.

Every command that allocates arrays whose size a user sets (the train step, evaluation windows, a KV
cache, engine slots, a model from a config file, a tokenizer's tables) first adds up ``Need``s and
calls ``check_needs``: too much is one ``ValueError`` naming the setting, the bytes and the limit,
raised before anything is allocated, so a mistyped batch size is a one-line error rather than a
numpy traceback, an abort in the allocator, or a process that pages for minutes.

Each need is a lower bound: it counts only arrays that certainly exist (parameters, optimizer
moments, a KV cache, one copy of the residual stream per layer ...), never temporaries a compiler
may or may not keep, so a refusal is never wrong. Whether a config that passes will really fit is
for XLA's own analysis of the compiled program (``arjax.train.loop.step_memory`` warns with it).

Limits: an accelerator's ``bytes_limit``; the host's RAM, lowered by the process's address-space
limit (``ulimit -v``) and a cgroup's ``memory.max`` when they are smaller. CPU devices share the
host's RAM, so on CPU every need, host or device, counts against the host.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from collections.abc import Sequence

import jax

from arjax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Need:
    """``nbytes`` that ``what`` takes (with the settings it comes from), and how to make it smaller.

    ``per_device``: device memory each device holds (a sharded array counts its shard); False: host
    memory (numpy arrays, a tokenizer's tables).
    """

    what: str
    nbytes: int
    fix: str
    per_device: bool = True


def device_memory_bytes(device) -> int | None:
    """Memory one device may allocate (``memory_stats()["bytes_limit"]``: HBM less the runtime's reserve), or None.

    CPU devices report no memory stats, and we return None rather than the host's RAM: the CPU
    "device" shares RAM with everything else on the host (``check_needs`` counts it there).
    """
    try:
        stats = device.memory_stats()
    except (RuntimeError, NotImplementedError):  # backends without stats may raise (XlaRuntimeError is a RuntimeError)
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def host_memory_bytes() -> int:
    """RAM this process may use: physical memory, or less under ``ulimit -v`` or a cgroup limit."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            text = f.read().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits)


def size(nbytes: float) -> str:
    """Bytes for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def check_needs(needs: Sequence[Need], devices: Sequence | None = None) -> None:
    """Raise one ValueError when ``needs`` cannot fit: it names the biggest need, its settings and the limit.

    ``devices``: where the device needs live (default: the first local device). On CPU they are
    host RAM, so every need (device needs once per device) is added up against the host; on an
    accelerator the device needs are checked against one device's memory and the host needs
    against the host.
    """
    devices = list(devices) if devices else [jax.local_devices()[0]]
    on_device = [n for n in needs if n.per_device]
    on_host = [n for n in needs if not n.per_device]
    limit = device_memory_bytes(devices[0])
    if devices[0].platform == "cpu" or limit is None:
        local = sum(d.process_index == jax.process_index() for d in devices) or 1
        scaled = [dataclasses.replace(n, nbytes=n.nbytes * local) for n in on_device]
        groups = [(scaled + on_host, host_memory_bytes(), "this host has")]
    else:
        groups = [
            (on_device, limit, f"a {devices[0].platform.upper()} device has"),
            (on_host, host_memory_bytes(), "this host has"),
        ]
    for group, have, where in groups:
        total = sum(n.nbytes for n in group)
        if total > have:
            big = max(group, key=lambda n: n.nbytes)
            rest = f" ({size(total)} in all)" if total > 1.01 * big.nbytes else ""
            raise ValueError(f"{big.what}: at least {size(big.nbytes)}{rest}, but {where} {size(have)}; {big.fix}")


# ----------------------------------------------------------------------------- models


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (two norms, attention, MLP), from the config alone."""
    D, F, hd = cfg.d_model, cfg.ff_dim, cfg.dim_per_head
    q, kv = cfg.n_heads * hd, cfg.num_kv_heads * hd
    attn = D * (q + 2 * kv) + q * D + (q + 2 * kv + D if cfg.use_bias else 0)
    mats = 3 if cfg.mlp == "swiglu" else 2
    mlp = mats * D * F + ((mats - 1) * F + D if cfg.use_bias else 0)
    return 2 * _norm_params(cfg) + attn + mlp


def param_parts(cfg: ModelConfig) -> list[tuple[str, int, str]]:
    """The model's parameter count by part: (the part with the settings that size it, count, those settings)."""
    D = cfg.d_model
    head = "" if cfg.tie_embeddings else " and the output head"
    parts = [
        (
            f"the token embedding{head} (vocab_size={cfg.vocab_size} x d_model={D})",
            cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2),
            "vocab_size or d_model",
        )
    ]
    if cfg.pos == "learned":
        parts.append((f"the position table (max_len={cfg.max_len} x d_model={D})", cfg.max_len * D, "max_len"))
    parts.append(
        (
            f"n_layers={cfg.n_layers} blocks of d_model={D}, d_ff={cfg.ff_dim}",
            cfg.n_layers * block_params(cfg) + _norm_params(cfg),
            "n_layers, d_model or d_ff",
        )
    )
    return parts


def param_count(cfg: ModelConfig) -> int:
    """Parameter count, by arithmetic (no model is built, even abstractly: a config of 2**31 layers
    is counted at once)."""
    return sum(n for _, n, _ in param_parts(cfg))


PARAM_BYTES = 4  # parameters stay float32 whatever the compute dtype (ModelConfig.dtype)


def param_needs(
    cfg: ModelConfig,
    *,
    copies: int = 1,
    shards: int = 1,
    what: str = "the parameters",
    settings: str = "",
    shardable: bool = False,
) -> list[Need]:
    """The model's float32 parameters (``copies``: 4 in training: weights, gradients and AdamW's two
    moments), split over ``shards`` devices; one Need per part, so the error names the setting that is
    too big (``settings``: where the user sets it, e.g. ``model.`` for a run config's overrides;
    ``shardable``: the fix may suggest sharding the weights over a mesh)."""

    def fix(knobs: str) -> str:
        named = " or ".join(
            ", ".join(f"{settings}{k}" for k in knobs.replace(" or ", ", ").split(", ")).rsplit(", ", 1)
        )
        return f"lower {named}" + (", or shard the weights over more devices (mesh fsdp or model)" if shardable else "")

    return [
        Need(f"{what} of {name}", n * PARAM_BYTES * copies // shards, fix(knobs)) for name, n, knobs in param_parts(cfg)
    ]


def loaded_needs(tree, what: str = "the weights", shards: int = 1) -> list[Need]:
    """Arrays already in memory (a loaded model's state, int8 or float): their exact bytes, over ``shards`` devices."""
    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))
    return [Need(f"{what} ({size(nbytes)}, loaded)", nbytes // shards, "use a smaller or quantized model")]


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype: str | None = None) -> int:
    """Bytes of a KV cache of ``batch`` rows x ``length`` slots (keys and values, every layer; int8
    adds a float32 scale per token and head)."""
    dtype = dtype or cfg.dtype
    cells = 2 * cfg.n_layers * batch * cfg.num_kv_heads * length
    if dtype == "int8":
        return cells * (cfg.dim_per_head + 4)
    return cells * cfg.dim_per_head * jax.numpy.dtype(dtype).itemsize


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, *, layers: int | None = None) -> int:
    """One copy of the residual stream [batch, seq_len, d_model] per layer (``layers``; default all):
    what the backward pass keeps at least, whatever the rematerialisation."""
    layers = cfg.n_layers if layers is None else layers
    return batch * seq_len * cfg.d_model * layers * jax.numpy.dtype(cfg.dtype).itemsize


def shards_of(mesh_shape: dict[str, int], axes: Sequence[str]) -> int:
    """How many ways ``axes`` of a mesh split an array (1 for axes the mesh does not have)."""
    return math.prod(mesh_shape.get(a, 1) for a in axes)


__all__ = [
    "Need",
    "activation_bytes",
    "block_params",
    "check_needs",
    "device_memory_bytes",
    "host_memory_bytes",
    "kv_cache_bytes",
    "loaded_needs",
    "param_count",
    "param_needs",
    "param_parts",
    "shards_of",
    "size",
]
