"""Checkpoints with orbax: params, optimizer state, step and the run's configs; `load_model(dir)` for generate/eval.

A run directory holds ``checkpoints/<step>/`` (orbax, written atomically), ``tokenizer/`` and
``metrics.jsonl``, so ``arjax generate --ckpt DIR`` needs nothing but DIR.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from arjax.model.config import ModelConfig, from_dict as model_config_from_dict
from arjax.model.transformer import Transformer
from arjax.train import config as train_config
from arjax.train.tokenizer import load_tokenizer

CKPT_SUBDIR = "checkpoints"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), CKPT_SUBDIR)


def tokenizer_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), TOKENIZER_SUBDIR)


def make_manager(run_dir: str, *, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    # Synchronous: the next train step donates (reuses) the params buffers a background save would read.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def save(manager: ocp.CheckpointManager, step: int, *, params, opt_state=None, meta: dict[str, Any]) -> None:
    """Save after ``step`` optimizer updates. ``meta`` is JSON: at least ``model_config``; a training
    run adds its ``train_config``, seed and data position, a conversion its source.

    Params are stored as a nested dict of arrays named like the model (readable by other tools);
    the optimizer state (absent for converted weights) as its flat list of leaves, rebuilt on
    restore from a fresh ``tx.init``.
    """
    items = {
        "params": ocp.args.StandardSave(nnx.to_pure_dict(params)),
        "meta": ocp.args.JsonSave({"format": FORMAT_VERSION, "step": step, **meta}),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(jax.tree.leaves(opt_state))
    manager.save(step, args=ocp.args.Composite(**items))


def read_meta(run_dir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the latest (or given) checkpoint in ``run_dir``."""
    manager = make_manager(run_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no checkpoint in {run_dir!r} (looked in {checkpoint_dir(run_dir)}); train first with `arjax train --out {run_dir}`")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, meta


def config_mismatch(saved: dict[str, Any], requested: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Model-config keys whose saved and requested values differ: {key: (saved, requested)}."""
    want = requested.to_dict()
    return {k: (saved.get(k), want.get(k)) for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)}


def check_compatible(run_dir: str, saved: dict[str, Any], requested: ModelConfig) -> None:
    diff = config_mismatch(saved, requested)
    if diff:
        parts = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"the checkpoint in {run_dir!r} was trained with a different model ({parts}); "
            "use the same model preset/overrides to resume, or a new --out directory to start afresh"
        )


def restore(manager: ocp.CheckpointManager, step: int, *, params, opt_state):
    """(params, opt_state) of checkpoint ``step``, shaped like the given (fresh) ones."""
    if not os.path.isdir(os.path.join(manager.directory, str(step), "opt_state")):
        raise ValueError(
            f"checkpoint {step} in {manager.directory} holds weights only (a converted checkpoint); it cannot be "
            "resumed. Start a new run (fine-tuning from converted weights is not supported yet)"
        )
    abstract_params = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))
    leaves, treedef = jax.tree.flatten(opt_state)
    abstract_opt = [ocp.utils.to_shape_dtype_struct(x) for x in leaves]
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt)
        ),
    )
    nnx.replace_by_pure_dict(params, restored["params"])
    return params, jax.tree.unflatten(treedef, list(restored["opt_state"]))


def load_model(run_dir: str, step: int | None = None):
    """``(model, tokenizer, train_cfg)`` from a run directory: the latest (or given) checkpoint's weights.

    ``model.cfg`` is the ModelConfig it was trained with; ``train_cfg`` the TrainConfig of the run
    that trained it, or None for converted weights (``arjax convert --from-hf``).
    """
    if not os.path.isdir(run_dir):
        raise ValueError(f"checkpoint directory {run_dir!r} does not exist; pass the --out directory of `arjax train`")
    step, meta = read_meta(run_dir, step)
    model_cfg = model_config_from_dict(meta["model_config"])
    try:  # the run config is a convenience here (eval's defaults); the weights need only the model config
        cfg = train_config.from_dict(meta["train_config"]) if "train_config" in meta else None
    except (TypeError, ValueError):
        cfg = None
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    manager = make_manager(run_dir)
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    nnx.replace_by_pure_dict(state, restored["params"])
    model = nnx.merge(graphdef, state)
    return model, load_tokenizer(tokenizer_dir(run_dir)), cfg
