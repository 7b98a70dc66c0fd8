"""Checkpoints with orbax, verified: params, optimizer state, the run's configs and a fingerprint of every array.

A run directory holds ``checkpoints/<step>/`` (orbax: written to a temporary folder and renamed
when complete, so a save interrupted midway is never a checkpoint), ``tokenizer/`` and
``metrics.jsonl``, so ``arjax generate --ckpt DIR`` needs nothing but DIR.

Every save records a fingerprint of each array in the checkpoint's metadata; every load computes
them again on what it read. A checkpoint that cannot be read (a truncated or deleted array file,
missing metadata) or whose arrays differ from their fingerprints (flipped bytes) is *damaged*:
loaders then fall back to the newest intact checkpoint, with one warning naming the damaged step,
which stays on disk (``train --resume`` moves it aside, into ``damaged/``, so the run can save that
step again). ``verify(run_dir)`` checks every checkpoint (``arjax checkpoints RUN``). A training
run is resumed behind the guards at the end of this file (``check_resume``: checkpoints exactly when
resuming; ``check_same_run``: the same model and run config, up to ``RESUMABLE_KEYS``). What orbax,
absl and asyncio would print about a damaged or incomplete checkpoint (tracebacks of the reads a
failed restore abandons, "Metadata file does not exist" per read) stays off stderr: that one
warning says it (``ARJAX_DEBUG=1`` lets the libraries speak).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from arjax.model import sharding
from arjax.model.config import ModelConfig
from arjax.model.config import from_dict as model_config_from_dict
from arjax.model.params import path_str
from arjax.model.transformer import Transformer
from arjax.train import config as train_config
from arjax.train.tokenizer import load_tokenizer

CKPT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 2  # 2: meta["fingerprints"] holds a fingerprint of every array, meta["meta_sha256"] of meta itself


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped (or one predates fingerprints and was loaded unverified)."""


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be read back as it was written."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), CKPT_SUBDIR)


def tokenizer_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), TOKENIZER_SUBDIR)


def make_manager(run_dir: str, *, max_to_keep: int | None = None, create: bool = True) -> ocp.CheckpointManager:
    """The orbax manager of a run. A writer (``create``) clears the temporary folders of saves that
    were interrupted (killed, disk full); they were never checkpoints."""
    # Synchronous: the next train step donates (reuses) the params buffers a background save would read.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False, cleanup_tmp_directories=create
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def all_steps(run_dir: str) -> list[int]:
    """Every (complete) checkpoint step of ``run_dir``, oldest first; nothing is created."""
    if not os.path.isdir(checkpoint_dir(run_dir)):
        return []
    with _orbax_reading():
        return sorted(make_manager(run_dir, create=False).all_steps())


def _check_run_dir(run_dir: Any, *, exists: bool = True) -> None:
    """``run_dir`` names a run directory, or an error saying what it is instead (not a path, a file, nothing)."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir={run_dir!r} is not a path; pass the run directory (`arjax train --out DIR`) as a str")
    if not os.fspath(run_dir):
        raise ValueError("run_dir is empty; pass the run directory (`arjax train --out DIR`)")
    where = os.fspath(run_dir)
    if os.path.exists(where) and not os.path.isdir(where):
        raise ValueError(f"{where!r} is a file, not a run directory; pass the --out directory of `arjax train`")
    if exists and not os.path.isdir(where):
        raise ValueError(f"checkpoint directory {where!r} does not exist; pass the --out directory of `arjax train`")


# ----------------------------------------------------------------------------- fingerprints


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, one per element (narrower types widened, wider split)."""
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 8-byte types: [n, 2] words


