"""The README's "Every device, every host" commands, run as written (tests/_readme.py says how): the GPT-2
recipes' meshes, data x tensor parallel training, a resume on another mesh, tensor-parallel decoding
(8 fake CPU devices) and one training run as two processes."""

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
    root = tmp_path_factory.mktemp("readme-mesh")
    readme.make_workspace(root)
    return readme.run_all(readme.MESH, root, subprocess_env)


@pytest.mark.slow
@pytest.mark.parametrize("name", [r.name for r in readme.RUNS if r.module == readme.MESH])
def test_readme_command(results, name):
    readme.check(results, name)
