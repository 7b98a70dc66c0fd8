"""The study runner: strict config, shipped configs parse, and a tiny grid end to end through `arjax study`."""

import glob
import json
import os

import pytest

from arjax.train.exposure.study import load_study, study_from_dict
from arjax.train.step import TRACE_COUNTS

TINY = {
    "name": "tiny",
    "oracle": {"kind": "dyck", "n_types": 2, "max_depth": 4},
    "data": {"length": 6, "n_train": 64, "n_test": 32},
    "model": {"n_layers": 1, "n_heads": 1, "d_model": 8},
    "train": {"steps": 4, "batch_size": 8, "log_interval": 1, "warmup_steps": 1},
    "methods": [
        {"name": "tf"},
        {
            "name": "ss",
            "scheduled_sampling": {
                "method": "parallel",
                "feed": "argmax",
                "schedule": {"step": {"kind": "linear", "k": 1.0, "c": 0.2, "eps_min": 0.2}},
            },
        },
    ],
    "seeds": [0, 1, 2],
    "decodings": [{"name": "greedy", "temperature": 0.0}, {"name": "anc"}],
    "eval": {"n_rollouts": 32, "prompt_len": 2, "n_boot": 5},
}


def test_config_is_strict_and_names_the_bad_key():
    cfg = study_from_dict(TINY)
    assert cfg.methods[1].scheduled_sampling.schedule.step.c == 0.2 and cfg.decodings[0].temperature == 0.0
    assert (
        cfg.train_config(cfg.methods[1], 7).seed == 7 and cfg.train_config(cfg.methods[0], 0).scheduled_sampling is None
    )
    with pytest.raises(ValueError, match=r"unknown study.data keys \['lenght'\]"):
        study_from_dict({**TINY, "data": {"lenght": 6}})
    with pytest.raises(ValueError, match=r"study.train: TrainConfig.steps='10' \(str\) should be int"):
        study_from_dict({**TINY, "train": {"steps": "10"}})
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['log_every'\]"):
        study_from_dict({**TINY, "train": {"log_every": 10}})
    with pytest.raises(ValueError, match=r"study.train.seed is set by study.seeds"):
        study_from_dict({**TINY, "train": {"seed": 3}})
    with pytest.raises(ValueError, match="prompt_len"):
        study_from_dict({**TINY, "eval": {"prompt_len": 6}})
    with pytest.raises(ValueError, match=r"unknown study.methods\[0\] keys \['schedule'\]"):
        study_from_dict({**TINY, "methods": [{"name": "a", "schedule": {"kind": "linear", "c": 0.1}}]})
    with pytest.raises(
        ValueError, match=r"study.methods\[0\].scheduled_sampling.schedule.step: schedule 'constant' takes"
    ):
        study_from_dict(
            {
                **TINY,
                "methods": [{"name": "a", "scheduled_sampling": {"schedule": {"step": {"kind": "constant", "c": 1}}}}],
            }
        )
    with pytest.raises(ValueError, match=r"unknown study.model keys \['d_modle'\]"):
        study_from_dict({**TINY, "model": {"d_modle": 8}})
    with pytest.raises(ValueError, match="method names must be unique"):
        study_from_dict({**TINY, "methods": [{"name": "a"}, {"name": "a"}]})
    for bad in ("../../x", "a/b", "", "runs"):
        with pytest.raises(ValueError, match="must be a plain name"):
            study_from_dict({**TINY, "name": bad})
    with pytest.raises(ValueError, match="must be a plain name"):
        study_from_dict({**TINY, "methods": [{"name": "../tf"}]})