@jax.jit
def _fingerprint_arrays(arrays: list[jax.Array]) -> list[jax.Array]:
    """Two position-weighted sums mod 2**32 of each array's words -> [len(arrays), 2] uint32.

    The weights are odd, so any single flipped bit changes the first sum; the second mixes the
    words first, so that swaps and most multi-bit changes move it too. Integer sums wrap exactly
    and commute, so the result does not depend on how the array is laid out or sharded: it is the
    same on any mesh (a checkpoint can be verified on other devices than wrote it).
    """
    out = []
    for x in arrays:
        w = _words(x)
        i = jnp.arange(w.shape[0], dtype=jnp.uint32)
        m1 = (i * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
        m2 = ((i ^ jnp.uint32(0x85EBCA6B)) * jnp.uint32(0xC2B2AE35)) | jnp.uint32(1)
        mixed = (w ^ (w >> 15)) * jnp.uint32(0x2C1B3C6D)
        out.append(jnp.stack([jnp.sum(w * m1, dtype=jnp.uint32), jnp.sum(mixed * m2, dtype=jnp.uint32)]))
    return out


def fingerprints(tree) -> dict[str, str]:
    """``{path: fingerprint}`` for every array leaf of ``tree`` (e.g. ``blocks/0/attn/q/kernel``)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return {}
    sums = jax.device_get(_fingerprint_arrays([jnp.asarray(x) for _, x in leaves]))
    return {path_str(p): f"{int(s[0]):08x}{int(s[1]):08x}" for (p, _), s in zip(leaves, sums)}


def _check_fingerprints(item: str, restored, recorded: dict[str, str]) -> None:
    got = fingerprints(restored)
    if set(got) != set(recorded):
        raise DamagedCheckpoint(
            f"{item} holds arrays {sorted(set(got) ^ set(recorded))[:3]} its metadata does not list"
        )
    bad = [k for k in recorded if got[k] != recorded[k]]
    if bad:
        raise DamagedCheckpoint(f"{len(bad)} array(s) of {item} differ from their fingerprints, e.g. {bad[0]!r}")


# ----------------------------------------------------------------------------- writing


def save(manager: ocp.CheckpointManager, step: int, *, params, opt_state=None, meta: dict[str, Any]) -> None:
    """Save after ``step`` optimizer updates. ``meta`` is JSON: at least ``model_config``; a training
    run adds its ``train_config``, seed and data position, a conversion its source.

    Params are stored as a nested dict of arrays named like the model (readable by other tools);
    the optimizer state (absent for converted weights) as its flat list of leaves, rebuilt on
    restore from a fresh ``tx.init``. The fingerprint of every array goes into ``meta``.
    """
    pure = nnx.to_pure_dict(params)
    items = {"params": ocp.args.StandardSave(pure)}
    prints = {"params": fingerprints(pure)}
    if opt_state is not None:
        leaves = jax.tree.leaves(opt_state)
        items["opt_state"] = ocp.args.StandardSave(leaves)
        prints["opt_state"] = fingerprints(leaves)
    meta = {"format": FORMAT_VERSION, "step": step, **meta, "fingerprints": prints}
    meta["meta_sha256"] = _meta_digest(meta)
    items["meta"] = ocp.args.JsonSave(meta)
    try:
        manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore reports a full disk as a ValueError; say what it is
        text = str(e)
        if (
            isinstance(e, OSError)
            or "No space left" in text
            or "os_error_code='28'" in text
            or "os_error_code='13'" in text
        ):
            code = getattr(e, "errno", None) or (errno.EACCES if "os_error_code='13'" in text else errno.ENOSPC)
            raise OSError(code, os.strerror(code), os.path.join(str(manager.directory), str(step))) from None
        raise


# ----------------------------------------------------------------------------- reading


def _candidates(run_dir: str, step: int | None) -> list[int]:
    """The checkpoint steps to try, newest first (or just ``step``); an error when there are none."""
    _check_run_dir(run_dir, exists=False)
    steps = all_steps(run_dir)
    if not steps:
        raise ValueError(
            f"no checkpoint in {run_dir!r} (looked in {checkpoint_dir(run_dir)}); "
            f"train first with `arjax train --out {run_dir}`"
        )
    return [step] if step is not None else steps[::-1]


def read_meta(run_dir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the given checkpoint, or of the newest one whose metadata reads (no array is read)."""
    candidates = _candidates(run_dir, step)
    reasons = []
    for s in candidates:
        try:
            return s, _read_meta(run_dir, s)
        except DamagedCheckpoint as e:
            reasons.append(f"step {s}: {e}")
    raise ValueError(f"no readable checkpoint metadata in {run_dir!r}: {'; '.join(reasons)}")


def _read_meta(run_dir: str, step: int) -> dict[str, Any]:
    if step not in all_steps(run_dir):
        raise ValueError(f"{run_dir!r} has no checkpoint at step {step}; it has {all_steps(run_dir)}")
    try:
        with _orbax_reading():
            meta = make_manager(run_dir, create=False).restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
    except Exception as e:  # noqa: BLE001 (orbax raises many types for missing or garbled files)
        raise DamagedCheckpoint(f"its metadata cannot be read ({_short(e)})") from None
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise DamagedCheckpoint("its metadata has no model_config")
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise DamagedCheckpoint(f"its metadata has format {fmt!r}; this arjax reads formats up to {FORMAT_VERSION}")
    if fmt >= 2 and (meta.get("meta_sha256") != _meta_digest(meta) or "fingerprints" not in meta):
        raise DamagedCheckpoint("its metadata differs from its checksum (edited or corrupted)")
    return meta


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata itself (every key but this one, canonical JSON): an edited config is damage too."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _short(e: Exception) -> str:
    """One short line for an orbax/tensorstore error: its first sentence and the array it names."""
    text = " ".join(str(e).split())
    arrays = re.findall(r"'path': '([^'/][^']*)/'", text)  # tensorstore names the array's own folder
    text = text.split(" See full TensorStore details")[0]
    text = text[:160].rstrip(".") + ("..." if len(text) > 160 else "")
    return text + (f"; array {arrays[-1]}" if arrays else "")


class _OrbaxNoise(logging.Filter):
    """On the absl and asyncio loggers while orbax reads: its "Metadata file does not exist", said once
    per read of a checkpoint whose own ``_CHECKPOINT_METADATA`` is gone (arjax needs only its ``meta``
    item, which it verifies), and asyncio's "exception was never retrieved" or "destroyed but it is
    pending" for the reads orbax abandons when one fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "absl":
            return not str(record.msg).startswith("Metadata file does not exist")
        text = record.getMessage()
        abandoned = "never retrieved" in text or "destroyed but it is pending" in text
        return not (abandoned and ("/orbax/" in text or "TensorStore" in text))


_NOISE = _OrbaxNoise()


def _late_read(unraisable) -> bool:
    """A read that a failed restore abandoned, finishing after orbax closed its event loop."""
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )


@contextlib.contextmanager
def _orbax_reading():
    """Around each orbax read: what orbax, absl and asyncio would print about what arjax checks and
    reports itself (in one warning, or one error) stays off stderr; ARJAX_DEBUG=1 lets it through."""
    if os.environ.get("ARJAX_DEBUG"):
        yield
        return
    loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
    outermost = _NOISE not in loggers[0].filters
    for logger in loggers:
        logger.addFilter(_NOISE)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if _late_read(unraisable) else hook(unraisable)
    try:
        yield
    except Exception:
        _drop_orbax_leftovers()
        raise
    finally:
        sys.unraisablehook = hook
        if outermost:
            for logger in loggers:
                logger.removeFilter(_NOISE)


def _drop_orbax_leftovers() -> None:
    """When one array of a checkpoint fails to read, orbax closes its event loop with the reads of the
    others still pending: each would print a traceback later (when it finishes, when it is collected,
    at exit), long after arjax said in one line that the checkpoint is damaged. End them now, quietly."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        # Before any collection: a task collected with its exception unread is logged (by asyncio, not the hook).
        with warnings.catch_warnings():  # isinstance on every live object wakes lazy and deprecated proxies (torch's)
            warnings.simplefilter("ignore")
            futures = [
                obj for obj in gc.get_objects() if isinstance(obj, asyncio.Future) and obj.get_loop().is_closed()
            ]
        loops = {
            id(f.get_loop()): f.get_loop()
            for f in futures
            if isinstance(f, asyncio.Task)
            and "orbax" in getattr(getattr(f.get_coro(), "cr_code", None), "co_filename", "")
        }
        for loop in loops.values():
            if "call_soon_threadsafe" not in vars(loop):  # a read finishing later: nobody is waiting for it
                loop.call_soon_threadsafe = lambda *args, **kwargs: None
        for obj in futures:
            if id(obj.get_loop()) not in loops:
                continue
            if obj.done():
                if not obj.cancelled():
                    obj.exception()  # retrieved: asyncio does not log it as "never retrieved"
            elif isinstance(obj, asyncio.Task):
                obj._log_destroy_pending = False  # asyncio's own switch for "destroyed but pending"
                with contextlib.suppress(BaseException):
                    obj.get_coro().close()
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _restore_verified(run_dir: str, step: int, meta: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """The items of checkpoint ``step`` (``targets``: item -> abstract tree, or None to restore as saved),
    each checked against its recorded fingerprints; DamagedCheckpoint otherwise."""
    missing = [name for name in targets if not os.path.isdir(os.path.join(checkpoint_dir(run_dir), str(step), name))]
    if missing:
        raise DamagedCheckpoint(f"its {missing[0]} folder is missing")
    try:
        # No target: the arrays as saved, on this process's first device, whatever mesh wrote them.
        targets = {name: _saved_shapes(run_dir, step, name) if t is None else t for name, t in targets.items()}
        args = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
        with _orbax_reading():
            restored = make_manager(run_dir, create=False).restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 (a truncated or deleted array file: tensorstore, OS and value errors alike)
        raise DamagedCheckpoint(f"its arrays cannot be read ({_short(e)})") from None
    recorded = meta.get("fingerprints")
    if recorded is None and meta.get("format", 1) >= 2:
        raise DamagedCheckpoint("its metadata lists no fingerprints")
    if recorded is None:
        warnings.warn(
            f"checkpoint step {step} in {run_dir!r} predates fingerprints (format {meta.get('format')}); "
            "loaded without verification",
            CheckpointWarning,
            stacklevel=3,
        )
    else:
        for name in targets:
            _check_fingerprints(name, restored[name], recorded.get(name, {}))
    return {name: restored[name] for name in targets}


def _saved_shapes(run_dir: str, step: int, name: str):
    """The shapes and dtypes item ``name`` of a checkpoint was saved with, as a target on the first local device."""
    from etils import epath

    with _orbax_reading():
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(checkpoint_dir(run_dir)) / str(step) / name)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def restore_intact(
    run_dir: str,
    targets: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    step: int | None = None,
    check: Callable[[int, dict[str, Any]], None] | None = None,
    move_damaged: bool = False,
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, meta, items)`` of the newest intact checkpoint (or of ``step``), verified.

    ``targets(meta)`` names the items to read and their abstract trees; ``check(step, meta)`` may
    refuse a checkpoint for a reason that is not damage (its error propagates). Each damaged
    checkpoint skipped gives one ``CheckpointWarning``; ``move_damaged`` moves them into
    ``run_dir/damaged/`` (a resumed run then saves those steps anew). No intact checkpoint: one
    ValueError listing why each failed.
    """
    candidates = _candidates(run_dir, step)
    reasons = []
    for s in candidates:
        try:
            meta = _read_meta(run_dir, s)
            if check is not None:
                check(s, meta)
            return s, meta, _restore_verified(run_dir, s, meta, targets(meta))
        except DamagedCheckpoint as e:
            reasons.append(f"step {s}: {e}")
            # One process moves it (the others see the same damage and skip the same step).
            where = _move_aside(run_dir, s) if move_damaged and jax.process_index() == 0 else None
            kept = f"moved to {where}" if where else "kept on disk"
            later = "; trying the previous one" if s != candidates[-1] else ""
            warnings.warn(
                f"checkpoint step {s} in {run_dir!r} is damaged ({e}); it is {kept}{later}",
                CheckpointWarning,
                stacklevel=2,
            )
    raise ValueError(f"no intact checkpoint in {run_dir!r}: " + "; ".join(reasons))


def _move_aside(run_dir: str, step: int) -> str:
    """Move a damaged checkpoint out of the way (kept, not deleted) so the step can be saved again."""
    dest = os.path.join(os.path.abspath(run_dir), DAMAGED_SUBDIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(checkpoint_dir(run_dir), str(step)), dest)
    return dest


def verify(run_dir: str) -> list[dict[str, Any]]:
    """Every checkpoint of ``run_dir``, oldest first: ``{step, ok, params_ok, detail, items, bytes}``
    (``arjax checkpoints``). ``params_ok``: the weights alone verify (what generate and eval read);
    ``ok``: everything does (what a resume needs)."""
    _check_run_dir(run_dir)
    report = []
    for s in all_steps(run_dir):
        folder = os.path.join(checkpoint_dir(run_dir), str(s))
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
        items = sorted(d for d in ("params", "opt_state") if os.path.isdir(os.path.join(folder, d)))
        entry = {"step": s, "ok": False, "params_ok": False, "detail": "", "items": items, "bytes": size}
        try:
            meta = _read_meta(run_dir, s)
            names = ["params"] + (["opt_state"] if "opt_state" in meta.get("fingerprints", {"opt_state": 1}) else [])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CheckpointWarning)
                _restore_verified(run_dir, s, meta, {"params": None})
                entry["params_ok"] = True
                if "opt_state" in names:
                    _restore_verified(run_dir, s, meta, {"opt_state": None})
            entry["ok"] = True
            entry["detail"] = (
                "unverified: predates fingerprints"
                if caught
                else f"{sum(len(v) for v in meta['fingerprints'].values())} arrays match their fingerprints"
            )
        except DamagedCheckpoint as e:
            entry["detail"] = f"damaged: {e}"
        report.append(entry)
    return report


# Model-config keys that choose how the same weights are computed, not what they are: a run may
# resume, and a checkpoint load, under another value (and checkpoints from before a key existed).
EXECUTION_KEYS = ("attention", "remat")  # how the same math runs: free to change on resume


def config_mismatch(saved: dict[str, Any], requested: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Model-config keys whose saved and requested values differ: {key: (saved, requested)}."""
    want = requested.to_dict()
    keys = sorted((set(saved) | set(want)) - set(EXECUTION_KEYS))
    return {k: (saved.get(k), want.get(k)) for k in keys if saved.get(k) != want.get(k)}


def check_compatible(run_dir: str, saved: dict[str, Any], requested: ModelConfig) -> None:
    diff = config_mismatch(saved, requested)
    if diff:
        parts = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"the checkpoint in {run_dir!r} was trained with a different model ({parts}); "
            "use the same model preset/overrides to resume, or a new --out directory to start afresh"
        )


