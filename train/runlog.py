"""A training run's log (metrics.jsonl, TensorBoard, the progress bar) and the meter reading step metrics per interval.

``RunLog`` is where records go: ``fit`` opens it before step 0 and closes it on any exit. Process
0 writes; on the others it only keeps the run's history. ``StepMeter`` is what the records say: the
device-side metrics of each dispatched step, fetched with one device sync per interval, with
tokens/s and MFU over the interval.
"""

from __future__ import annotations

import contextlib
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arjax.train import perf

METRICS_FILE = "metrics.jsonl"

# Short names for the objective's metrics in the progress bar.
_BAR_NAMES = {"mix_rate": "mix", "gold_prob": "gold", "differ_rate": "differ"}


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
        except Exception:  # noqa: BLE001 (a broken install of any kind: train without TensorBoard rather than fail)
            continue
    return None


class _Progress:
    """A rich progress bar with loss, the objective's metrics, tokens/s and ETA; silent when ``quiet``."""

    def __init__(self, total: int, start: int, quiet: bool, label: str = "train"):
        self.bar = None
        if quiet:
            return
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
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


class RunLog:
    """Where a run reports: ``run_dir/metrics.jsonl`` (one JSON record per line), TensorBoard
    (``run_dir/tb``) when a writer package is installed, and the progress bar.

    ``start`` is the step the run starts from: on resume the log is cut back to it (steps logged
    after the checkpoint are written again, so each is logged once) and TensorBoard hides later
    events. ``writer=False`` (every process but the first) writes nothing and draws nothing.
    A context manager: the bar, the file and the writer are closed on any exit.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        start: int,
        resume: bool,
        total: int,
        quiet: bool,
        label: str = "train",
        writer: bool = True,
    ):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = self._tb = self._bar = None
        if writer and resume and start > 0 and not os.path.isfile(self.path):
            warnings.warn(
                f"{self.path} is missing: the steps before {start} are not in it; it starts again at step {start + 1}",
                stacklevel=3,
            )
        if writer:  # one process writes the logs; every process trains and writes its shards of each checkpoint
            _keep_logged_steps(self.path, start)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the run; closed by close())
        try:
            if writer:
                self._tb = _tensorboard_writer(os.path.join(run_dir, "tb"), purge_step=start + 1 if resume else None)
            self._bar = _Progress(total, start, quiet or not writer, label)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: dict[str, Any]) -> None:
        """One record (``step`` and numbers) into the JSONL file, its numbers into TensorBoard."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def info(self, msg: str) -> None:
        """A line above the progress bar (nothing when quiet)."""
        self._bar.log(msg)

    def progress(self, step: int, text: str) -> None:
        """Move the bar to ``step`` with ``text`` beside it."""
        self._bar.update(step, text)

    def evaluation(self, step: int, loss: float) -> None:
        """A validation record (loss and perplexity) and its line."""
        ppl = math.exp(min(loss, 50.0))
        self.write({"step": step, "val_loss": loss, "val_ppl": ppl})
        self.info(f"step {step}: val loss {loss:.4f} (perplexity {ppl:.2f})")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def host_schedule(schedule):
    """``learning_rates(steps) -> [float]``: an optax schedule evaluated for the log on the host's CPU.

    Called eagerly on the default device (a GPU), the schedule's dozens of small ops would queue
    behind the step in flight and each read back at once: every log interval would drain the
    device's queue and leave it idle while the host computed learning rates one op at a time
    (measured on an H200: GPT-2 small's logged step took 72 ms against 43 ms for the same
    compiled step back to back). Here the steps of an interval are one vectorised call on the CPU
    device, never touching the accelerator's stream; it is called once here so that its first
    dispatch cost falls before training starts."""
    # This process's own CPU device: under ``jax.distributed`` ``jax.devices("cpu")[0]`` is process
    # 0's, and computing on another host's device would need that host's collectives.
    cpu = jax.local_devices(backend="cpu")[0]

    def learning_rates(steps) -> list[float]:
        with jax.default_device(cpu):
            return [float(x) for x in np.asarray(schedule(np.asarray(steps, np.int32))).reshape(-1)]

    learning_rates([0])
    return learning_rates


