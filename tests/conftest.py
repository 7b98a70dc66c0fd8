"""Shared fixtures: ``subprocess_env``, the environment for tests that start `arjax` in subprocesses.

Those tests (a real console script, SIGKILL and resume, a full disk) would each compile the same
small programs again; their subprocesses share one persistent XLA compilation cache, in a fresh
temporary directory per test session, so nothing carries over between runs. It changes no result:
a cached executable is the one the compiler produced. The test process itself does not use it
(writing every compilation to disk would slow the in-process tests down).
"""

import os

import pytest


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla-cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
