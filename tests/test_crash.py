"""A run killed with SIGKILL at random moments, often mid-checkpoint, and resumed each time ends
exactly as an uninterrupted one."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from arjax.train import checkpoint as ckpt
from arjax.train.config import load_config
from arjax.train.loop import train

CONFIG = (
    "model: tiny\nmodel_overrides: {n_layers: 1, dropout: 0.1}\ntokenizer: byte\nbatch_size: 8\nseq_len: 32\n"
    "steps: 120\nwarmup_steps: 2\neval_interval: 20\neval_iters: 1\nlog_interval: 7\nckpt_interval: 3\nmax_to_keep: 2\n"
)


def _records(run):
    """metrics.jsonl without the one thing that may differ between runs: the measured tokens/s."""
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "tokens_per_s_per_device", "mfu")}
            for line in f
        ]


def _launch(cfg_path, data, run, resume, env):
    argv = [
        sys.executable,
        "-m",
        "arjax.train.cli",
        "train",
        "--config",
        cfg_path,
        "--data",
        data,
        "--out",
        run,
        "--quiet",
    ]
    return subprocess.Popen(
        argv + (["--resume"] if resume else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )


def _logged_steps(run) -> int:
    try:
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_five_times_then_resume_equals_an_uninterrupted_run(tmp_path, subprocess_env):
    data = tmp_path / "text.txt"
    data.write_text("".join(f"{i}: sphinx of black quartz, judge my vow.\n" for i in range(300)))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(CONFIG)
    straight = str(tmp_path / "straight")
    train(load_config(str(cfg_path), data=str(data)), straight, quiet=True)

    run = str(tmp_path / "killed")
    rng = random.Random(0)
    kills, during_save, attempts = 0, 0, 0
    while kills < 5 or during_save < 2:
        attempts += 1
        assert attempts <= 15, f"{kills} kills, {during_save} during a save, after {attempts - 1} attempts"
        before = _logged_steps(run)
        proc = _launch(str(cfg_path), str(data), run, bool(ckpt.all_steps(run)), subprocess_env)
        deadline = time.time() + 120
        while _logged_steps(run) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # wait until this process trains (imports and compilation done)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break  # it finished before we could kill it (120 steps leave room for far more than 5 kills)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        # orbax writes a checkpoint into a temporary folder and renames it when complete: one left
        # behind means the kill landed mid-save.
        during_save += bool(glob.glob(os.path.join(run, "checkpoints", "*.orbax-checkpoint-tmp*")))
    assert kills >= 5 and during_save >= 2, (kills, during_save)
    proc = _launch(str(cfg_path), str(data), run, bool(ckpt.all_steps(run)), subprocess_env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    # Every step logged exactly once, in order, with the uninterrupted run's values; the same weights.
    assert _records(run) == _records(straight)
    a, _, _ = ckpt.load_model(run)
    b, _, _ = ckpt.load_model(straight)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