class StepMeter:
    """The metrics of dispatched steps, read from the device once per interval (``read``: one sync).

    Each step becomes one record in ``log`` (loss, lr, grad_norm, tokens/s and MFU over its
    interval, the objective's metrics), its numbers are kept in ``history``, and the bar shows the
    interval's last step. Time spent in ``paused()`` (evaluation, checkpoints) is left out of
    tokens/s, and so is the first interval (compilation) from the run's average ``tokens_per_s``.
    """

    def __init__(
        self,
        log: RunLog,
        *,
        start: int,
        tokens_per_step: int,
        n_devices: int,
        flops_per_token: float,
        peak: tuple[float, str] | None,
        schedule,
        metric_names: tuple[str, ...],
    ):
        self.log, self.start, self.tokens_per_step, self.n_devices = log, start, tokens_per_step, n_devices
        self.flops_per_token, self.peak = flops_per_token, peak
        self.learning_rates = host_schedule(schedule)
        self.metric_names = metric_names
        self.history: dict[str, list[float]] = {}
        self.pending: list[tuple[int, dict]] = []  # device-side metrics not yet fetched: no sync per step
        self.t_last = self.t_start = time.perf_counter()
        self.steps_since, self.last_tokens_per_s = 0, float("nan")
        self.measured_tokens, self.measured_time = 0, 0.0

    def add(self, step: int, metrics: dict) -> None:
        """Step ``step``'s metrics (device arrays, not read yet)."""
        self.pending.append((step, metrics))
        self.steps_since += 1

    def read(self, done: int) -> None:
        """Fetch the pending steps (one device sync), log each, move the bar to ``done``."""
        fetched = jax.device_get(self.pending)
        now = time.perf_counter()
        elapsed = now - self.t_last
        tok_s = self.steps_since * self.tokens_per_step / elapsed
        tok_s_device = tok_s / self.n_devices
        speed = {"tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s_device}
        if self.peak is not None:
            speed["mfu"] = perf.mfu(tok_s_device, self.flops_per_token, self.peak[0])
        # The first interval includes compilation; leave it out of the run's average.
        if fetched[0][0] > self.start:
            self.measured_tokens += self.steps_since * self.tokens_per_step
            self.measured_time += elapsed
        lrs = self.learning_rates([s for s, _ in fetched])
        for (s, m), lr in zip(fetched, lrs):
            m = {k: float(v) for k, v in m.items()}
            for k, v in m.items():
                self.history.setdefault(k, []).append(v)
            self.log.write(
                {
                    "step": s + 1,
                    "loss": m.pop("loss"),
                    "lr": lr,
                    "grad_norm": m.pop("grad_norm"),
                    **speed,
                    **{k: v for k, v in m.items() if k != "tokens"},
                }
            )
        self.log.flush()
        last = fetched[-1][1]
        extra = "".join(f"  {_BAR_NAMES.get(k, k)} {float(last[k]):.3f}" for k in self.metric_names if k in _BAR_NAMES)
        per_device = f" ({tok_s_device:,.0f}/device)" if self.n_devices > 1 else ""
        mfu_text = f"  MFU {speed['mfu']:.1%}" if "mfu" in speed else ""
        self.log.progress(done, f"loss {float(last['loss']):.4f}{extra}  {tok_s:,.0f} tok/s{per_device}{mfu_text}")
        self.pending, self.t_last, self.steps_since, self.last_tokens_per_s = [], now, 0, tok_s

    @contextlib.contextmanager
    def paused(self):
        """Time inside is not training time: evaluation and saving stay out of tokens/s."""
        t_pause = time.perf_counter()
        yield
        self.t_last += time.perf_counter() - t_pause

    @property
    def tokens_per_s(self) -> float:
        """The run's training throughput, compilation aside (the last interval's when that was all)."""
        return self.measured_tokens / self.measured_time if self.measured_time else self.last_tokens_per_s

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.t_start
