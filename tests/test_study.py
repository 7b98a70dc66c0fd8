"""The study runner: strict config, shipped configs parse, and a tiny grid end to end through `arjax study`."""

import glob
import json
import os

import pytest

from arjax.train.study import load_study, study_from_dict

TINY = {
    "name": "tiny",
    "oracle": {"kind": "dyck", "n_types": 2, "max_depth": 4},
    "data": {"length": 6, "n_train": 64, "n_test": 32},
    "model": {"n_layers": 1, "n_heads": 1, "d_model": 8},
    "train": {"steps": 4, "batch_size": 8, "log_every": 1, "warmup_steps": 1},
    "methods": [
        {"name": "tf"},
        {
            "name": "ss",
            "scheduled_sampling": {"method": "parallel", "feed": "argmax"},
            "schedule": {"kind": "linear", "k": 1.0, "c": 0.2, "eps_min": 0.2},
        },
    ],
    "seeds": [0, 1],
    "decodings": [{"name": "greedy", "temperature": 0.0}, {"name": "anc"}],
    "eval": {"n_rollouts": 32, "prompt_len": 2, "n_boot": 5},
}


def test_config_is_strict_and_names_the_bad_key():
    cfg = study_from_dict(TINY)
    assert cfg.methods[1].schedule["c"] == 0.2 and cfg.decodings[0].temperature == 0.0
    with pytest.raises(ValueError, match=r"unknown keys \['lenght'\] in study.data"):
        study_from_dict({**TINY, "data": {"lenght": 6}})
    with pytest.raises(ValueError, match=r"study.train.steps='10' should be int"):
        study_from_dict({**TINY, "train": {"steps": "10"}})
    with pytest.raises(ValueError, match="prompt_len"):
        study_from_dict({**TINY, "eval": {"prompt_len": 6}})
    with pytest.raises(ValueError, match=r"methods\[0\] \('a'\) has a schedule but no scheduled_sampling"):
        study_from_dict({**TINY, "methods": [{"name": "a", "schedule": {"kind": "linear", "c": 0.1}}]})
    with pytest.raises(ValueError, match=r"methods\[0\] \('a'\).*takes"):
        study_from_dict({**TINY, "methods": [{"name": "a", "scheduled_sampling": {}, "schedule": {"kind": "linear", "z": 1}}]})
    with pytest.raises(ValueError, match=r"unknown keys \['d_modle'\] in study.model"):
        study_from_dict({**TINY, "model": {"d_modle": 8}})
    with pytest.raises(ValueError, match="method names must be unique"):
        study_from_dict({**TINY, "methods": [{"name": "a"}, {"name": "a"}]})


def test_shipped_study_configs_parse():
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "docs", "studies", "*.yaml")))
    assert paths
    for p in paths:
        cfg = load_study(p)
        assert cfg.methods and cfg.decodings


@pytest.mark.slow
def test_tiny_study_end_to_end_through_the_cli(tmp_path):
    import yaml

    from arjax.train.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "report"
    assert main(["study", str(path), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| tf |" in report and "ExAccErr@4" in report
    for png in ("ex_acc_err.png", "kl_per_position.png", "mixing_rate.png", "nll_oracle_vs_nll_test.png"):
        assert (out / png).stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"tf", "ss"}
    ss = next(r for r in res["runs"] if r["method"] == "ss")["history"]
    # The schedule decays (gold 1 -> 0.2) and the realised mixing rate follows it.
    assert ss["gold_prob"][0] > 0.99 and ss["gold_prob"][-1] < 0.5 and ss["mix_rate"][-1] > 0.2
    ex = res["summary"]["methods"]["tf"]["decodings"]["greedy"]["ex"]["regret"]["curve"]["mean"]
    assert len(ex) == 4 and ex[0] is not None
    valid = res["summary"]["methods"]["tf"]["decodings"]["anc"]["valid_rate"][0]  # the grammar checks roll-outs
    assert 0.0 <= valid <= 1.0 and "valid roll-outs" in report


def test_bad_config_file_is_a_clear_cli_error(tmp_path, capsys):
    from arjax.train.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmethods: [{name: tf, shedule: {kind: linear}}]\n")
    assert main(["study", str(path)]) == 2
    assert "unknown keys ['shedule'] in study.methods[0]" in capsys.readouterr().err


@pytest.mark.slow
def test_text_study_against_a_named_scorer(tmp_path):
    """No oracle: a scorer trained by `arjax train` stands in for it; the study runs on corpus windows."""
    import yaml

    from arjax.train.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 200)
    scorer = tmp_path / "scorer"
    assert main(["train", "--model", "tiny", "--tokenizer", "byte", "--data", str(text), "--steps", "2",
                 "--batch-size", "4", "--seq-len", "16", "--set", "model.n_layers=1", "--out", str(scorer), "--quiet"]) == 0
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