def abstract_params(model_cfg: ModelConfig, plan=None):
    """(graphdef, state, pure-dict target of ShapeDtypeStructs) of a model, nothing allocated.

    The target carries ``plan``'s shardings (default: everything on the first device), so a
    checkpoint written on any mesh and any number of processes restores onto this one.
    """
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    plan = plan or sharding.single_device_plan()
    shardings = plan.param_shardings(pure)
    return (
        graphdef,
        state,
        jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shardings),
    )


def restore_training_state(run_dir: str, *, params, opt_state, check: Callable[[int, dict[str, Any]], None]):
    """``(step, meta, params, opt_state)`` of the newest intact checkpoint, shaped like the given
    (fresh) ones; damaged newer checkpoints are moved into ``run_dir/damaged/``."""
    target_params = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))
    leaves, treedef = jax.tree.flatten(opt_state)
    target_opt = [ocp.utils.to_shape_dtype_struct(x) for x in leaves]

    step, meta, items = restore_intact(
        run_dir, lambda meta: {"params": target_params, "opt_state": target_opt}, check=check, move_damaged=True
    )
    nnx.replace_by_pure_dict(params, items["params"])
    return step, meta, params, jax.tree.unflatten(treedef, list(items["opt_state"]))


def tokenizer_digest(run_dir: str) -> str:
    """SHA-256 over the files of the run's tokenizer/ (names and bytes): stored in every checkpoint's meta."""
    digest = hashlib.sha256()
    root = tokenizer_dir(run_dir)
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def text_digest(text: str) -> str:
    """SHA-256 of a training text (UTF-8): stored as ``data_sha256`` in every checkpoint of a run."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_text(run_dir: str, meta: dict[str, Any], text: str, *, fix: str) -> None:
    """The text must be the one the run was trained on (a path can name other text later, elsewhere)."""
    check_data(run_dir, meta, text_digest(text), found="the text read", expected="the text", fix=fix)


def check_data(run_dir: str, meta: dict[str, Any], digest: str, *, found: str, expected: str, fix: str) -> None:
    """``digest`` (a text's, or a prepared dataset's manifest digest) must be the run's ``data_sha256``."""
    want = meta.get("data_sha256")
    if want is not None and digest != want:
        raise ValueError(
            f"{found} is not {expected} the run in {run_dir!r} was trained on (its SHA-256 differs); {fix}"
        )


