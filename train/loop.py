"""The one training loop: model, optimizer, objective, resume, evaluation, checkpoints, and the run's log.

``fit`` trains any model config on any batch source (``arjax.train.data.Windows`` over a corpus,
``Rows`` of oracle samples) with the objective the run config names: teacher forcing, or
scheduled sampling when ``cfg.scheduled_sampling`` is set. ``train`` is its front end for text:
it reads the corpus, builds or reloads the tokenizer and saves it beside the checkpoints.
``arjax train``, ``arjax study`` and the tests all train through ``fit``. What it reads and writes
beside the loop lives with its kind: the resume guards and the checkpoint meta in
``checkpoint``, batch placement in ``data``, metrics.jsonl / TensorBoard / the progress bar in
``runlog``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx

from arjax.model import memory, sharding
from arjax.model.config import ModelConfig
from arjax.model.rng import seed_key
from arjax.model.transformer import Transformer, count_params
from arjax.train import checkpoint as ckpt
from arjax.train import data as data_lib
from arjax.train import perf
from arjax.train.checkpoint import latest_checkpoint  # noqa: F401 (docs/colab.ipynb imports it from here)
from arjax.train.config import TrainConfig
from arjax.train.data import batch_feeder, place_eval_windows
from arjax.train.exposure.scheduled_sampling import ScheduledSampling
from arjax.train.optim import optimizer_from_config
from arjax.train.runlog import RunLog, StepMeter
from arjax.train.shards import check_run_config, open_prepared
from arjax.train.step import TeacherForcing, compiled_train_step, make_eval_step, sharded_train_step
from arjax.train.tokenizer import build_tokenizer, check_fits, load_tokenizer


def objective_for(cfg: TrainConfig, *, pad_id: int | None, dropout: bool):
    """The objective a run config names: scheduled sampling when configured, else teacher forcing."""
    if cfg.scheduled_sampling is not None:
        return ScheduledSampling(cfg=cfg.scheduled_sampling, pad_id=pad_id, dropout=dropout)
    return TeacherForcing(pad_id=pad_id, dropout=dropout)


def init_train_state(model_cfg: ModelConfig, tx, plan: sharding.Plan, key: jax.Array):
    """``(graphdef, params, opt_state, (param shardings, opt-state shardings))``, created sharded.

    Initialisation is jitted with the plan's shardings as its outputs, so each device computes only
    its own shard: the model is never whole on one device. (Random numbers do not depend on the
    sharding, so every mesh starts from the same weights.)
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    param_shardings = plan.param_shardings(abstract)
    opt_shardings = plan.opt_shardings(tx, jax.eval_shape(tx.init, abstract), param_shardings)
    params = jax.jit(lambda k: nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(k)))[1], out_shardings=param_shardings)(
        key
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state, (param_shardings, opt_shardings)


def step_memory(compiled, plan: sharding.Plan, cfg: TrainConfig) -> str:
    """Per-device memory of the compiled step, as one line; a warning naming the knobs when it will not fit."""
    try:
        stats = compiled.memory_analysis()
        need = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes
        )
    except Exception:  # noqa: BLE001 (not every backend reports it, nor in one way)
        return "per-device memory: not reported by this backend"
    have = perf.device_memory_bytes(plan.mesh.devices.flat[0])
    line = f"step needs {need / 2**30:.2f} GiB per device" + (f" of {have / 2**30:.1f} GiB" if have else "")
    if have and need > have:
        warnings.warn(
            f"the train step needs {need / 2**30:.2f} GiB per device but a device has {have / 2**30:.1f} GiB; lower "
            f"batch_size ({cfg.batch_size}) and raise accum_steps ({cfg.accum_steps}) to keep the tokens per step, "
            "shorten "
            "seq_len, use model_overrides: {dtype: bfloat16}, or shard the weights (mesh fsdp or model > 1)",
            stacklevel=3,
        )
    return line


