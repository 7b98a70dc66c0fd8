"""Meshes and shardings: the mesh a run config names, the logical axes of every parameter, one rules table.

A mesh has three named axes, ``("data", "fsdp", "model")``: the batch is split over ``data`` and
``fsdp`` together, parameters over ``fsdp`` (their model width, fully sharded data parallelism) and
over ``model`` (heads, MLP width and vocabulary, tensor parallelism). ``mesh: {data: -1, model: 2}``
(YAML) or ``--mesh data=-1,model=2`` (CLI): ``-1`` takes the devices left over.

Every parameter has logical axis names (``logical_axes``: its row of the one table of parameter roles,
``arjax.model.params.ROLES``), and ONE rules table per preset maps logical names to mesh axes:

    preset    embed   heads/kv_heads/mlp/vocab   what it is
    dp        -       -                          parameters replicated, batch split
    fsdp      fsdp    -                          parameters and optimizer state split by model width
    tp        -       model                      Megatron-style tensor parallelism
    fsdp_tp   fsdp    model                      both

The default preset (``auto``) is ``fsdp_tp``'s table: an axis of size 1 shards nothing, so it is
data parallelism on ``{data: N}``, FSDP on ``{fsdp: N}``, and so on. KV heads that do not divide the
``model`` axis (4 query heads in 2 KV groups on model=4) are replicated rather than split: each
device then holds every key/value head and computes its own query heads against them.

JAX does the rest (GSPMD): the step is jitted with these shardings in and out, and XLA inserts
the collectives. Nothing here moves data by hand.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from arjax.model.params import role

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism with sharded weights

PRESETS: dict[str, dict[str, str]] = {
    "dp": {},
    "fsdp": {"embed": "fsdp"},
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tp": {"embed": "fsdp", "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
}
PRESET_NAMES = ("auto", *PRESETS)


# ----------------------------------------------------------------------------- the mesh


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}`` (the CLI's ``--mesh``); checked like a YAML mesh."""
    spec: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, eq, value = part.partition("=")
        if not eq or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(
                f"--mesh {text!r}: {part!r} is not AXIS=SIZE; write e.g. --mesh data=4,model=2 "
                f"(axes {', '.join(AXES)}; -1 takes the devices left over)"
            )
        if name.strip() in spec:
            raise ValueError(f"--mesh {text!r} names {name.strip()!r} twice; name each axis once")
        spec[name.strip()] = int(value)
    if not spec:
        raise ValueError(f"--mesh {text!r} names no axis; write e.g. --mesh data=-1 or --mesh data=4,model=2")
    return check_mesh_spec(spec, where="--mesh")


def check_mesh_spec(spec: Mapping[str, Any] | None, where: str = "mesh") -> dict[str, int]:
    """The mesh a config names, checked: known axes, whole sizes >= 1 or -1 (at most one -1)."""
    if spec is None:
        return {"data": -1}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} is {spec!r}; write a mapping of axis sizes, e.g. {{data: -1, fsdp: 1, model: 1}}")
    out = {}
    for name, size in spec.items():
        if name not in AXES:
            raise ValueError(f"{where} has an unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (size == -1 or 1 <= size < 2**31):
            raise ValueError(
                f"{where}.{name}={size!r}; use a whole number of devices >= 1, or -1 for the devices left over"
            )
        out[name] = int(size)
    if sum(1 for v in out.values() if v == -1) > 1:
        raise ValueError(f"{where} {out} has -1 on more than one axis; give every axis but one a size")
    return out


def mesh_shape(spec: Mapping[str, Any] | None, n_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, model) sizes of ``spec`` on ``n_devices`` devices; an error if they do not fit."""
    spec = check_mesh_spec(spec)
    sizes = [spec.get(a, 1) for a in AXES]
    known = math.prod(s for s in sizes if s != -1)
    named = " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(
                f"mesh {named}: the other axes take {known} devices, which does not divide the {n_devices} "
                f"available; make the product of the fixed axes a divisor of {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    elif known != n_devices:
        raise ValueError(
            f"mesh {named} needs {known} devices but {n_devices} are available; make the product "
            f"{n_devices}, or put -1 on one axis to take the devices left over (e.g. data=-1)"
        )
    return tuple(sizes)


def make_mesh(spec: Mapping[str, Any] | None = None, devices=None, *, allow_fewer: bool = False) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: every device of every process) with axes data, fsdp, model.

    ``allow_fewer`` (decoding): a mesh of fixed sizes smaller than the device count uses the first
    devices rather than being an error.
    """
    devices = jax.devices() if devices is None else list(devices)
    spec = check_mesh_spec(spec)
    wanted = math.prod(spec.values())
    if allow_fewer and -1 not in spec.values() and wanted < len(devices):
        devices = devices[:wanted]
    shape = mesh_shape(spec, len(devices))
    if devices == jax.devices():  # the topology-aware device order (ICI rings on TPU)
        return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES)


