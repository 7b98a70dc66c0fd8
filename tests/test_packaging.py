"""Packaging: the wheel holds only arjax/..., no bare model/decode/train module leaks, the console script works."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_contains_only_the_arjax_package(tmp_path):
    # Build from a copy so the build's own build/ and egg-info never touch the working tree.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    out = tmp_path / "dist"
    # -x: setuptools >= 70.1 builds wheels itself; the separate `wheel` package need not be installed.
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-x", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = out.glob("arjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("arjax/") for n in code), [n for n in code if not n.startswith("arjax/")]
    for pkg in ("model", "decode", "train"):
        assert f"arjax/{pkg}/__init__.py" in names
    for sub in ("train/cli", "train/exposure"):  # subpackages ship too
        assert f"arjax/{sub}/__init__.py" in names
    assert "arjax/train/cli/train.py" in names and not any(
        n.startswith(("arjax/tests", "arjax/tpu_configs")) for n in names
    )
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "arjax = arjax.train.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_no_bare_top_level_modules_outside_the_repo(tmp_path):
    """From a fresh interpreter outside the repo, only arjax.* is importable."""
    code = (
        "import importlib.util, arjax.model, arjax.decode, arjax.train\n"
        "print([m for m in ('model', 'decode', 'train') if importlib.util.find_spec(m) is not None])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def _arjax_script() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "arjax")
    if not os.path.exists(script):
        pytest.skip("the arjax console script is not installed in this environment (pip install -e .)")
    return script


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["eval"]])
def test_console_script_help(command, tmp_path):
    r = subprocess.run([_arjax_script(), *command, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: arjax")
