"""The one training loop with the scheduled-sampling objective: `arjax train` end to end, exact
resume, metrics everywhere, cleanup on error."""

import json

import pytest

from arjax.train import loop, runlog
from arjax.train.cli import main
from arjax.train.config import TrainConfig, from_dict

_TEXT = "".join(f"row {i}: a stitch in time saves nine, said the tailor.\n" for i in range(200))
_SS = {
    "feed": "sample",
    "granularity": "token",
    "schedule": {
        "step": {"kind": "linear", "k": 1.0, "c": 0.1, "eps_min": 0.5},
        "position": {"kind": "exponential", "k": 0.98},
    },
}
_SS_KEYS = ("gold_prob", "mix_rate", "differ_rate", "pass1_loss", "pass2_loss")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(_TEXT)
    return str(path)


def _records(run_dir):
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl", encoding="utf-8")]


@pytest.mark.slow
def test_scheduled_sampling_run_through_the_cli(tmp_path, data_file, capsys):
    cfg = tmp_path / "ss.yaml"
    cfg.write_text(
        "model: tiny\nmodel_overrides: {n_layers: 1}\ntokenizer: char\nbatch_size: 4\nseq_len: 24\nsteps: 6\n"
        "warmup_steps: 1\neval_interval: 6\neval_iters: 1\nlog_interval: 2\nckpt_interval: 3\n"
        "scheduled_sampling:\n  method: parallel\n  feed: argmax\n"
        "  schedule: {step: {kind: linear, k: 1.0, c: 0.2, eps_min: 0.2}}\n"
    )
    run = str(tmp_path / "run")
    assert main(["train", "--config", str(cfg), "--data", data_file, "--out", run, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 6" in out and "mixing rate" in out
    train = [r for r in _records(run) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(k in r for r in train for k in _SS_KEYS)
    # Gold probability 1 - 0.2 * step (step 0-based), floored at 0.2; the realised mixing follows it.
    assert [round(r["gold_prob"], 4) for r in train] == [1.0, 0.8, 0.6, 0.4, 0.2, 0.2]
    assert train[0]["mix_rate"] == 0.0 and train[-1]["mix_rate"] > 0.5 and train[-1]["differ_rate"] > 0
    # The run is an ordinary run: its config (with the section) is stored, eval and generate read it.
    assert main(["eval", "--ckpt", run]) == 0 and "loss" in capsys.readouterr().out
    assert main(["generate", "--ckpt", run, "--prompt", "row", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    # --set reaches the section's nested keys; a typo there is a one-line error.
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--data",
                data_file,
                "--out",
                str(tmp_path / "r2"),
                "--quiet",
                "--steps",
                "1",
                "--set",
                "scheduled_sampling.schedule.step.kind=constnt",
            ]
        )
        == 2
    )
    assert "kind='constnt'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ss_runs(data_file, tmp_path_factory):
    """A scheduled-sampling run with dropout and 2 micro-batches, straight and stopped after 3 steps + resumed."""
    cfg = from_dict(
        {
            "model": "tiny",
            "model_overrides": {"n_layers": 1, "dropout": 0.1},
            "tokenizer": "char",
            "data": data_file,
            "batch_size": 2,
            "accum_steps": 2,
            "seq_len": 16,
            "steps": 6,
            "warmup_steps": 1,
            "eval_interval": 3,
            "eval_iters": 1,
            "log_interval": 4,
            "ckpt_interval": 2,
            "scheduled_sampling": _SS,
        }
    )
    root = tmp_path_factory.mktemp("runs")
    straight = loop.train(cfg, str(root / "a"), quiet=True)
    first = loop.train(cfg, str(root / "b"), stop_after=3, quiet=True)
    second = loop.train(cfg, str(root / "b"), resume=True, quiet=True)
    return root, straight, first, second


def test_scheduled_sampling_stopped_and_resumed_gives_identical_losses_and_mixing(ss_runs):
    root, straight, first, second = ss_runs
    assert first["final_step"] == 3 and second["final_step"] == 6
    for key in ("loss", *_SS_KEYS):
        # Exactly equal: coins, draws, dropout and batches are functions of (seed, step) only.
        assert first["history"][key] + second["history"][key] == straight["history"][key], key
    assert 0 < straight["history"]["mix_rate"][-1] < 1
    # The log holds every step once, as the uninterrupted run's does (speed aside).
    speed = ("tokens_per_s", "tokens_per_s_per_device", "mfu")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in speed} for r in rs]
    assert strip(_records(root / "b")) == strip(_records(root / "a"))


def test_the_loop_closes_its_log_progress_and_tensorboard_on_error(data_file, tmp_path, monkeypatch):
    events = []

    class Writer:
        def add_scalar(self, name, value, step):
            events.append(name)

        def close(self):
            events.append("tb closed")

    class Progress(runlog._Progress):
        def stop(self):
            events.append("progress stopped")

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog, "_tensorboard_writer", lambda log_dir, purge_step=None: Writer())
    monkeypatch.setattr(runlog, "_Progress", Progress)
    monkeypatch.setattr(loop.ckpt, "save", broken_save)
    cfg = TrainConfig(
        model="tiny",
        model_overrides={"n_layers": 1},
        tokenizer="char",
        data=data_file,
        batch_size=2,
        seq_len=16,
        steps=4,
        warmup_steps=1,
        log_interval=1,
        ckpt_interval=2,
        scheduled_sampling=from_dict({"scheduled_sampling": _SS}).scheduled_sampling,
    )
    with pytest.raises(OSError, match="No space left"):
        loop.train(cfg, str(tmp_path / "run"), quiet=True)
    # The objective's metrics reached TensorBoard before the failure; everything was closed after it.
    assert {"loss", "mix_rate", "gold_prob", "differ_rate"} <= set(events)
    assert events[-2:] == ["progress stopped", "tb closed"]
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2]  # flushed and closed
