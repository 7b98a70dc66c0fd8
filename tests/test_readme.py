"""The README runs as written: every command is one the tests run (tests/_readme.py says how), its
Python blocks run, and so does every command that reads the demo run, trained by the README's own
first command (shrunk to a few steps), served, resumed and rebuilt by `make demo`'s recipe."""

import importlib.util
import os
import pathlib
import sys

import pytest


def _load_helper():
    """tests/_readme.py, shared with the other README tests (the suite imports test files by path)."""
    if "_readme" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_readme", pathlib.Path(__file__).with_name("_readme.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_readme"] = module
        spec.loader.exec_module(module)
    return sys.modules["_readme"]


readme = _load_helper()


def test_every_readme_command_is_run_by_a_test():
    """A command added to the README, or one whose text changed, fails here until tests/_readme.py runs it."""
    written = readme.commands()
    assert len(written) == len(set(written)), "a README command appears twice"
    run = [r.command for r in readme.RUNS if r.readme]
    assert sorted(written) == sorted(run), (
        f"README commands no test runs: {sorted(set(written) - set(run))}; "
        f"commands tests/_readme.py runs that the README no longer has: {sorted(set(run) - set(written))}"
    )
    # the client and chat blocks run against `arjax serve` (the chat block against tests/test_serve.py's too)
    assert set(readme.python_blocks()) == {"client", "chat", "api", "train"}
    for module in {r.module for r in readme.RUNS}:  # each run belongs to a README test file that runs its share
        assert "readme.run_all(readme." in pathlib.Path(__file__).with_name(module).read_text(), module
    assert os.access(readme.ARJAX, os.X_OK), f"no installed `arjax` script at {readme.ARJAX}"


def test_readme_api_block_runs():
    scope: dict = {}
    exec(compile(readme.python_blocks()["api"], str(readme.README), "exec"), scope)
    out = scope["out"]
    assert out.tokens.shape == (2, 32) and len(out.lengths) == 2
    assert set(out.stop_reason) <= {"eos", "length"}


def test_readme_training_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes runs/readme-ss relative to the working directory
    scope: dict = {}
    exec(compile(readme.python_blocks()["train"], str(readme.README), "exec"), scope)
    result = scope["result"]
    assert result["final_step"] == 20 and result["val_losses"][0][0] == 20
    assert 0 < result["history"]["mix_rate"][-1] < 1 and (tmp_path / "runs/readme-ss/metrics.jsonl").is_file()


@pytest.fixture(scope="module")
def results(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("readme")
    readme.make_workspace(root)
    return readme.run_all(readme.DEMO, root, subprocess_env)


@pytest.mark.slow
@pytest.mark.parametrize("name", [r.name for r in readme.RUNS if r.module == readme.DEMO])
def test_readme_command(results, name):
    readme.check(results, name)
