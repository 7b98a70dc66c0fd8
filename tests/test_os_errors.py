"""The operating system says no (a full disk, a read-only directory, a file in the way): one line,
and nothing saved is lost."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from arjax.train import checkpoint as ckpt
from arjax.train.cli import main
from arjax.train.config import load_config
from arjax.train.loop import train

CONFIG = (
    "model: tiny\nmodel_overrides: {n_layers: 1}\ntokenizer: byte\nbatch_size: 2\nseq_len: 16\nsteps: 12\n"
    "warmup_steps: 2\neval_interval: 12\neval_iters: 1\nlog_interval: 1\nckpt_interval: 1\nmax_to_keep: 20\n"
)


def _mount(path, options):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the disk-full and read-only cases need one")
    return path


@pytest.fixture
def mounts(tmp_path):
    made = []

    def make(name, options):
        made.append(_mount(tmp_path / name, options))
        return made[-1]

    yield make
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _arjax(env, *argv):
    return subprocess.run(
        [sys.executable, "-m", "arjax.train.cli", *argv], capture_output=True, text=True, timeout=300, env=env
    )


def test_a_full_disk_is_one_line_and_the_run_resumes_from_its_last_checkpoint(mounts, tmp_path, subprocess_env):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    disk = mounts("small", "size=2m")  # room for about four checkpoints of this model
    run = str(disk / "run")
    out = _arjax(subprocess_env, "train", "--config", str(cfg), "--out", run, "--quiet")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert (
        out.stderr.startswith("arjax train: error: no space left on the device while writing")
        and "--resume" in out.stderr
    )
    saved = ckpt.all_steps(run)
    assert saved and all(r["ok"] for r in ckpt.verify(run))  # every checkpoint written before the failure is intact
    # Space comes back; the run continues where its last checkpoint left off and ends as an uninterrupted one.
    assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
    out = _arjax(subprocess_env, "train", "--out", run, "--resume", "--quiet")
    assert out.returncode == 0, out.stderr[-2000:]
    straight = str(tmp_path / "straight")
    train(load_config(str(cfg)), straight, quiet=True)

    def records(r):
        with open(os.path.join(r, "metrics.jsonl")) as f:
            return [
                {k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "tokens_per_s_per_device", "mfu")}
                for x in f
            ]

    assert records(run) == records(straight)
    a, _, _ = ckpt.load_model(run)
    b, _, _ = ckpt.load_model(straight)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_read_only_directory_and_a_file_in_the_way_are_one_line(mounts, tmp_path, capsys):
    ro = mounts("ro", "ro,size=1m")
    for argv, needle in [
        (["train", "--out", str(ro / "run"), "--steps", "1", "--quiet"], "Read-only file system"),
        (
            ["tokenizer", "train", "--data", __file__, "--vocab-size", "300", "--out", str(ro / "tok")],
            "Read-only file system",
        ),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and str(ro) in err, err
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    assert main(["train", "--out", str(blocker / "run"), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker) in err, err