def check_memory(cfg: TrainConfig, model_cfg: ModelConfig, seq_len: int, *, eval_windows: int = 0) -> None:
    """Refuse in one line, before anything is allocated, a run whose weights, optimizer state, one
    micro-batch's activations or batches cannot fit the devices and host (``arjax.model.memory``).

    ``eval_windows``: validation windows the caller will build on the host (``train``), 0 when it has."""
    n_devices = jax.device_count()
    sizes = dict(zip(sharding.AXES, sharding.mesh_shape(cfg.mesh, n_devices)))
    rows = memory.shards_of(sizes, sharding.BATCH_AXES)  # a batch's rows are split over data x fsdp
    A, B, T, L = cfg.accum_steps, cfg.batch_size, seq_len, model_cfg.n_layers
    tokens = A * B * (T + 1)
    seq = f"seq_len={T}" if cfg.seq_len is not None else f"seq_len=max_len={T}"  # no seq_len: the model's context
    batch_fix = "lower batch_size or accum_steps"
    needs = memory.param_needs(
        model_cfg,
        copies=4,
        shards=memory.shards_of(sizes, ("fsdp", "model")),
        what="the weights, gradients and AdamW moments",
        settings="model.",
        shardable=True,
    )
    needs += [
        memory.Need(
            f"one micro-batch's activations (batch_size={B} x {seq} x d_model={model_cfg.d_model} x "
            f"n_layers={L}, {model_cfg.dtype})",
            memory.activation_bytes(model_cfg, B, T) // rows,
            "lower batch_size (raise accum_steps to keep the tokens per step) or seq_len",
        ),
        memory.Need(
            f"a step's batch (accum_steps={A} x batch_size={B} x {T + 1} tokens)", 4 * tokens // rows, batch_fix
        ),
        # The host reads its rows of each batch (int32 windows and their int64 row indices).
        memory.Need(
            f"a step's batch on the host (accum_steps={A} x batch_size={B} x {T + 1} tokens)",
            4 * tokens + 8 * A * B,
            batch_fix,
            per_device=False,
        ),
    ]
    if eval_windows:
        needs.append(
            memory.Need(
                f"the validation windows (eval_iters={cfg.eval_iters} x batch_size={B} x {T + 1} tokens)",
                4 * eval_windows * (T + 1),
                "lower eval_iters or batch_size",
                per_device=False,
            )
        )
    memory.check_needs(needs, jax.devices()[:n_devices])


