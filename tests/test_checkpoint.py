"""Checkpoints: stop-and-resume reproduces an uninterrupted run exactly; mismatched models are refused."""

import shutil

import numpy as np
import pytest

from arjax.train import checkpoint as ckpt
from arjax.train.config import TrainConfig
from arjax.train.loop import train

# Tiny and short; a small text file keeps tokenization instant.
_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(_TEXT)
    return TrainConfig(
        model="tiny",
        model_overrides={"dropout": 0.1},
        data=str(path),
        batch_size=4,
        seq_len=32,
        steps=8,
        warmup_steps=2,
        eval_interval=4,
        eval_iters=2,
        log_interval=2,
        ckpt_interval=1,
        max_to_keep=2,
    )


@pytest.fixture(scope="module")
def runs(cfg, tmp_path_factory):
    """One uninterrupted run and the same run stopped after 4 steps and resumed (3 compiles in all)."""
    root = tmp_path_factory.mktemp("runs")
    straight = train(cfg, str(root / "a"), quiet=True)
    first = train(cfg, str(root / "b"), stop_after=4, quiet=True)
    latest_after_stop = ckpt.make_manager(str(root / "b")).latest_step()
    second = train(cfg, str(root / "b"), resume=True, quiet=True)
    return root, straight, first, second, latest_after_stop


def test_stop_and_resume_gives_identical_losses(cfg, runs):
    root, straight, first, second, latest_after_stop = runs
    assert first["final_step"] == 4 and latest_after_stop == 4
    assert len(straight["losses"]) == 8
    # Exactly equal, not close: same params, optimizer state, batches and dropout keys.
    assert first["losses"] + second["losses"] == straight["losses"]
    assert second["val_losses"] == [(8, straight["val_losses"][-1][1])]
    _, meta = ckpt.read_meta(str(root / "b"))
    assert meta["step"] == 8 and meta["data_position"]["step"] == 8 and meta["seed"] == 0
    assert meta["train_config"]["model"] == "tiny" and meta["model_config"]["dropout"] == 0.1

    model, tok, saved_cfg = ckpt.load_model(str(root / "b"))
    assert saved_cfg == cfg and model.cfg.vocab_size == tok.vocab_size == 256
    model_a, _, _ = ckpt.load_model(str(root / "a"))
    np.testing.assert_array_equal(model.embed.embedding[...], model_a.embed.embedding[...])


def test_max_to_keep(runs):
    root = runs[0]
    assert ckpt.make_manager(str(root / "a")).all_steps() == [7, 8]  # ckpt_interval 1, max_to_keep 2


def test_resume_refuses_a_different_model_naming_the_keys(cfg, runs):
    other = cfg.replace(steps=10, model_overrides={"dropout": 0.1, "d_model": 64, "n_layers": 3})
    with pytest.raises(
        ValueError, match=r"d_model: checkpoint 32 vs requested 64, n_layers: checkpoint 2 vs requested 3"
    ):
        train(other, str(runs[0] / "a"), resume=True, quiet=True)


def test_resume_refuses_other_run_settings_and_other_data(cfg, runs, tmp_path):
    run = str(tmp_path / "a")
    shutil.copytree(runs[0] / "a", run)  # the module's runs stay as they are for the other tests
    with pytest.raises(
        ValueError, match=r"other settings \(lr: checkpoint 0.001 vs now 0.002; seed: checkpoint 0 vs now 1\)"
    ):
        train(cfg.replace(lr=2e-3, seed=1), run, resume=True, quiet=True)
    with pytest.raises(ValueError, match=r"steps=5 is below the checkpoint's step 8"):
        train(cfg.replace(steps=5), run, resume=True, quiet=True)
    other = tmp_path / "other.txt"
    other.write_text(_TEXT.replace("fox", "cat"))
    with pytest.raises(ValueError, match="is not the text the run .* was trained on"):
        train(cfg.replace(data=str(other), steps=9), run, resume=True, quiet=True)
    # What may change: how far it goes, how often it logs, evaluates and saves, where its data lives.
    moved = tmp_path / "moved.txt"
    moved.write_text(_TEXT)
    more = train(cfg.replace(data=str(moved), steps=9, log_interval=1, eval_interval=9), run, resume=True, quiet=True)
    assert more["final_step"] == 9 and len(more["losses"]) == 1


def test_run_dir_guards(cfg, runs, tmp_path):
    with pytest.raises(ValueError, match="has no checkpoint; drop --resume"):
        train(cfg, str(tmp_path / "empty"), resume=True, quiet=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, str(runs[0] / "a"), quiet=True)
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.load_model(str(tmp_path / "missing"))