def check_tokenizer(run_dir: str, meta: dict[str, Any]) -> None:
    """The run's tokenizer/ must be the one its checkpoint was saved with (a swapped character would
    make every decoded token the wrong text, with no error)."""
    want = meta.get("tokenizer_sha256")
    if want is not None and os.path.isdir(tokenizer_dir(run_dir)) and tokenizer_digest(run_dir) != want:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir(run_dir)!r} is not the one checkpoint step {meta.get('step')} was saved "
            "with (its files were edited or corrupted); restore it from a copy of the run"
        )


def load_model(run_dir: str, step: int | None = None, *, mesh=None, preset: str | None = None):
    """``(model, tokenizer, train_cfg)`` from a run directory: the newest intact (or given) checkpoint's weights.

    ``model.cfg`` is the ModelConfig it was trained with; ``train_cfg`` the TrainConfig of the run
    that trained it, or None for converted weights (``arjax convert --from-hf``). The weights land
    on ``mesh`` (axis sizes, as in a run config; e.g. ``{"model": 2}`` for tensor-parallel decoding)
    with ``preset``'s rules, or on the first device when no mesh is given, whatever mesh wrote them.
    """
    _check_run_dir(run_dir)

    def targets(meta):
        try:
            model_cfg = model_config_from_dict(meta["model_config"])
        except (TypeError, ValueError) as e:
            raise DamagedCheckpoint(f"its model_config is invalid ({e})") from None
        return {"params": abstract_params(model_cfg, plan_for(model_cfg))[2]}

    def plan_for(model_cfg):
        # No divisibility check: a trained vocabulary (65 characters) that does not split over the model
        # axis is kept whole on every device instead (Plan.spec), which decoding can afford.
        return (
            None
            if mesh is None
            else sharding.make_plan(mesh, preset, model_cfg=model_cfg, allow_fewer=True, check_model=False)
        )

    step, meta, items = restore_intact(run_dir, targets, step=step)
    graphdef, state, _ = abstract_params(model_config_from_dict(meta["model_config"]))
    nnx.replace_by_pure_dict(state, items["params"])
    model = nnx.merge(graphdef, state)
    check_tokenizer(run_dir, meta)
    try:  # the run config is a convenience here (eval's defaults); the weights need only the model config
        cfg = train_config.from_dict(meta["train_config"]) if "train_config" in meta else None
    except (TypeError, ValueError):
        cfg = None
    return model, load_tokenizer(tokenizer_dir(run_dir)), cfg


