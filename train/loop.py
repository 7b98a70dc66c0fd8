"""The one training loop: model, optimizer, objective, resume, rich progress, JSONL (and TensorBoard if installed) metrics, evaluation, checkpoints.

``fit`` trains any model config on any batch source (``arjax.train.data.Windows`` over a corpus,
``Rows`` of oracle samples) with the objective the run config names: teacher forcing, or
scheduled sampling when ``cfg.scheduled_sampling`` is set. ``train`` is its front end for text:
it reads the corpus, builds or reloads the tokenizer and saves it beside the checkpoints.
``arjax train``, ``arjax study`` and the tests all train through ``fit``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arjax.model import memory, sharding
from arjax.model.config import ModelConfig
from arjax.model.transformer import Transformer, count_params
from arjax.train import checkpoint as ckpt
from arjax.train import data as data_lib
from arjax.train import perf
from arjax.train.config import TrainConfig
from arjax.train.exposure.scheduled_sampling import ScheduledSampling
from arjax.train.optim import optimizer_from_config
from arjax.train.prepare import check_run_config, open_prepared
from arjax.model.rng import seed_key
from arjax.train.step import TeacherForcing, compiled_train_step, make_eval_step, sharded_train_step
from arjax.train.tokenizer import build_tokenizer, check_fits, load_tokenizer

# Short names for the objective's metrics in the progress bar.
_BAR_NAMES = {"mix_rate": "mix", "gold_prob": "gold", "differ_rate": "differ"}


# Run-config keys a resumed run may change: they decide how far the run goes, how often it logs,
# evaluates and saves, where its inputs now live and on which devices it runs (a checkpoint restores
# onto any mesh), not what any step computes.
RESUMABLE_KEYS = ("steps", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "max_to_keep", "data",
                  "tokenizer_path", "mesh", "sharding")


def _tensorboard_writer(log_dir: str, purge_step: int | None = None):
    """A TensorBoard writer when a writer package is already installed; we add no dependency for it.

    ``purge_step``: on resume, events at and after it (logged after the checkpoint, before the
    interruption) are hidden, so TensorBoard, like the JSONL, holds every step once.
    """
    # torch's writer needs the tensorboard package; look before importing torch (a second per run).
    for module, needs in (("tensorboardX", "tensorboardX"), ("torch.utils.tensorboard", "tensorboard")):
        if importlib.util.find_spec(needs) is None:
            continue
        try:
            return importlib.import_module(module).SummaryWriter(log_dir, purge_step=purge_step)
        except Exception:  # a broken install: train without TensorBoard rather than fail
            continue
    return None


class _Progress:
    """A rich progress bar with loss, the objective's metrics, tokens/s and ETA; silent when ``quiet``."""

    def __init__(self, total: int, start: int, quiet: bool, label: str = "train"):
        self.bar = None
        if quiet:
            return
        self.bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.bar.add_task(label, total=total, completed=start, info="compiling...")
        self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, info=info)

    def log(self, msg: str) -> None:
        if self.bar:
            self.bar.console.print(msg)  # print, not log: no source-file column in the user's terminal

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


def objective_for(cfg: TrainConfig, *, pad_id: int | None, dropout: bool):
    """The objective a run config names: scheduled sampling when configured, else teacher forcing."""
    if cfg.scheduled_sampling is not None:
        return ScheduledSampling(cfg=cfg.scheduled_sampling, pad_id=pad_id, dropout=dropout)
    return TeacherForcing(pad_id=pad_id, dropout=dropout)


def _keep_logged_steps(path: str, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (logged after the checkpoint a resume starts from),
    so that the resumed run writes each of them exactly once."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill mid-write
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str) -> int | None:
    """The step of the newest checkpoint in ``run_dir``, or None."""
    steps = ckpt.all_steps(run_dir)
    return steps[-1] if steps else None


