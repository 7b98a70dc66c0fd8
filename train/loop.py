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

from arjax.model.config import ModelConfig
from arjax.model.transformer import Transformer, count_params
from arjax.train import checkpoint as ckpt
from arjax.train import data as data_lib
from arjax.train.config import TrainConfig
from arjax.train.exposure.scheduled_sampling import ScheduledSampling
from arjax.train.optim import optimizer_from_config
from arjax.model.rng import seed_key
from arjax.train.step import TeacherForcing, make_eval_step, make_train_step
from arjax.train.tokenizer import build_tokenizer, check_fits, load_tokenizer

# Short names for the objective's metrics in the progress bar.
_BAR_NAMES = {"mix_rate": "mix", "gold_prob": "gold", "differ_rate": "differ"}


# Run-config keys a resumed run may change: they decide how far the run goes, how often it logs,
# evaluates and saves, and where its inputs now live, not what any step computes.
RESUMABLE_KEYS = ("steps", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "max_to_keep", "data",
                  "tokenizer_path")


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
    """Train ``model_cfg`` on ``source`` (``batch(batch_size=, seed=, step=) -> [n, T+1]``) into ``run_dir``.

    ``val_windows`` [E, B, T+1] are evaluated (teacher-forced NLL) every ``cfg.eval_interval``
    steps and at the end; ``meta`` is stored in every checkpoint beside the configs. ``stop_after``
    ends this invocation after that many optimizer steps (as if interrupted; a checkpoint is
    written), which the resume tests use to split one run in two. Returns per-step losses and
    objective metrics, val losses, tokens/s, the final step and the trained ``model``.
    """
    check_run_dir(run_dir, resume)
    T = source.seq_len
    key = seed_key(cfg.seed)
    model = Transformer(model_cfg, rngs=nnx.Rngs(key))
    graphdef, params = nnx.split(model)
    del model
    tx, schedule = optimizer_from_config(cfg)
    opt_state = tx.init(params)
    start = 0
    if resume:  # the newest intact checkpoint; damaged newer ones are moved aside (kept) with a warning
        start, _, params, opt_state = ckpt.restore_training_state(
            run_dir, params=params, opt_state=opt_state, check=lambda step, meta: check_same_run(run_dir, meta, cfg, model_cfg))
    os.makedirs(run_dir, exist_ok=True)
    manager = ckpt.make_manager(run_dir, max_to_keep=cfg.max_to_keep)

    objective = objective_for(cfg, pad_id=pad_id, dropout=model_cfg.dropout > 0)
    train_step = make_train_step(graphdef, tx, objective)
    eval_step = make_eval_step(graphdef, pad_id=pad_id)
    A, B = cfg.accum_steps, cfg.batch_size
    tokens_per_step = A * B * T
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    log_path = os.path.join(run_dir, "metrics.jsonl")
    if resume and start > 0 and not os.path.isfile(log_path):
        warnings.warn(f"{log_path} is missing: the steps before {start} are not in it; it starts again at step {start + 1}",
                      stacklevel=2)
    _keep_logged_steps(log_path, start)
    log = open(log_path, "a", encoding="utf-8")
    tb = None
    progress = None
    try:
        tb = _tensorboard_writer(os.path.join(run_dir, "tb"), purge_step=start + 1 if resume else None)
        n_params = count_params(model_cfg)
        progress = _Progress(cfg.steps, start, quiet, label)
        progress.log(
            f"model: {n_params / 1e6:.2f}M params ({model_cfg.n_layers} layers x {model_cfg.d_model}), vocab "
            f"{model_cfg.vocab_size}, context {T}; {tokens_per_step:,} tokens per step"
        )
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
        for step in range(start, end):
            windows = source.batch(batch_size=A * B, seed=cfg.seed, step=step)
            params, opt_state, metrics = train_step(params, opt_state, windows.reshape(A, B, T + 1), step, key)
            pending.append((step, metrics))
            steps_since += 1
            done = step + 1
            evaluating = done % cfg.eval_interval == 0 or done == cfg.steps
            saving = done % cfg.ckpt_interval == 0 or done == end
            # Fetch before an evaluation or a checkpoint, too: the log then holds every step the checkpoint
            # holds, and the records come in the same order however the run was interrupted.
            if done % cfg.log_interval == 0 or done == end or saving or evaluating:
                fetched = jax.device_get(pending)  # one sync for the whole interval
                now = time.perf_counter()
                elapsed = now - t_last
                tok_s = steps_since * tokens_per_step / elapsed
                # The first interval includes compilation; leave it out of the run's average.
                if step >= start + cfg.log_interval:
                    measured_tokens += steps_since * tokens_per_step
                    measured_time += elapsed
                for s, m in fetched:
                    m = {k: float(v) for k, v in m.items()}
                    for k, v in m.items():
                        history.setdefault(k, []).append(v)
                    write({"step": s + 1, "loss": m.pop("loss"), "lr": float(schedule(s)), "grad_norm": m.pop("grad_norm"),
                           "tokens_per_s": tok_s, **{k: v for k, v in m.items() if k != "tokens"}})
                log.flush()
                last = fetched[-1][1]
                extra = "".join(f"  {_BAR_NAMES.get(k, k)} {float(last[k]):.3f}" for k in objective.metric_names if k in _BAR_NAMES)
                progress.update(done, f"loss {float(last['loss']):.4f}{extra}  {tok_s:,.0f} tok/s")
                pending, t_last, steps_since = [], now, 0
            t_pause = time.perf_counter()
            if evaluating:
                val_losses.append((done, evaluate(done)))
            if saving:
                log.flush()
                ckpt.save(manager, done, params=params, opt_state=opt_state, meta=meta_for(done))
            t_last += time.perf_counter() - t_pause  # evaluation and saving stay out of tokens/s
        manager.wait_until_finished()
    finally:
        if progress is not None:
            progress.stop()
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
    """Train ``cfg`` on its text corpus into ``run_dir`` (see ``fit`` for what comes back).

    On resume the run's saved tokenizer is used (a char vocabulary must not change); otherwise a
    fresh one is built. The tokenizer is saved in ``run_dir`` so that ``arjax generate --ckpt``
    needs nothing else.
    """
    check_run_dir(run_dir, resume)
    text = data_lib.read_text(cfg.data, cfg.data_errors)
    if resume:  # the same text and the same tokenizer as the run's, checked before either is used
        saved = ckpt.read_meta(run_dir)[1]
        ckpt.check_text(run_dir, saved, text, fix=f"--data {cfg.data or 'pydoc'!r} must be the run's own text; resume "
                        "with the same data or start a new --out")
        ckpt.check_tokenizer(run_dir, saved)
    tok_dir = ckpt.tokenizer_dir(run_dir)
    if resume and os.path.isdir(tok_dir):
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = build_tokenizer(cfg.tokenizer, text=text, path=cfg.tokenizer_path)
    split = data_lib.tokenize_and_split(text, tokenizer, val_fraction=cfg.val_fraction)
    model_cfg = cfg.model_config(vocab_size=tokenizer.vocab_size)
    check_fits(tokenizer, model_cfg.vocab_size,
               fix="remove vocab_size from model_overrides (it then follows the tokenizer) or raise it")
    T = cfg.context_len(model_cfg)
    source = data_lib.Windows(split.train, T)
    val_windows = data_lib.eval_windows(split.val, n_windows=cfg.eval_iters * cfg.batch_size, seq_len=T)
    val_windows = val_windows.reshape(cfg.eval_iters, cfg.batch_size, T + 1)  # [E, B, T+1]
    tokenizer.save(tok_dir)
    if not quiet:
        print(f"data: {len(split.train):,} train / {len(split.val):,} val tokens ({getattr(tokenizer, 'kind', '?')} tokenizer)")
    return fit(
        cfg, run_dir, model_cfg=model_cfg, source=source, val_windows=val_windows, pad_id=tokenizer.pad_id,
        resume=resume, stop_after=stop_after, quiet=quiet,
        meta={"tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__), "data_sha256": ckpt.text_digest(text),
              "tokenizer_sha256": ckpt.tokenizer_digest(run_dir)},
    )
