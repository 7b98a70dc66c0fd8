"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_python_example_runs():
    scope: dict = {}
    exec(compile(_blocks()[0], str(README), "exec"), scope)
    out = scope["out"]
    assert out.tokens.shape == (2, 32) and len(out.lengths) == 2
    assert set(out.stop_reason) <= {"eos", "length"}


def test_readme_training_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes runs/readme-ss relative to the working directory
    blocks = _blocks()
    assert len(blocks) == 2
    scope: dict = {}
    exec(compile(blocks[1], str(README), "exec"), scope)
    result = scope["result"]
    assert result["final_step"] == 20 and result["val_losses"][0][0] == 20
    assert 0 < result["history"]["mix_rate"][-1] < 1 and (tmp_path / "runs/readme-ss/metrics.jsonl").is_file()