# ----------------------------------------------------------------------------- logical axes


def logical_axes(path) -> tuple[str | None, ...]:
    """The logical axis names of the parameter at ``path`` (e.g. ``blocks/0/attn/q/kernel``): its row
    of the one parameter table, ``arjax.model.params.ROLES``. A norm's ``[d_model]`` vector is split
    by FSDP only (``embed``): under tensor parallelism it is too small to matter."""
    return role(path).axes


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh and the rules that place every array on it; hashable, so jitted steps are cached by it."""

    mesh: Mesh
    preset: str  # a key of PRESETS
    rules: tuple[tuple[str, str], ...]  # logical axis -> mesh axis (only those in use)
    head_dim: int = 1  # a "heads"/"kv_heads" dimension is heads x head_dim: it splits by whole heads

    @property
    def data_size(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> P:
        """The PartitionSpec of an array with these logical axes; an axis that does not divide is kept whole."""
        rules = dict(self.rules)
        out = []
        for i, name in enumerate(logical):
            axis = rules.get(name)
            units = 1 if shape is None else shape[i] // (self.head_dim if name in ("heads", "kv_heads") else 1)
            if axis is not None and shape is not None and units % self.mesh.shape[axis]:
                axis = None  # e.g. 2 KV heads on model=4: replicated (see the module docstring)
            out.append(axis)
        return P(*out)

    def param_shardings(self, params):
        """A tree like ``params`` (an nnx State or a pure dict) of NamedShardings, by logical axes."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, self.spec(logical_axes(path), x.shape)), params
        )

    def opt_shardings(self, tx, abstract_opt_state, param_shardings):
        """Shardings for ``tx``'s state: moments like their parameters, counters replicated."""
        import optax

        return optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt_state, param_shardings, transform_non_params=lambda _: self.replicated
        )

    def batch_sharding(self, ndim: int = 3, axis: int = 1) -> NamedSharding:
        """Rows split over data x fsdp: axis 1 of the train step's [A, B, T+1], axis 0 of [B, T]."""
        spec = [None] * ndim
        spec[axis] = BATCH_AXES
        return NamedSharding(self.mesh, P(*spec))


def make_plan(
    mesh: Mapping[str, Any] | None = None,
    preset: str | None = None,
    *,
    model_cfg=None,
    batch_size: int | None = None,
    devices=None,
    allow_fewer: bool = False,
    check_model: bool = True,
) -> Plan:
    """The mesh and rules of a run, checked against the model and the batch before anything compiles.

    ``check_model=False`` (decoding a trained model): sizes that do not split over the model axis
    (a 65-character vocabulary) are kept whole on every device instead of refused.
    """
    preset = preset or "auto"
    if preset not in PRESET_NAMES:
        raise ValueError(f"sharding: {preset!r} is not a preset; choose one of {', '.join(PRESET_NAMES)}")
    m = make_mesh(mesh, devices, allow_fewer=allow_fewer)
    sizes = dict(m.shape)
    name = "fsdp_tp" if preset == "auto" else preset
    rules = PRESETS[name]
    used = {"data", "fsdp"} | set(rules.values())
    unused = [a for a in AXES if sizes[a] > 1 and a not in used]
    if unused:
        raise ValueError(
            f"sharding: {preset} does not use the mesh axis {unused[0]}={sizes[unused[0]]}; use sharding: "
            "auto, or a preset that uses it (fsdp_tp uses every axis)"
        )
    idle = [a for a in sorted(set(rules.values())) if sizes[a] == 1]
    if preset != "auto" and rules and len(idle) == len(set(rules.values())):
        # e.g. --sharding fsdp on the default mesh: it would quietly train data parallel
        raise ValueError(
            f"sharding: {preset} shards over the mesh axis {idle[0]}, which has size 1 here "
            f"({' x '.join(f'{a}={sizes[a]}' for a in AXES)}); give it devices, e.g. --mesh {idle[0]}=-1"
        )
    if batch_size is not None:
        check_batch_fits(batch_size, sizes)
    if model_cfg is not None and check_model:
        check_model_fits(model_cfg, sizes, rules)
    head_dim = 1 if model_cfg is None else model_cfg.dim_per_head
    return Plan(mesh=m, preset=name, rules=tuple(sorted(rules.items())), head_dim=head_dim)


