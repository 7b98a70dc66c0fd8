"""Damaged checkpoints are caught and skipped: truncated, deleted or flipped array files, missing
metadata, wrong fingerprints."""

import gc
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.train import checkpoint as ckpt
from arjax.train.cli import main
from arjax.train.config import TrainConfig
from arjax.train.loop import train

# orbax leaves the reads of a damaged checkpoint's other arrays unawaited when one fails.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

_TEXT = "".join(f"entry {i}: pack my box with five dozen liquor jugs.\n" for i in range(200))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4-step run with a checkpoint after every step, and the same run stopped after 3 (for the resume test)."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "text.txt"
    data.write_text(_TEXT)
    cfg = TrainConfig(
        model="tiny",
        model_overrides={"n_layers": 1},
        data=str(data),
        batch_size=2,
        seq_len=16,
        steps=4,
        warmup_steps=1,
        eval_interval=4,
        eval_iters=1,
        log_interval=1,
        ckpt_interval=1,
        max_to_keep=4,
    )
    full = train(cfg, str(root / "full"), quiet=True)
    train(cfg, str(root / "three"), stop_after=3, quiet=True)
    return root, cfg, full


def _biggest_array_file(run, step, item="params"):
    files = glob.glob(os.path.join(run, "checkpoints", str(step), item, "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _truncate(run, step):
    path = _biggest_array_file(run, step)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _delete(run, step):
    os.remove(_biggest_array_file(run, step))


def _flip(run, step):
    path = _biggest_array_file(run, step)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def _drop_meta(run, step):
    os.remove(os.path.join(run, "checkpoints", str(step), "meta", "metadata"))


def _wrong_fingerprint(run, step):
    """The arrays read fine but one differs from what was recorded (as flipped bytes in raw storage would)."""
    path = os.path.join(run, "checkpoints", str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    name = sorted(meta["fingerprints"]["params"])[0]
    meta["fingerprints"]["params"][name] = "0" * 16
    with open(path, "w") as f:
        json.dump(meta, f)


def _edited_config(run, step):
    """Metadata edited by hand (a model setting that would silently change every result)."""
    path = os.path.join(run, "checkpoints", str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["model_config"]["norm_eps"] = 1.0
    with open(path, "w") as f:
        json.dump(meta, f)


DAMAGE = {
    "truncated": _truncate,
    "deleted": _delete,
    "flipped": _flip,
    "no metadata": _drop_meta,
    "wrong fingerprint": _wrong_fingerprint,
    "edited config": _edited_config,
}


def test_a_fingerprint_changes_with_any_flipped_bit_and_not_with_the_layout():
    x = jax.random.normal(jax.random.key(0), (64, 33))
    base = ckpt.fingerprints({"x": x})["x"]
    raw = np.asarray(x).view(np.uint32).copy()
    for index in (0, 1000, raw.size - 1):
        for bit in (0, 17, 31):
            y = raw.copy().reshape(-1)
            y[index] ^= np.uint32(1 << bit)
            assert ckpt.fingerprints({"x": jnp.asarray(y.view(np.float32).reshape(x.shape))})["x"] != base
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert ckpt.fingerprints({"x": swapped})["x"] != base
    for dtype in (jnp.bfloat16, jnp.int8, jnp.bool_, jnp.int32):
        assert len(ckpt.fingerprints({"x": jnp.zeros(5, dtype)})["x"]) == 16


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_with_one_warning(base, kind, tmp_path):
    root, cfg, full = base
    run = str(tmp_path / "run")
    shutil.copytree(root / "full", run)
    DAMAGE[kind](run, 4)
    with pytest.warns(
        ckpt.CheckpointWarning,
        match=r"checkpoint step 4 in .* is damaged \(.*\); it is kept on disk; trying the previous one",
    ):
        model, _, _ = ckpt.load_model(run)
    # Step 3's weights, read and verified; the damaged checkpoint is still there.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step3, _, _ = ckpt.load_model(run, step=3)
    np.testing.assert_array_equal(model.embed.embedding[...], step3.embed.embedding[...])
    assert ckpt.all_steps(run) == [1, 2, 3, 4]
    report = {r["step"]: r for r in ckpt.verify(run)}
    assert not report[4]["ok"] and report[4]["detail"].startswith("damaged") and report[3]["ok"]


def test_the_cli_warns_in_one_line_and_fails_in_one_line(base, tmp_path, capsys):
    root, cfg, full = base
    run = str(tmp_path / "run")
    shutil.copytree(root / "full", run)
    _truncate(run, 4)
    assert main(["eval", "--ckpt", run]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arjax eval: warning: checkpoint step 4") and "Traceback" not in err[0]
    assert main(["checkpoints", run]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "generate and eval use step 3, --resume uses step 3" in out
    for step in (1, 2, 3):
        _drop_meta(run, step)
    assert main(["generate", "--ckpt", run, "--prompt", "entry"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("arjax generate: error: no intact checkpoint in")
        and "step 4:" in err[-1]
        and "step 1:" in err[-1]
    )
    assert all(line.startswith("arjax generate: ") for line in err)  # warnings and the error, one line each


def test_resume_skips_a_damaged_checkpoint_and_matches_the_uninterrupted_run(base, tmp_path):
    """The run stopped after 3 steps has its step-3 checkpoint damaged: it resumes from step 2, moves
    step 3 aside (kept), redoes it and ends with the uninterrupted run's losses and weights."""
    root, cfg, full = base
    run = str(tmp_path / "run")
    shutil.copytree(root / "three", run)
    _flip(run, 3)
    _wrong_fingerprint(run, 3)  # whichever way the flip shows, the checkpoint is damaged
    with pytest.warns(ckpt.CheckpointWarning, match=r"step 3 .* is damaged .* moved to .*damaged"):
        resumed = train(cfg, run, resume=True, quiet=True)
    assert resumed["losses"] == full["losses"][2:]
    assert os.listdir(os.path.join(run, "damaged"))[0].startswith("3-")
    a, _, _ = ckpt.load_model(run)
    b, _, _ = ckpt.load_model(str(root / "full"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 4]  # step 3 logged once, though it ran twice


def test_an_edited_tokenizer_is_refused_not_used(base, tmp_path):
    root, _, _ = base
    run = str(tmp_path / "run")
    shutil.copytree(root / "full", run)
    meta = os.path.join(run, "tokenizer", "arjax_tokenizer.json")
    with open(meta, "w") as f:
        json.dump({"kind": "char", "chars": "ab"}, f)
    with pytest.raises(ValueError, match="is not the one checkpoint step 4 was saved with"):
        ckpt.load_model(run)


def test_an_interrupted_save_is_never_a_checkpoint(base, tmp_path):
    """A save killed midway leaves orbax's temporary folder, which no loader takes for a checkpoint."""
    root, cfg, full = base
    run = str(tmp_path / "run")
    shutil.copytree(root / "full", run)
    partial = os.path.join(run, "checkpoints", "5.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(run, "checkpoints", "4"), partial)
    os.remove(_biggest_array_file(run, "5.orbax-checkpoint-tmp-1234567"))
    assert ckpt.all_steps(run) == [1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_model(run)
    assert main(["checkpoints", run]) == 0


def test_checkpoints_command_runs_as_a_process(base, subprocess_env):
    root, _, _ = base
    out = subprocess.run(
        [sys.executable, "-m", "arjax.train.cli", "checkpoints", str(root / "full")],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(" ok ") == 4 and "arrays match their fingerprints" in out.stdout and not out.stderr


def _damaged_quietly_run(root, tmp_path):
    """Step 4 with a truncated array file and without orbax's own _CHECKPOINT_METADATA: the reads orbax
    abandons when one fails, and its "Metadata file does not exist" per read, are what used to reach stderr."""
    run = str(tmp_path / "run")
    shutil.copytree(root / "full", run)
    _truncate(run, 4)
    os.remove(os.path.join(run, "checkpoints", "4", "_CHECKPOINT_METADATA"))
    return run


def test_reading_a_damaged_checkpoint_leaves_nothing_to_print_later(base, tmp_path, caplog):
    root, _, _ = base
    run = _damaged_quietly_run(root, tmp_path)
    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                with pytest.warns(ckpt.CheckpointWarning, match="checkpoint step 4 in .* is damaged"):
                    ckpt.load_model(run)
                assert [r["ok"] for r in ckpt.verify(run)] == [True, True, True, False]
            time.sleep(0.5)  # reads still under way finish; what they leave is collected
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}" for u in unraisable[:3]]
    library = [f"{r.name}: {r.getMessage()[:200]}" for r in caplog.records if not r.name.startswith("arjax")]
    assert not library, library[:3]


def test_a_damaged_checkpoint_is_one_line_on_stderr_and_nothing_else(base, tmp_path, subprocess_env):
    """From the console script: one warning line from generate and eval, none from checkpoints (its report
    is on stdout), nothing from absl, orbax or asyncio, not even at exit; ARJAX_DEBUG=1 lets them speak."""
    root, _, _ = base
    run = _damaged_quietly_run(root, tmp_path)
    exe = os.path.join(os.path.dirname(sys.executable), "arjax")
    warning = f"warning: checkpoint step 4 in {run!r} is damaged (its arrays cannot be read"
    for argv, code, warns in [
        (["generate", "--ckpt", run, "--prompt", "entry", "--max-new-tokens", "2"], 0, 1),
        (["eval", "--ckpt", run], 0, 1),
        (["checkpoints", run], 1, 0),
    ]:
        proc = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=300, env=subprocess_env)
        lines = proc.stderr.splitlines()
        assert proc.returncode == code and len(lines) == warns, (argv, proc.returncode, proc.stderr[-3000:])
        assert all(line.startswith(f"arjax {argv[0]}: {warning}") for line in lines), lines
    debug = subprocess.run(
        [exe, "checkpoints", run],
        capture_output=True,
        text=True,
        timeout=300,
        env={**subprocess_env, "ARJAX_DEBUG": "1"},
    )
    assert debug.returncode == 1 and "Metadata file does not exist" in debug.stderr, debug.stderr[-3000:]
