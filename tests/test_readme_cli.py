"""The README's single-device commands that do not read the demo run, run as written (tests/_readme.py
says how): the shakespeare recipes, a tokenizer, Hugging Face conversions and generation, the
exposure-bias study and its resume, and data preparation in every input format, trained on and verified."""

import importlib.util
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


@pytest.fixture(scope="module")
def results(tmp_path_factory, subprocess_env):
    root = tmp_path_factory.mktemp("readme-cli")
    readme.make_workspace(root)
    return readme.run_all(readme.CLI, root, subprocess_env)


@pytest.mark.slow
@pytest.mark.parametrize("name", [r.name for r in readme.RUNS if r.module == readme.CLI])
def test_readme_command(results, name):
    readme.check(results, name)
