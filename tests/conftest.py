"""Shared fixtures: ``subprocess_env``, the environment for tests that start `arjax` in subprocesses.

Those tests (a real console script, SIGKILL and resume, a full disk) would each compile the same
small programs again; their subprocesses share one persistent XLA compilation cache, in a fresh
temporary directory per test session, so nothing carries over between runs. It changes no result:
a cached executable is the one the compiler produced. The test process itself does not use it
(writing every compilation to disk would slow the in-process tests down).
"""

import os

import pytest

# The suite runs tiny models, so its time goes to XLA compiling hundreds of small programs, not to
# running them: LLVM's cheaper optimization level cuts about a fifth of it. It changes how fast the
# compiled code runs, not what it computes (results are compared within tolerances, or between two
# programs built the same way). Set before any test imports JAX; subprocesses inherit it. A caller's
# own XLA_FLAGS win.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla-cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


# Mappings a worker may hold before it drops JAX's compiled programs: far below Linux's 65,530, far
# above what one test file adds (a few thousand at most).
MAX_MAPS = 24_000


def _mappings() -> int:
    """Memory mappings this process holds (Linux); a huge number where that cannot be read, so that
    the caches are dropped after every file there."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 1 << 30


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """After a test file, drop JAX's compiled executables once the worker holds many memory mappings.
    A worker runs many files, each compiling its own programs, and XLA's CPU backend maps a few memory
    regions per executable: a long-lived worker reached Linux's limit of 65,530 mappings
    (vm.max_map_count) and crashed inside the compiler with a segmentation fault (seen twice, in a test
    that passes alone). Clearing after every file made each later file compile again what earlier ones
    had compiled, so it happens only past ``MAX_MAPS``."""
    yield
    import gc
    import sys

    if "jax" in sys.modules and _mappings() > MAX_MAPS:
        sys.modules["jax"].clear_caches()
        gc.collect()
