"""The `arjax` CLI: help texts, one-line errors with exit status 2, and train -> generate -> eval end to end."""

import json
import pathlib

import pytest

from arjax.decode.stops import StopStrings
from arjax.train import cli
from arjax.train.cli.train import parse_set
from arjax.train.tokenizer import ByteTokenizer

STUDY = str(pathlib.Path(__file__).resolve().parent.parent / "docs" / "studies" / "dyck-quick.yaml")


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["eval"]])
def test_help_describes_every_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: arjax" in out and "(default: None)" not in out
    if command == ["generate"]:
        for flag in (
            "--ckpt",
            "--prompt",
            "--max-new-tokens",
            "--temperature",
            "--top-k",
            "--top-p",
            "--seed",
            "--eos",
            "--stop",
        ):
            assert flag in out
        assert "default: 200, or what the" in " ".join(out.split())


def test_every_command_is_registered():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {
        "train",
        "eval",
        "checkpoints",
        "generate",
        "serve",
        "convert",
        "tokenizer",
        "study",
        "data",
    }


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--set", "stepz=3"], "unknown TrainConfig keys ['stepz']"),
        (["train", "--set", "oops"], "is not KEY=VALUE"),
        (["study", STUDY, "--set", "seedz=[0]"], "unknown study keys ['seedz']"),  # strict, like train's --set
        (["study", STUDY, "--set", "train.stepz=3"], "unknown TrainConfig keys ['stepz']"),
        (["train", "--config", "/nonexistent.yaml"], "does not exist"),
        (["train", "--model", "gpt5"], "unknown model preset 'gpt5'"),
        (["generate", "--ckpt", "/nonexistent"], "does not exist"),
        (["generate"], "pass exactly one of --ckpt"),
        (["eval", "--ckpt", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_set_parses_yaml_values_model_overrides_and_nested_keys():
    assert parse_set(
        [
            "lr=1e-3",
            "model.dropout=0.1",
            "grad_clip=null",
            "scheduled_sampling.feed=argmax",
            "scheduled_sampling.schedule.step.kind=linear",
            "scheduled_sampling.schedule.step.c=1e-4",
        ]
    ) == {
        "lr": 1e-3,
        "model_overrides": {"dropout": 0.1},
        "grad_clip": None,
        "scheduled_sampling": {"feed": "argmax", "schedule": {"step": {"kind": "linear", "c": 1e-4}}},
    }
    with pytest.raises(cli.UsageError, match="is not a key"):
        parse_set(["scheduled_sampling..feed=argmax"])


def test_streamed_text_holds_back_split_utf8():
    rows = StopStrings(ByteTokenizer(), (), 1)
    e_acute = "é".encode()  # two bytes, arriving in different chunks
    assert rows.delta(0, [ord("a"), e_acute[0]]) == "a"
    assert rows.delta(0, [ord("a"), *e_acute, ord("b")]) == "éb"
    assert rows.delta(0, [ord("a"), *e_acute, ord("b"), 0xFF], final=True) == "\ufffd"
    # Bytes no later token can complete show as U+FFFD at once; only an unfinished tail waits.
    rows = StopStrings(ByteTokenizer(), (), 1)
    assert rows.delta(0, [0xE6, 0xE6, ord("a"), 0xE6, 0x97]) == "\ufffd\ufffda"
    assert rows.delta(0, [0xE6, 0xE6, ord("a"), *"日".encode()]) == "日"

    class ByteFallback(ByteTokenizer):  # SentencePiece's byte fallback: one U+FFFD per byte of a split character
        def decode(self, ids):
            text = bytes(ids).decode("utf-8", errors="surrogateescape")
            return "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)

    ids = [ord("a"), *"中".encode(), ord("b")]
    rows = StopStrings(ByteFallback(), ("中b",), 1)
    assert rows.delta(0, ids[:3]) == "a" and not rows.check(0, ids[:3])
    assert rows.check(0, ids) and rows.rows[0].text == "a"  # the stop string, found once the character completes
    rows = StopStrings(ByteFallback(), (), 1)
    assert rows.delta(0, ids[:3]) + rows.delta(0, ids) == "a中b"


@pytest.mark.slow
def test_train_generate_eval_end_to_end(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("abcdefghijklmnopqrstuvwxyz\n" * 400)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model: tiny\ntokenizer: char\nbatch_size: 8\nseq_len: 32\nsteps: 40\nlr: 1.0e-2\nwarmup_steps: 5\n"
        "eval_interval: 40\neval_iters: 2\nlog_interval: 20\nckpt_interval: 40\n"
    )
    run = str(tmp_path / "run")
    assert cli.main(["train", "--config", str(cfg), "--data", str(data), "--out", run, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 40" in out
    with open(f"{run}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert len(train_losses) == 40 and train_losses[-1] < 0.5 and {"lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    val = [r for r in records if "val_loss" in r][-1]

    # A batch, streamed with row labels, then the summary; greedy, so the alphabet must continue.
    argv = [
        "generate",
        "--ckpt",
        run,
        "--prompt",
        "abc",
        "--prompt",
        "mno",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--chunk-steps",
        "4",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1] " in out and "[2] " in out and "--- [2] prompt 'mno': 10 new tokens" in out
    assert "\nabcdefghijklm" in out and "\nmnopqrstuvwxy" in out
    # --stop TEXT: the row ends when its text holds it (two tokens here), and the text ends before it.
    assert (
        cli.main(
            [
                "generate",
                "--ckpt",
                run,
                "--prompt",
                "abc",
                "--max-new-tokens",
                "20",
                "--temperature",
                "0",
                "--stop",
                "gh",
                "--stop",
                "zz",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "abcdef\n" in out and "abcdefg" not in out and "5 new tokens, stopped on stop" in out
    # Speculative decoding from the command line: the same greedy text, with its acceptance reported.
    for flags in (["--prompt-lookup", "--draft-k", "3"], ["--draft-ckpt", run, "--draft-k", "2"]):
        assert (
            cli.main(
                ["generate", "--ckpt", run, "--prompt", "abc", "--max-new-tokens", "10", "--temperature", "0", *flags]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "abcdefghijklm" in out and "of drafts accepted" in out
    # Unknown character for a char vocabulary: a clear one-line error.
    assert cli.main(["generate", "--ckpt", run, "--prompt", "ABC"]) == 2
    assert "not in this character-level vocabulary" in capsys.readouterr().err

    # eval on the run's own validation split reproduces the logged val loss.
    assert cli.main(["eval", "--ckpt", run]) == 0
    out = capsys.readouterr().out
    assert f"loss {val['val_loss']:.4f}" in out
    # eval --data FILE: evenly spaced windows over the whole file.
    assert cli.main(["eval", "--ckpt", run, "--data", str(data), "--iters", "1"]) == 0
    assert f"{data}: loss" in capsys.readouterr().out

    # --resume without --config continues with the run's saved config (model, data, tokenizer).
    assert cli.main(["train", "--out", run, "--resume", "--steps", "42", "--quiet"]) == 0
    assert "trained to step 42" in capsys.readouterr().out
