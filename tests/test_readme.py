"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    scope: dict = {}
    exec(compile(block, str(README), "exec"), scope)
    out = scope["out"]
    assert out.tokens.shape == (2, 32) and len(out.lengths) == 2
    assert set(out.stop_reason) <= {"eos", "length"}