def test_shipped_study_configs_parse():
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "docs", "studies", "*.yaml")))
    assert paths
    for p in paths:
        cfg = load_study(p)
        assert cfg.methods and cfg.decodings


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny study through the CLI, 2 methods x 3 seeds, and how many train steps it compiled."""
    import yaml

    from arjax.train.cli import main

    root = tmp_path_factory.mktemp("study")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    before = TRACE_COUNTS["train_step"]
    assert main(["study", str(path), "--out", str(root / "report"), "--quiet"]) == 0
    return root, path, TRACE_COUNTS["train_step"] - before


@pytest.mark.slow
def test_tiny_study_end_to_end_through_the_cli(uninterrupted):
    root, _, compiles = uninterrupted
    out = root / "report"
    # The seed is traced: 3 seeds of a method share one compiled train step.
    assert compiles == len(TINY["methods"]), compiles
    report = (out / "report.md").read_text()
    assert "| tf |" in report and "ExAccErr@4" in report
    for png in ("ex_acc_err.png", "kl_per_position.png", "mixing_rate.png", "nll_oracle_vs_nll_test.png"):
        assert (out / png).stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [(m, s) for m in ("tf", "ss") for s in (0, 1, 2)]
    ss = next(r for r in res["runs"] if r["method"] == "ss")["history"]
    # The schedule decays (gold 1 -> 0.2) and the realised mixing rate follows it.
    assert ss["gold_prob"][0] > 0.99 and ss["gold_prob"][-1] < 0.5 and ss["mix_rate"][-1] > 0.2
    ex = res["summary"]["methods"]["tf"]["decodings"]["greedy"]["ex"]["regret"]["curve"]["mean"]
    assert len(ex) == 4 and ex[0] is not None
    valid = res["summary"]["methods"]["tf"]["decodings"]["anc"]["valid_rate"][0]  # the grammar checks roll-outs
    assert 0.0 <= valid <= 1.0 and "valid roll-outs" in report
    # Every run trained through the one loop: its own checkpoint and metrics, every step logged once.
    run = out / "runs" / "ss" / "seed2"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4, 4] and (run / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_a_study_stopped_and_resumed_gives_the_same_results(uninterrupted, tmp_path):
    """Stopped after its first run, then one run killed mid-training: --resume ends with the same results.json."""
    from arjax.train import loop
    from arjax.train.cli import main
    from arjax.train.exposure import study as study_lib

    root, path, _ = uninterrupted
    cfg = load_study(str(path))
    out = tmp_path / "report"

    def stop_after_first_run(msg):
        if msg.startswith("  evaluated tf seed=0"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study_lib.run_study(cfg, str(out), log=stop_after_first_run)
    assert (out / "runs" / "tf" / "seed0" / "result.json").is_file() and not (out / "results.json").exists()
    assert main(["study", str(path), "--out", str(out), "--quiet"]) == 2  # no silent restart over a study
    # A run killed after 2 of its 4 steps: it continues from its checkpoint.
    oracle, train_tokens, test_tokens = study_lib.build_source(cfg)
    method = cfg.methods[1]
    partial = loop.fit(
        cfg.train_config(method, 1),
        str(out / "runs" / "ss" / "seed1"),
        model_cfg=cfg.model_config(oracle.vocab_size),
        source=study_lib.Rows(train_tokens),
        val_windows=test_tokens[None],
        stop_after=2,
        quiet=True,
    )
    assert partial["final_step"] == 2
    assert main(["study", str(path), "--out", str(out), "--resume", "--quiet"]) == 0
    want = json.loads((root / "report" / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert want.pop("seconds") > 0 and got.pop("seconds") > 0  # wall time is the one thing that differs
    assert got == want
    # Resuming with another config is refused, naming what differs.
    other = dict(TINY, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"different config \(differs in \['seeds'\]\)"):
        study_lib.run_study(study_from_dict(other), str(out), resume=True)


def test_bad_config_file_is_a_clear_cli_error(tmp_path, capsys):
    from arjax.train.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmethods: [{name: tf, scheduled_sampling: {shedule: {}}}]\n")
    assert main(["study", str(path)]) == 2
    assert "unknown study.methods[0].scheduled_sampling keys ['shedule']" in capsys.readouterr().err


@pytest.mark.slow
def test_text_study_against_a_named_scorer(tmp_path):
    """No oracle: a scorer trained by `arjax train` stands in for it; the study runs on corpus windows."""
    import yaml

    from arjax.train.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 200)
    scorer = tmp_path / "scorer"
    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--tokenizer",
                "byte",
                "--data",
                str(text),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--seq-len",
                "16",
                "--set",
                "model.n_layers=1",
                "--out",
                str(scorer),
                "--quiet",
            ]
        )
        == 0
    )
    cfg = {
        "name": "text",
        "oracle": {"kind": "scorer", "scorer": str(scorer), "text": str(text)},
        "data": {"length": 8, "n_train": 32, "n_test": 16},
        "model": {"n_layers": 1, "n_heads": 1, "d_model": 8},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "seeds": [0],
        "decodings": [{"name": "greedy", "temperature": 0.0}],
        "eval": {"n_rollouts": 16, "prompt_len": 4, "n_boot": 3, "ex_losses": ["kl"]},
    }
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    assert main(["study", str(path), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]["eval"]
    assert run["length"] == 4 and run["forward_kl_per_token"] > 0
