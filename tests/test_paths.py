"""Nothing is written outside the directories named on the command line: resumed runs, edited checkpoints, studies."""

import json
import os

from arjax.train.cli import main


def _files(root):
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def test_runs_and_studies_write_only_inside_their_directories(tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"  # the working directory: nothing may appear here either
    work.mkdir()
    monkeypatch.chdir(work)
    data = tmp_path / "text.txt"
    data.write_text("all work and no play makes jack a dull boy. " * 100)
    run = tmp_path / "run"
    common = [
        "--model",
        "tiny",
        "--set",
        "model.n_layers=1",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--set",
        "eval_iters=1",
        "--quiet",
    ]
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "2", *common]) == 0
    before = _files(tmp_path)

    # An edited checkpoint whose stored run config points a log somewhere else is refused, not obeyed.
    meta_path = run / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    edited = dict(meta, train_config={**meta["train_config"], "log_file": str(tmp_path / "elsewhere.jsonl")})
    meta_path.write_text(json.dumps(edited))
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet"]) == 2
    assert "differs from its checksum" in capsys.readouterr().err  # an edited checkpoint is a damaged one
    meta_path.write_text(json.dumps(meta))

    # A resumed run writes into its run directory only.
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet"]) == 0
    new = _files(tmp_path) - before
    assert new and all(p.startswith(str(run) + os.sep) for p in new), sorted(new)

    # A study named like a path is refused before anything is written; a real one stays in --out.
    study = {
        "oracle": {"kind": "dyck", "n_types": 1, "max_depth": 2},
        "data": {"length": 4, "n_train": 8, "n_test": 8},
        "model": {"n_layers": 1, "n_heads": 1, "d_model": 8},
        "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0},
        "seeds": [0],
        "decodings": [{"name": "g", "temperature": 0.0}],
        "eval": {"n_rollouts": 4, "prompt_len": 1, "n_boot": 2},
    }
    cfg = tmp_path / "study.yaml"
    cfg.write_text(json.dumps({**study, "name": "../../escape"}))
    before = _files(tmp_path)
    assert main(["study", str(cfg)]) == 2  # the default --out would be studies/../../escape
    assert "must be a plain name" in capsys.readouterr().err
    cfg.write_text(json.dumps({**study, "name": "fine"}))
    assert main(["study", str(cfg), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    new = _files(tmp_path) - before - {str(cfg)}
    assert new and all(p.startswith(str(tmp_path / "report") + os.sep) for p in new), sorted(new)
    assert not os.listdir(work)

    # eval without --data reads the run's data path; from another directory that path may name other
    # text, which is refused (the run records its text's SHA-256), not scored.
    (work / "text.txt").write_text(data.read_text())
    assert main(["train", "--data", "text.txt", "--out", str(tmp_path / "rel"), "--steps", "1", *common]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "text.txt").write_text("something else entirely. " * 100)
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--ckpt", str(tmp_path / "rel")]) == 2
    assert "is not the text" in capsys.readouterr().err
