"""The training loop: data, model, optimizer, resume, rich progress, JSONL (and TensorBoard if installed) metrics, checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
from flax import nnx

from arjax.model.transformer import Transformer, count_params
from arjax.train import checkpoint as ckpt
from arjax.train import data as data_lib
from arjax.train.config import TrainConfig
from arjax.train.optim import optimizer_from_config
from arjax.train.step import make_eval_step, make_train_step
from arjax.train.tokenizer import build_tokenizer, load_tokenizer


def _tensorboard_writer(log_dir: str):
    """A TensorBoard writer when a writer package is already installed; we add no dependency for it."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(log_dir)
        except Exception:  # not installed, or torch without the tensorboard package
            continue
    return None


class _Progress:
    """A rich progress bar with loss, tokens/s and ETA; silent when ``quiet``."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.bar = None
        if quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="compiling...")
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


def prepare_tokenizer(cfg: TrainConfig, text: str, run_dir: str, resume: bool):
    """On resume, the run's saved tokenizer (a char vocabulary must not change); else a fresh one."""
    tok_dir = ckpt.tokenizer_dir(run_dir)
    if resume and os.path.isdir(tok_dir):
        return load_tokenizer(tok_dir)
    return build_tokenizer(cfg.tokenizer, text=text, path=cfg.tokenizer_path)


def train(cfg: TrainConfig, run_dir: str, *, resume: bool = False, stop_after: int | None = None,
          quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``. Returns per-step losses, val losses, tokens/s and the final step.

    ``stop_after`` ends this invocation after that many optimizer steps (as if interrupted;
    a checkpoint is written), which the resume test uses to split one run in two.
    """
    manager = ckpt.make_manager(run_dir, max_to_keep=cfg.max_to_keep)
    latest = manager.latest_step()
    if resume and latest is None:
        raise ValueError(f"--resume given but {run_dir!r} has no checkpoint; drop --resume to start a new run")
    if not resume and latest is not None:
        raise ValueError(
            f"{run_dir!r} already holds checkpoints (latest step {latest}); pass --resume to continue it "
            "or choose a new --out directory"
        )

    text = data_lib.read_text(cfg.data)
    tokenizer = prepare_tokenizer(cfg, text, run_dir, resume)
    split = data_lib.tokenize_and_split(text, tokenizer, val_fraction=cfg.val_fraction)
    model_cfg = cfg.model_config(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}; "
            "remove vocab_size from model_overrides (it then follows the tokenizer) or raise it"
        )
    T = cfg.context_len(model_cfg)
    data_lib.check_length(split.train, T, "training")
    val_windows = data_lib.eval_windows(split.val, n_windows=cfg.eval_iters * cfg.batch_size, seq_len=T)
    val_windows = val_windows.reshape(cfg.eval_iters, cfg.batch_size, T + 1)  # [E, B, T+1]

    model = Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    del model
    tx, schedule = optimizer_from_config(params, cfg)
    opt_state = tx.init(params)
    start = 0
    if resume:
        start, meta = ckpt.read_meta(run_dir, latest)
        ckpt.check_compatible(run_dir, meta["model_config"], model_cfg)
        params, opt_state = ckpt.restore(manager, start, params=params, opt_state=opt_state)
    os.makedirs(run_dir, exist_ok=True)
    tokenizer.save(ckpt.tokenizer_dir(run_dir))

    train_step = make_train_step(graphdef, tx, seed=cfg.seed, use_dropout=model_cfg.dropout > 0, pad_id=tokenizer.pad_id)
    eval_step = make_eval_step(graphdef, pad_id=tokenizer.pad_id)
    A, B = cfg.accum_steps, cfg.batch_size
    tokens_per_step = A * B * T
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    log_path = cfg.log_file or os.path.join(run_dir, "metrics.jsonl")
    log = open(log_path, "a", encoding="utf-8")
    tb = _tensorboard_writer(os.path.join(run_dir, "tb"))
    n_params = count_params(model_cfg)
    progress = _Progress(cfg.steps, start, quiet)
    progress.log(
        f"model {cfg.model}: {n_params / 1e6:.2f}M params, vocab {model_cfg.vocab_size}, context {T}; "
        f"{len(split.train):,} train / {len(split.val):,} val tokens; {tokens_per_step:,} tokens per step"
    )

    def meta_for(step: int) -> dict[str, Any]:
        return {
            "seed": cfg.seed,
            # Batches are a pure function of (seed, step), so the step is the data position;
            # stored explicitly so that other samplers could resume from it.
            "data_position": {"step": step, "windows_consumed": step * A * B},
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__),
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

    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    pending: list[tuple[int, dict]] = []  # device-side metrics not yet fetched: no sync per step
    t_last, steps_since, tok_s = time.perf_counter(), 0, float("nan")
    t_start = t_last
    measured_tokens, measured_time = 0, 0.0
    for step in range(start, end):
        windows = data_lib.get_batch(split.train, batch_size=A * B, seq_len=T, seed=cfg.seed, step=step)
        params, opt_state, metrics = train_step(params, opt_state, windows.reshape(A, B, T + 1), step)
        pending.append((step, metrics))
        steps_since += 1
        done = step + 1
        if done % cfg.log_interval == 0 or done == end:
            fetched = jax.device_get(pending)  # one sync for the whole interval
            now = time.perf_counter()
            elapsed = now - t_last
            tok_s = steps_since * tokens_per_step / elapsed
            # The first interval includes compilation; leave it out of the run's average.
            if step >= start + cfg.log_interval:
                measured_tokens += steps_since * tokens_per_step
                measured_time += elapsed
            for s, m in fetched:
                losses.append(float(m["loss"]))
                write({"step": s + 1, "loss": float(m["loss"]), "lr": float(schedule(s)),
                       "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s})
            log.flush()
            progress.update(done, f"loss {losses[-1]:.4f}  {tok_s:,.0f} tok/s")
            pending, t_last, steps_since = [], now, 0
        t_pause = time.perf_counter()
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            val_losses.append((done, evaluate(done)))
        if done % cfg.ckpt_interval == 0 or done == end:
            ckpt.save(manager, done, params=params, opt_state=opt_state, meta=meta_for(done))
        t_last += time.perf_counter() - t_pause  # evaluation and saving stay out of tokens/s
    manager.wait_until_finished()
    progress.stop()
    log.close()
    if tb is not None:
        tb.close()
    return {
        "losses": losses,
        "val_losses": val_losses,
        "final_step": end,
        "tokens_per_s": measured_tokens / measured_time if measured_time else tok_s,
        "wall_s": time.perf_counter() - t_start,
        "n_params": n_params,
        "model_config": model_cfg,
        "seq_len": T,
    }