def cache_sharding(mesh: Mesh, batch_size: int, n_kv_heads: int) -> NamedSharding:
    """Where a KV cache [B, Hkv, S, Dh] lives on ``mesh``: rows over the batch axes, KV heads over
    ``model``, each only when it divides (else that axis is kept whole on every device)."""
    names = mesh.axis_names
    batch = tuple(a for a in BATCH_AXES if a in names and mesh.shape[a] > 1)
    if batch and batch_size % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    heads = "model" if "model" in names and n_kv_heads % mesh.shape["model"] == 0 else None
    return NamedSharding(mesh, P(batch or None, heads, None, None))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` are laid out on (None: a single device or no NamedSharding)."""
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def placement(tree) -> jax.sharding.Sharding:
    """Where host arrays that run beside ``tree``'s arrays (a model's parameters) belong: replicated
    over their mesh, or on their one device.

    Taken from the mesh, never from one leaf's sharding: a leaf's ``NamedSharding`` carries that
    leaf's rank (``P(None, None)`` for a 2-D kernel) and cannot place an array of another rank.
    """
    mesh = mesh_of(tree)
    if mesh is not None:
        return NamedSharding(mesh, P())
    for x in jax.tree.leaves(tree):
        devices = getattr(getattr(x, "sharding", None), "device_set", None)
        if devices:
            return jax.sharding.SingleDeviceSharding(next(iter(devices)))
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def single_device_plan() -> Plan:
    """Everything on the first local device: where a checkpoint loads when no mesh is asked for."""
    return make_plan({"data": 1}, "dp", devices=[jax.local_devices()[0]])


def check_batch_fits(batch_size: int, sizes: Mapping[str, int]) -> None:
    """Each micro-batch splits evenly over the data axes (data x fsdp)."""
    dp = sizes.get("data", 1) * sizes.get("fsdp", 1)
    if batch_size % dp:
        raise ValueError(
            f"batch_size={batch_size} does not split over data x fsdp = {sizes.get('data', 1)} x "
            f"{sizes.get('fsdp', 1)} = {dp} devices; use a batch_size that is a multiple of {dp}, or a mesh "
            "with fewer data devices"
        )


def check_model_fits(model_cfg, sizes: Mapping[str, int], rules: Mapping[str, str]) -> None:
    """Heads, MLP width and vocabulary must split evenly over the model axis (d_model over fsdp)."""
    tp, fsdp = sizes.get("model", 1), sizes.get("fsdp", 1)
    checks = []
    if rules.get("heads") == "model":
        checks += [
            ("n_heads", model_cfg.n_heads, tp, "model"),
            ("MLP width d_ff", model_cfg.ff_dim, tp, "model"),
            ("vocab_size", model_cfg.vocab_size, tp, "model"),
        ]
    if rules.get("embed") == "fsdp":
        checks.append(("d_model", model_cfg.d_model, fsdp, "fsdp"))
    for what, n, k, axis in checks:
        if n % k:
            fix = {
                "vocab_size": f"set model_overrides: {{vocab_size: {-(-n // k) * k}}} (a multiple of {k}; the extra "
                "rows are never a token)"
            }.get(what, f"choose {axis} among the divisors of {n}")
            raise ValueError(f"{what}={n} does not split over {axis}={k}; {fix}, or another mesh")


def describe(plan: Plan) -> str:
    """One line for the progress log: ``mesh data=4 x fsdp=1 x model=2 (8 devices), sharding fsdp_tp``."""
    s = plan.mesh.shape
    return (
        f"mesh {' x '.join(f'{a}={s[a]}' for a in AXES)} ({plan.mesh.size} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}), sharding {plan.preset}"
    )


def constrain_rows(x: jax.Array) -> jax.Array:
    """Activations [B, ...] with rows over the batch axes and everything else whole, when a mesh with
    those axes is in context (``jax.set_mesh``: the sharded train step); otherwise ``x`` unchanged.

    Without it XLA lets FSDP's width-split weights pull the residual stream onto the fsdp axis and
    then has to undo that in the backward pass (an "involuntary full rematerialization").
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


# ----------------------------------------------------------------------------- arrays


def host_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The indices along ``axis`` that this process's devices hold, sorted: the rows it must load.

    Not always one block: on a slice whose hosts each hold chips of several data groups (a 2 x 2
    host block of a 4 x 8 torus), a host's rows come in several runs.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = index[axis].indices(shape[axis])
        rows.update(range(start, stop))
    return np.array(sorted(rows), np.int64)


def global_array(sharding: NamedSharding, shape: tuple[int, ...], local: np.ndarray) -> jax.Array:
    """The global array of ``shape`` from this process's rows of it (``host_rows``, in that order)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, shape)


def replicate(tree, sharding: NamedSharding):
    """Every leaf (a host value, the same on every process) as a global array replicated by ``sharding``."""

    def one(x):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- many hosts


def init_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """``jax.distributed.initialize`` when this is one process of many; True if it ran.

    Given a coordinator ``host:port`` with the process count and this process's id (the CLI's
    ``--coordinator/--num-processes/--process-id``, or ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), those are used. On a TPU pod slice (several TPU
    workers) JAX finds them itself. A single host needs nothing. Call it before any other JAX call.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")

    def from_env(name: str):
        value = os.environ.get(name)
        if not value:
            return None
        if not re.fullmatch(r"\d+", value.strip()):
            raise ValueError(f"{name}={value!r} is not a whole number; set it to e.g. 2, or unset it")
        return int(value)

    num_processes = num_processes if num_processes is not None else from_env("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else from_env("JAX_PROCESS_ID")
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "a multi-process run needs all three of --coordinator HOST:PORT, --num-processes N and "
            "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        )
    if all(given):
        if not re.fullmatch(r"([^:\s\[\]]+|\[[0-9a-fA-F:.]+\]):\d{1,5}", coordinator):
            raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT; e.g. --coordinator 10.0.0.1:1234")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process-id {process_id} with --num-processes {num_processes}: the id must be in "
                f"0..{max(num_processes - 1, 0)} and the count >= 1"
            )
        if num_processes == 1 or jax.distributed.is_initialized():
            return False
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if _tpu_slice_processes() > 1 and not jax.distributed.is_initialized():  # JAX reads the slice's topology itself
        jax.distributed.initialize()
        return True
    return False


def _tpu_slice_processes() -> int:
    """How many hosts this Cloud TPU slice has (1 elsewhere), by JAX's own cluster detection: the
    TPU VM metadata server on GCE, TPU_WORKER_HOSTNAMES on GKE. Private JAX API, so guarded: if it
    moves, a pod needs --coordinator/--num-processes/--process-id (untested on real slices here)."""
    try:
        from jax._src.clusters import cloud_tpu_cluster as tpu
    except ImportError:
        return 1
    for cluster in (getattr(tpu, "GkeTpuCluster", None), getattr(tpu, "GceTpuCluster", None)):
        try:
            if cluster is not None and cluster.is_env_present():
                return int(cluster.get_process_count())
        except Exception:  # noqa: BLE001 (a best-effort probe of a private JAX API: no metadata server, a changed signature)
            continue
    return 1


def sync(name: str) -> None:
    """Wait until every process reaches this point (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    """Only process 0 draws progress, writes logs and the tokenizer."""
    return jax.process_index() == 0