def fit(
    cfg: TrainConfig,
    run_dir: str,
    *,
    model_cfg: ModelConfig,
    source,
    val_windows: np.ndarray,
    pad_id: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    quiet: bool = False,
    meta: dict[str, Any] | None = None,
    label: str = "train",
) -> dict[str, Any]:
    """Train ``model_cfg`` on ``source`` (``batch(batch_size=, seed=, step=, rows=None) -> [n, T+1]``) into ``run_dir``,
    on the mesh ``cfg.mesh`` names (every device by default; ``arjax.model.sharding``).

    ``val_windows`` [E, B, T+1] are evaluated (teacher-forced NLL) every ``cfg.eval_interval``
    steps and at the end; ``meta`` is stored in every checkpoint beside the configs. ``stop_after``
    ends this invocation after that many optimizer steps (as if interrupted; a checkpoint is
    written), which the resume tests use to split one run in two. Returns per-step losses and
    objective metrics, val losses, tokens/s, the final step and the trained ``model``.
    """
    ckpt.check_resume(run_dir, resume)
    T = source.seq_len
    A, B = cfg.accum_steps, cfg.batch_size
    check_memory(cfg, model_cfg, T)
    # The mesh and rules, checked against the model and batch before anything compiles.
    plan = sharding.make_plan(cfg.mesh, cfg.sharding, model_cfg=model_cfg, batch_size=B)
    key = seed_key(cfg.seed)
    tx, schedule = optimizer_from_config(cfg)
    graphdef, params, opt_state, shardings = init_train_state(model_cfg, tx, plan, key)
    start = 0
    if resume:  # the newest intact checkpoint; damaged newer ones are moved aside (kept) with a warning
        start, _, params, opt_state = ckpt.restore_training_state(
            run_dir,
            params=params,
            opt_state=opt_state,
            check=lambda step, saved: ckpt.check_same_run(run_dir, saved, cfg, model_cfg),
        )
    os.makedirs(run_dir, exist_ok=True)
    manager = ckpt.make_manager(run_dir, max_to_keep=cfg.max_to_keep)

    objective = objective_for(cfg, pad_id=pad_id, dropout=model_cfg.dropout > 0)
    step_fn = sharded_train_step(graphdef, tx, plan, *shardings)
    feed = batch_feeder(source, plan, accum_steps=A, batch_size=B, seed=cfg.seed)
    compiled = compiled_train_step(
        step_fn,
        plan,
        params,
        opt_state,
        jax.ShapeDtypeStruct((A, B, T + 1), np.int32, sharding=plan.batch_sharding(3, 1)),
        objective,
    )
    eval_step = make_eval_step(graphdef, pad_id=pad_id)
    val_windows = place_eval_windows(val_windows, plan)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    memory_line = step_memory(compiled, plan, cfg)
    # The step's traced inputs, placed once on the mesh as the compiled step expects them.
    rep = plan.replicated
    key, objective = sharding.replicate((key, objective), rep)

    n_params = count_params(model_cfg)
    main = sharding.is_main_process()
    with RunLog(run_dir, start=start, resume=resume, total=cfg.steps, quiet=quiet, label=label, writer=main) as log:
        log.info(
            f"model: {n_params / 1e6:.2f}M params ({model_cfg.n_layers} layers x {model_cfg.d_model}), vocab "
            f"{model_cfg.vocab_size}, context {T}; {A * B * T:,} tokens per step"
        )
        log.info(f"{sharding.describe(plan)}; {memory_line}")
        if cfg.scheduled_sampling is not None:
            log.info(cfg.scheduled_sampling.describe())
            if cfg.scheduled_sampling.always_gold:
                warnings.warn(
                    "scheduled_sampling.schedule keeps the gold probability at 1, so no input is ever the model's: "
                    "this trains teacher forcing at the cost of scheduled sampling; set scheduled_sampling.schedule, "
                    "e.g. {step: {kind: linear, k: 1.0, c: 1.0e-4, eps_min: 0.75}}",
                    stacklevel=2,
                )
        meter = StepMeter(
            log,
            start=start,
            tokens_per_step=A * B * T,
            n_devices=plan.mesh.size,
            flops_per_token=perf.flops_per_token(model_cfg, T),
            peak=perf.device_peak_flops(plan.mesh.devices.flat[0], model_cfg.dtype),
            schedule=schedule,
            metric_names=objective.metric_names,
        )
        val_losses: list[tuple[int, float]] = []

        # The device never waits for the host: the next step's batch is built and placed while this
        # step runs, and an interval's metrics are read only after the following step is dispatched.
        batch = feed(start) if start < end else None
        deferred = None  # the step whose interval's metrics are due but not yet read
        for step in range(start, end):
            step_arr = sharding.replicate(np.int32(step), rep)
            params, opt_state, metrics = compiled(params, opt_state, batch, step_arr, key, objective)
            if step + 1 < end:
                batch = feed(step + 1)
            if deferred is not None:
                meter.read(deferred)
                deferred = None
            meter.add(step, metrics)
            done = step + 1
            evaluating = done % cfg.eval_interval == 0 or done == cfg.steps
            saving = done % cfg.ckpt_interval == 0 or done == end
            # Read before an evaluation or a checkpoint at once: the log then holds every step the
            # checkpoint holds, and the records come in the same order however the run was interrupted.
            if done == end or saving or evaluating:
                meter.read(done)
            elif done % cfg.log_interval == 0:
                deferred = done
            with meter.paused():  # evaluation and saving stay out of tokens/s
                if evaluating:
                    val = float(eval_step(params, val_windows))
                    log.evaluation(done, val)
                    val_losses.append((done, val))
                if saving:
                    log.flush()
                    ckpt.save(
                        manager,
                        done,
                        params=params,
                        opt_state=opt_state,
                        meta=ckpt.training_meta(done, cfg, model_cfg, meta),
                    )
        manager.wait_until_finished()
    return {
        "losses": meter.history.get("loss", []),
        "history": meter.history,
        "val_losses": val_losses,
        "final_step": end,
        "tokens_per_s": meter.tokens_per_s,
        "wall_s": meter.wall_s,
        "n_params": n_params,
        "model_config": model_cfg,
        "seq_len": T,
        "model": nnx.merge(graphdef, params),
    }