# ----------------------------------------------------------------------------- resuming a run


# Run-config keys a resumed run may change: they decide how far the run goes, how often it logs,
# evaluates and saves, where its inputs now live and on which devices it runs (a checkpoint restores
# onto any mesh), not what any step computes.
RESUMABLE_KEYS = (
    "steps",
    "eval_interval",
    "eval_iters",
    "log_interval",
    "ckpt_interval",
    "max_to_keep",
    "data",
    "tokenizer_path",
    "mesh",
    "sharding",
)


def latest_checkpoint(run_dir: str) -> int | None:
    """The step of the newest checkpoint in ``run_dir``, or None."""
    steps = all_steps(run_dir)
    return steps[-1] if steps else None


def check_resume(run_dir: str, resume: bool) -> int | None:
    """The latest checkpoint step of ``run_dir`` (None for a new run), after the resume guards: a
    directory (not a file, not a URL), checkpoints there exactly when ``resume``."""
    if not run_dir:
        raise ValueError("the run directory is empty; pass --out with a directory")
    if "://" in run_dir:  # every host writes through the file system: a URL would be a local folder named gs:
        raise ValueError(
            f"--out {run_dir!r} is a URL; arjax writes runs through the file system: mount the bucket "
            "(e.g. gcsfuse) or a shared NFS on every host and pass the mount's path"
        )
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} is a file; pass --out with a directory (new or a run to --resume)")
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise ValueError(f"--resume given but {run_dir!r} has no checkpoint; drop --resume to start a new run")
    if not resume and latest is not None:
        raise ValueError(
            f"{run_dir!r} already holds checkpoints (latest step {latest}); pass --resume to continue it "
            "or choose a new --out directory"
        )
    return latest


