"""The run log: one JSONL record per step across a resume, nothing from other processes, metrics per interval."""

import json
import warnings

import numpy as np
import pytest

from arjax.train.runlog import RunLog, StepMeter


def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]


def test_a_resumed_log_is_cut_back_to_the_checkpoint_and_written_on(tmp_path):
    with RunLog(str(tmp_path), start=0, resume=False, total=4, quiet=True) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # a record cut short by a kill
    with RunLog(str(tmp_path), start=2, resume=True, total=4, quiet=True) as log:  # the checkpoint held step 2
        log.write({"step": 3, "loss": 0.3})
        log.evaluation(3, 0.5)
    assert [(r["step"], sorted(r)) for r in _records(tmp_path)] == [
        (1, ["loss", "step"]),
        (2, ["loss", "step"]),
        (3, ["loss", "step"]),
        (3, ["step", "val_loss", "val_ppl"]),
    ]


def test_a_resume_without_its_log_warns_and_other_processes_write_nothing(tmp_path):
    (tmp_path / "a").mkdir()  # fit makes the run directory first
    with pytest.warns(UserWarning, match=r"metrics.jsonl is missing: the steps before 5 are not in it"):
        RunLog(str(tmp_path / "a"), start=5, resume=True, total=9, quiet=True).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunLog(str(tmp_path), start=5, resume=True, total=9, quiet=True, writer=False) as log:
            log.write({"step": 6, "loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_meter_logs_every_step_of_an_interval_once_with_its_speed(tmp_path):
    with RunLog(str(tmp_path), start=0, resume=False, total=3, quiet=True) as log:
        meter = StepMeter(
            log,
            start=0,
            tokens_per_step=100,
            n_devices=1,
            flops_per_token=1.0,
            peak=None,
            schedule=lambda s: 0.1 * s,
            metric_names=("gold_prob",),
        )
        for step in range(3):
            meter.add(
                step,
                {
                    "loss": np.float32(3 - step),
                    "grad_norm": np.float32(1),
                    "tokens": np.float32(100),
                    "gold_prob": np.float32(0.5),
                },
            )
            if step == 1:
                meter.read(2)
            with meter.paused():
                pass
        meter.read(3)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == [3.0, 2.0, 1.0] and records[2]["lr"] == pytest.approx(0.2)
    assert all(r["gold_prob"] == 0.5 and "tokens" not in r and r["tokens_per_s"] > 0 for r in records)
    assert meter.history["loss"] == [3.0, 2.0, 1.0] and meter.tokens_per_s > 0  # the first interval left out


def test_learning_rates_for_the_log_are_one_call_per_interval_on_the_cpu_device():
    """The log's learning rates never run on the accelerator's stream (there, eager schedule ops
    queued behind the step in flight drained the queue at every log interval): the interval's steps
    go to the schedule as one array, with the CPU device as the default device."""
    import jax
    import optax

    from arjax.train.runlog import host_schedule

    calls = []

    def schedule(steps):
        calls.append((np.shape(steps), jax.config.jax_default_device))
        return optax.warmup_cosine_decay_schedule(0.0, 6e-4, 10, 100, 6e-5)(steps)

    lrs = host_schedule(schedule)
    calls.clear()  # the warm-up call at construction
    got = lrs([3, 4, 50, 99])
    reference = optax.warmup_cosine_decay_schedule(0.0, 6e-4, 10, 100, 6e-5)
    assert got == pytest.approx([float(reference(s)) for s in (3, 4, 50, 99)], rel=1e-6)
    assert calls == [((4,), jax.devices("cpu")[0])]