def train(
    cfg: TrainConfig, run_dir: str, *, resume: bool = False, stop_after: int | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Train ``cfg`` on its text corpus, or on a prepared dataset, into ``run_dir`` (see ``fit`` for what comes back).

    ``cfg.data`` names a text file (tokenized here), a directory written by `arjax data prepare`
    (its shards are memory-mapped and its tokenizer used), or nothing (the bundled corpus). On
    resume the run's saved tokenizer is used (a char vocabulary must not change); otherwise a
    fresh one is built. The tokenizer is saved in ``run_dir`` so that ``arjax generate --ckpt``
    needs nothing else.
    """
    ckpt.check_resume(run_dir, resume)
    saved = ckpt.read_meta(run_dir)[1] if resume else None
    tok_dir = ckpt.tokenizer_dir(run_dir)
    fix = f"--data {cfg.data or 'pydoc'!r} must be the run's own data; resume with the same data or start a new --out"
    if cfg.data is not None and os.path.isdir(cfg.data):  # a prepared dataset (or a clear error saying how to make one)
        prepared = open_prepared(cfg.data)
        check_run_config(prepared, cfg)
        if resume:  # the same shards and tokenizer as the run's, checked before either is used
            ckpt.check_data(
                run_dir,
                saved,
                prepared.digest,
                found=f"the prepared data in {cfg.data!r}",
                expected="the data",
                fix=fix,
            )
            ckpt.check_tokenizer(run_dir, saved)
        tokenizer, train_ids, val_ids, data_sha256 = prepared.tokenizer, prepared.train, prepared.val, prepared.digest
    else:
        text = data_lib.read_text(cfg.data, cfg.data_errors)
        if resume:  # the same text and the same tokenizer as the run's, checked before either is used
            ckpt.check_text(run_dir, saved, text, fix=fix.replace("own data", "own text"))
            ckpt.check_tokenizer(run_dir, saved)
        if resume and os.path.isdir(tok_dir):
            tokenizer = load_tokenizer(tok_dir)
        else:
            tokenizer = build_tokenizer(cfg.tokenizer, text=text, path=cfg.tokenizer_path)
        split = data_lib.tokenize_and_split(text, tokenizer, val_fraction=cfg.val_fraction)
        train_ids, val_ids, data_sha256 = split.train, split.val, ckpt.text_digest(text)
    model_cfg = cfg.model_config(vocab_size=tokenizer.vocab_size)
    check_fits(
        tokenizer,
        model_cfg.vocab_size,
        fix="remove vocab_size from model_overrides (it then follows the tokenizer) or raise it",
    )
    T = cfg.context_len(model_cfg)
    check_memory(cfg, model_cfg, T, eval_windows=cfg.eval_iters * cfg.batch_size)
    source = data_lib.Windows(train_ids, T)
    val_windows = data_lib.eval_windows(val_ids, n_windows=cfg.eval_iters * cfg.batch_size, seq_len=T)
    val_windows = val_windows.reshape(cfg.eval_iters, cfg.batch_size, T + 1)  # [E, B, T+1]
    sharding.sync("tokenizer checked")  # every process has read the run's tokenizer before one rewrites it
    if sharding.is_main_process():  # one writer; the others wait for it, then read its digest
        tokenizer.save(tok_dir)
    sharding.sync("tokenizer saved")
    if not quiet and sharding.is_main_process():
        kind = getattr(tokenizer, "kind", "?")
        print(f"data: {len(train_ids):,} train / {len(val_ids):,} val tokens ({kind} tokenizer)")
    return fit(
        cfg,
        run_dir,
        model_cfg=model_cfg,
        source=source,
        val_windows=val_windows,
        pad_id=tokenizer.pad_id,
        resume=resume,
        stop_after=stop_after,
        quiet=quiet,
        meta={
            "tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__),
            "data_sha256": data_sha256,
            "tokenizer_sha256": ckpt.tokenizer_digest(run_dir),
        },
    )