def check_same_run(run_dir: str, saved: dict[str, Any], cfg: train_config.TrainConfig, model_cfg: ModelConfig) -> None:
    """A resumed run must compute what the interrupted one would have: the same model and the same
    run config, up to ``RESUMABLE_KEYS``; else one error naming every key that differs."""
    start = saved["step"]
    if "train_config" not in saved:
        raise ValueError(
            f"the checkpoint in {run_dir!r} holds converted weights only (no optimizer state, no run config); it "
            "cannot be resumed. Start a new run in another --out directory"
        )
    check_compatible(run_dir, saved["model_config"], model_cfg)
    before, now = saved["train_config"], cfg.to_dict()
    diff = [k for k in sorted(set(before) | set(now)) if k not in RESUMABLE_KEYS and before.get(k) != now.get(k)]
    if diff:
        parts = "; ".join(f"{k}: checkpoint {before.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise ValueError(
            f"the run in {run_dir!r} was trained with other settings ({parts}); a resumed run may change only "
            f"{', '.join(RESUMABLE_KEYS)}. Resume with the run's own settings (omit --config) or start a new --out"
        )
    if cfg.steps < start:
        raise ValueError(
            f"steps={cfg.steps} is below the checkpoint's step {start} in {run_dir!r}; pass --steps {start} or more"
        )


def training_meta(
    step: int, cfg: train_config.TrainConfig, model_cfg: ModelConfig, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a training run stores beside its arrays after ``step`` updates (``save`` adds the
    format, step and fingerprints): what ``check_same_run`` compares on resume, plus ``extra``."""
    return {
        "seed": cfg.seed,
        # Batches are a pure function of (seed, step), so the step is the data position;
        # stored explicitly so that other samplers could resume from it.
        "data_position": {"step": step, "windows_consumed": step * cfg.accum_steps * cfg.batch_size},
        "model_config": model_cfg.to_dict(),
        "train_config": cfg.to_dict(),
        **(extra or {}),
    }