def check_same_run(run_dir: str, saved: dict[str, Any], cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """A resumed run must compute what the interrupted one would have: the same model and the same
    run config, up to ``RESUMABLE_KEYS``; else one error naming every key that differs."""
    start = saved["step"]
    if "train_config" not in saved:
        raise ValueError(
            f"the checkpoint in {run_dir!r} holds converted weights only (no optimizer state, no run config); it "
            "cannot be resumed. Start a new run in another --out directory"
        )
    ckpt.check_compatible(run_dir, saved["model_config"], model_cfg)
    before, now = saved["train_config"], cfg.to_dict()
    diff = [k for k in sorted(set(before) | set(now)) if k not in RESUMABLE_KEYS and before.get(k) != now.get(k)]
    if diff:
        parts = "; ".join(f"{k}: checkpoint {before.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise ValueError(
            f"the run in {run_dir!r} was trained with other settings ({parts}); a resumed run may change only "
            f"{', '.join(RESUMABLE_KEYS)}. Resume with the run's own settings (omit --config) or start a new --out"
        )
    if cfg.steps < start:
        raise ValueError(f"steps={cfg.steps} is below the checkpoint's step {start} in {run_dir!r}; pass --steps {start} or more")


def check_run_dir(run_dir: str, resume: bool) -> int | None:
    """The latest checkpoint step of ``run_dir`` (None for a new run), after the resume guards."""
    if not run_dir:
        raise ValueError("the run directory is empty; pass --out with a directory")
    if "://" in run_dir:  # every host writes through the file system: a URL would be a local folder named gs:
        raise ValueError(f"--out {run_dir!r} is a URL; arjax writes runs through the file system: mount the bucket "
                         "(e.g. gcsfuse) or a shared NFS on every host and pass the mount's path")
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


def init_train_state(model_cfg: ModelConfig, tx, plan: sharding.Plan, key: jax.Array):
    """``(graphdef, params, opt_state, (param shardings, opt-state shardings))``, created sharded.

    Initialisation is jitted with the plan's shardings as its outputs, so each device computes only
    its own shard: the model is never whole on one device. (Random numbers do not depend on the
    sharding, so every mesh starts from the same weights.)
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    param_shardings = plan.param_shardings(abstract)
    opt_shardings = plan.opt_shardings(tx, jax.eval_shape(tx.init, abstract), param_shardings)
    params = jax.jit(lambda k: nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(k)))[1],
                     out_shardings=param_shardings)(key)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state, (param_shardings, opt_shardings)


def batch_feeder(source, plan: sharding.Plan, *, accum_steps: int, batch_size: int, seed: int):
    """``feed(step) -> [A, B, T+1]`` global array of step ``step``'s batch, split over the data axes.

    The global batch is ``source.batch(batch_size=A*B, seed=seed, step=step)`` (row a*B + b is
    micro-batch a's row b): a pure function of (seed, step), whatever the mesh or host count. Each
    process reads only the rows its own devices hold (``rows=``) and JAX assembles the global array
    from every process's part, so a run resumed on other hosts sees the same batches.
    """
    A, B, T = accum_steps, batch_size, source.seq_len
    batch_sharding = plan.batch_sharding(3, 1)
    shape = (A, B, T + 1)
    mine = sharding.host_rows(batch_sharding, shape, axis=1)
    rows = (np.arange(A)[:, None] * B + mine[None, :]).reshape(-1)

    def feed(step: int) -> jax.Array:
        windows = source.batch(batch_size=A * B, seed=seed, step=step, rows=rows)
        return sharding.global_array(batch_sharding, shape, np.asarray(windows, np.int32).reshape(A, len(mine), T + 1))

    return feed


def step_memory(compiled, plan: sharding.Plan, cfg: TrainConfig) -> str:
    """Per-device memory of the compiled step, as one line; a warning naming the knobs when it will not fit."""
    try:
        stats = compiled.memory_analysis()
        need = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                + stats.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return "per-device memory: not reported by this backend"
    have = perf.device_memory_bytes(plan.mesh.devices.flat[0])
    line = f"step needs {need / 2**30:.2f} GiB per device" + (f" of {have / 2**30:.1f} GiB" if have else "")
    if have and need > have:
        warnings.warn(
            f"the train step needs {need / 2**30:.2f} GiB per device but a device has {have / 2**30:.1f} GiB; lower "
            f"batch_size ({cfg.batch_size}) and raise accum_steps ({cfg.accum_steps}) to keep the tokens per step, shorten "
            "seq_len, use model_overrides: {dtype: bfloat16}, or shard the weights (mesh fsdp or model > 1)",
            stacklevel=3)
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
    needs = memory.param_needs(model_cfg, copies=4, shards=memory.shards_of(sizes, ("fsdp", "model")),
                               what="the weights, gradients and AdamW moments", settings="model.",
                               shardable=True)
    needs += [
        memory.Need(f"one micro-batch's activations (batch_size={B} x {seq} x d_model={model_cfg.d_model} x "
                    f"n_layers={L}, {model_cfg.dtype})", memory.activation_bytes(model_cfg, B, T) // rows,
                    "lower batch_size (raise accum_steps to keep the tokens per step) or seq_len"),
        memory.Need(f"a step's batch (accum_steps={A} x batch_size={B} x {T + 1} tokens)", 4 * tokens // rows, batch_fix),
        # The host reads its rows of each batch (int32 windows and their int64 row indices).
        memory.Need(f"a step's batch on the host (accum_steps={A} x batch_size={B} x {T + 1} tokens)",
                    4 * tokens + 8 * A * B, batch_fix, per_device=False),
    ]
    if eval_windows:
        needs.append(memory.Need(f"the validation windows (eval_iters={cfg.eval_iters} x batch_size={B} x {T + 1} "
                                 "tokens)", 4 * eval_windows * (T + 1), "lower eval_iters or batch_size",
                                 per_device=False))
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
    check_run_dir(run_dir, resume)
    T = source.seq_len
    A, B = cfg.accum_steps, cfg.batch_size
    check_memory(cfg, model_cfg, T)
    # The mesh and rules, checked against the model and batch before anything compiles.
    plan = sharding.make_plan(cfg.mesh, cfg.sharding, model_cfg=model_cfg, batch_size=B)
    main = sharding.is_main_process()
    key = seed_key(cfg.seed)
    tx, schedule = optimizer_from_config(cfg)
    graphdef, params, opt_state, shardings = init_train_state(model_cfg, tx, plan, key)
    start = 0
    if resume:  # the newest intact checkpoint; damaged newer ones are moved aside (kept) with a warning
        start, _, params, opt_state = ckpt.restore_training_state(
            run_dir, params=params, opt_state=opt_state, check=lambda step, meta: check_same_run(run_dir, meta, cfg, model_cfg))
    os.makedirs(run_dir, exist_ok=True)
    manager = ckpt.make_manager(run_dir, max_to_keep=cfg.max_to_keep)

    objective = objective_for(cfg, pad_id=pad_id, dropout=model_cfg.dropout > 0)
    step_fn = sharded_train_step(graphdef, tx, plan, *shardings)
    batch_sharding = plan.batch_sharding(3, 1)
    batch_shape = (A, B, T + 1)
    global_batch = batch_feeder(source, plan, accum_steps=A, batch_size=B, seed=cfg.seed)
    compiled = compiled_train_step(step_fn, plan, params, opt_state, jax.ShapeDtypeStruct(batch_shape, np.int32,
                                                                                   sharding=batch_sharding), objective)
    eval_step = make_eval_step(graphdef, pad_id=pad_id)
    val_sharding = plan.batch_sharding(3, 1)
    if val_windows.shape[1] % plan.data_size:  # e.g. a study's test set: evaluated whole on every device
        val_sharding = plan.replicated
    vrows = sharding.host_rows(val_sharding, val_windows.shape, axis=1)
    val_windows = sharding.global_array(val_sharding, val_windows.shape, np.asarray(val_windows[:, vrows], np.int32))
    tokens_per_step = A * B * T
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    n_devices = plan.mesh.size
    flops_token = perf.flops_per_token(model_cfg, T)
    peak = perf.device_peak_flops(plan.mesh.devices.flat[0], model_cfg.dtype)
    memory = step_memory(compiled, plan, cfg)
    # The step's traced inputs, placed once on the mesh as the compiled step expects them.
    rep = plan.replicated
    key, objective = sharding.replicate((key, objective), rep)

    log_path = os.path.join(run_dir, "metrics.jsonl")
    if main and resume and start > 0 and not os.path.isfile(log_path):
        warnings.warn(f"{log_path} is missing: the steps before {start} are not in it; it starts again at step {start + 1}",
                      stacklevel=2)
    log = None
    if main:  # one process writes the logs; every process trains and writes its shards of each checkpoint
        _keep_logged_steps(log_path, start)
        log = open(log_path, "a", encoding="utf-8")
    tb = None
    progress = None
    try:
        tb = _tensorboard_writer(os.path.join(run_dir, "tb"), purge_step=start + 1 if resume else None) if main else None
        n_params = count_params(model_cfg)
        progress = _Progress(cfg.steps, start, quiet or not main, label)
        progress.log(
            f"model: {n_params / 1e6:.2f}M params ({model_cfg.n_layers} layers x {model_cfg.d_model}), vocab "
            f"{model_cfg.vocab_size}, context {T}; {tokens_per_step:,} tokens per step"
        )
        progress.log(f"{sharding.describe(plan)}; {memory}")
        if cfg.scheduled_sampling is not None:
            progress.log(cfg.scheduled_sampling.describe())
            if cfg.scheduled_sampling.always_gold:
                warnings.warn(
                    "scheduled_sampling.schedule keeps the gold probability at 1, so no input is ever the model's: "
                    "this trains teacher forcing at the cost of scheduled sampling; set scheduled_sampling.schedule, "
                    "e.g. {step: {kind: linear, k: 1.0, c: 1.0e-4, eps_min: 0.75}}", stacklevel=2)

        def meta_for(step: int) -> dict[str, Any]:
            return {
                "seed": cfg.seed,
                # Batches are a pure function of (seed, step), so the step is the data position;
                # stored explicitly so that other samplers could resume from it.
                "data_position": {"step": step, "windows_consumed": step * A * B},
                "model_config": model_cfg.to_dict(),
                "train_config": cfg.to_dict(),
                **(meta or {}),
            }

        def write(record: dict[str, Any]) -> None:
            if log is None:
                return
            log.write(json.dumps(record) + "\n")
            if tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        tb.add_scalar(k, v, record["step"])

        def evaluate(step: int) -> float:
            val = float(eval_step(params, val_windows))
            write({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))})
            progress.log(f"step {step}: val loss {val:.4f} (perplexity {math.exp(min(val, 50.0)):.2f})")
            return val

        history: dict[str, list[float]] = {}
        val_losses: list[tuple[int, float]] = []
        pending: list[tuple[int, dict]] = []  # device-side metrics not yet fetched: no sync per step
        t_last, steps_since, tok_s = time.perf_counter(), 0, float("nan")
        t_start = t_last
        measured_tokens, measured_time = 0, 0.0

        def read_metrics(done: int) -> None:
            """Fetch the steps in ``pending`` (one device sync), log each, update the progress bar."""
            nonlocal pending, t_last, steps_since, tok_s, measured_tokens, measured_time
            fetched = jax.device_get(pending)
            now = time.perf_counter()
            elapsed = now - t_last
            tok_s = steps_since * tokens_per_step / elapsed
            tok_s_device = tok_s / n_devices
            speed = {"tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s_device}
            if peak is not None:
                speed["mfu"] = perf.mfu(tok_s_device, flops_token, peak[0])
            # The first interval includes compilation; leave it out of the run's average.
            if fetched[0][0] > start:
                measured_tokens += steps_since * tokens_per_step
                measured_time += elapsed
            for s, m in fetched:
                m = {k: float(v) for k, v in m.items()}
                for k, v in m.items():
                    history.setdefault(k, []).append(v)
                write({"step": s + 1, "loss": m.pop("loss"), "lr": float(schedule(s)), "grad_norm": m.pop("grad_norm"),
                       **speed, **{k: v for k, v in m.items() if k != "tokens"}})
            if log is not None:
                log.flush()
            last = fetched[-1][1]
            extra = "".join(f"  {_BAR_NAMES.get(k, k)} {float(last[k]):.3f}" for k in objective.metric_names if k in _BAR_NAMES)
            per_device = f" ({tok_s_device:,.0f}/device)" if n_devices > 1 else ""
            mfu_text = f"  MFU {speed['mfu']:.1%}" if "mfu" in speed else ""
            progress.update(done, f"loss {float(last['loss']):.4f}{extra}  {tok_s:,.0f} tok/s{per_device}{mfu_text}")
            pending, t_last, steps_since = [], now, 0

        # The device never waits for the host: the next step's batch is built and placed while this
        # step runs, and an interval's metrics are read only after the following step is dispatched.
        batch = global_batch(start) if start < end else None
        deferred = None  # the step whose interval's metrics are due but not yet read
        for step in range(start, end):
            step_arr = sharding.replicate(np.int32(step), rep)
            params, opt_state, metrics = compiled(params, opt_state, batch, step_arr, key, objective)
            if step + 1 < end:
                batch = global_batch(step + 1)
            if deferred is not None:
                read_metrics(deferred)
                deferred = None
            pending.append((step, metrics))
            steps_since += 1
            done = step + 1
            evaluating = done % cfg.eval_interval == 0 or done == cfg.steps
            saving = done % cfg.ckpt_interval == 0 or done == end
            # Read before an evaluation or a checkpoint at once: the log then holds every step the
            # checkpoint holds, and the records come in the same order however the run was interrupted.
            if done == end or saving or evaluating:
                read_metrics(done)
            elif done % cfg.log_interval == 0:
                deferred = done
            t_pause = time.perf_counter()
            if evaluating:
                val_losses.append((done, evaluate(done)))
            if saving:
                if log is not None:
                    log.flush()
                ckpt.save(manager, done, params=params, opt_state=opt_state, meta=meta_for(done))
            t_last += time.perf_counter() - t_pause  # evaluation and saving stay out of tokens/s
        manager.wait_until_finished()
    finally:
        if progress is not None:
            progress.stop()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    return {
        "losses": history.get("loss", []),
        "history": history,
        "val_losses": val_losses,
        "final_step": end,
        "tokens_per_s": measured_tokens / measured_time if measured_time else tok_s,
        "wall_s": time.perf_counter() - t_start,
        "n_params": n_params,
        "model_config": model_cfg,
        "seq_len": T,
        "model": nnx.merge(graphdef, params),
    }


def train(cfg: TrainConfig, run_dir: str, *, resume: bool = False, stop_after: int | None = None,
          quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on its text corpus, or on a prepared dataset, into ``run_dir`` (see ``fit`` for what comes back).

    ``cfg.data`` names a text file (tokenized here), a directory written by `arjax data prepare`
    (its shards are memory-mapped and its tokenizer used), or nothing (the bundled corpus). On
    resume the run's saved tokenizer is used (a char vocabulary must not change); otherwise a
    fresh one is built. The tokenizer is saved in ``run_dir`` so that ``arjax generate --ckpt``
    needs nothing else.
    """
    check_run_dir(run_dir, resume)
    saved = ckpt.read_meta(run_dir)[1] if resume else None
    tok_dir = ckpt.tokenizer_dir(run_dir)
    fix = (f"--data {cfg.data or 'pydoc'!r} must be the run's own data; resume with the same data or start a new --out")
    if cfg.data is not None and os.path.isdir(cfg.data):  # a prepared dataset (or a clear error saying how to make one)
        prepared = open_prepared(cfg.data)
        check_run_config(prepared, cfg)
        if resume:  # the same shards and tokenizer as the run's, checked before either is used
            ckpt.check_data(run_dir, saved, prepared.digest, found=f"the prepared data in {cfg.data!r}",
                            expected="the data", fix=fix)
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
    check_fits(tokenizer, model_cfg.vocab_size,
               fix="remove vocab_size from model_overrides (it then follows the tokenizer) or raise it")
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
        print(f"data: {len(train_ids):,} train / {len(val_ids):,} val tokens ({getattr(tokenizer, 'kind', '?')} tokenizer)")
    return fit(
        cfg, run_dir, model_cfg=model_cfg, source=source, val_windows=val_windows, pad_id=tokenizer.pad_id,
        resume=resume, stop_after=stop_after, quiet=quiet,
        meta={"tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__), "data_sha256": data_sha256,
              "tokenizer_sha256": ckpt.tokenizer_digest(run_dir)},
    )
