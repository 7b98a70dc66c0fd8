"""What every command of the CLI shares: the one-line user error, the help formatter and `--set KEY=VALUE`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import sys
import threading
import warnings
from typing import Any, Mapping, Sequence

from arjax.train.config import parse_yaml_value


class UsageError(ValueError):
    """Bad user input: printed as one line, exit status 2."""


@contextlib.contextmanager
def quiet_libraries():
    """While a command runs, library chatter stays off stderr: orbax and tensorstore report one
    failed write (a full disk) from several threads at once, as absl and asyncio log records and
    thread tracebacks, before the exception reaches the CLI, which reports it once, in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "concurrent.futures", "jax", "orbax")]
    levels = [logger.level for logger in loggers]
    hooks = threading.excepthook, sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    failed = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                gc.collect()  # the abandoned writes' tasks report themselves when collected: here, quietly
    finally:
        threading.excepthook, sys.unraisablehook = hooks
        # After a failed write orbax's event loops still hold failed tasks, which asyncio logs when
        # the interpreter exits: the loggers stay quiet then.
        if not failed:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def os_error_message(e: OSError) -> str:
    """One line for an OS error: what happened to which path, and what to do about it."""
    path = e.filename if e.filename is not None else "a file"
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device while writing {path!r}; free some space and run the command again (a "
                "training run continues from its last intact checkpoint with --resume)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read {path!r} ({e.strerror}); choose a location you have access to, e.g. another --out"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path!r} is in the way ({e.strerror}); choose another path"
    if e.errno == errno.EISDIR:
        return f"{path!r} is a directory where a file was expected; pass a file"
    if e.errno == errno.ENOENT:
        return f"{path!r} does not exist; check the path"
    return f"{e.strerror or type(e).__name__} ({path!r})"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (argparse prints the whole usage first): the bad flag
    or value, and where to look."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


class Help(argparse.HelpFormatter):
    """Shows a flag's default only when it has a real one (not None/False), so no "(default: None)" noise."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and not any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            text += f" (default: {action.default})"
        return text


def add_mesh_flags(parser, default: str = "the config's, else data-parallel over every device") -> None:
    """``--mesh AXIS=SIZE,...``: the devices a command runs on (arjax.model.sharding)."""
    parser.add_argument("--mesh", metavar="AXIS=N,...",
                        help=f"device mesh, e.g. data=4,model=2 (axes data, fsdp, model; -1 takes the devices left over; "
                             f"default: {default})")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: Sequence[str], *, examples: str, nested_example: str,
              aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``--set key=value`` (the value parsed as YAML, as the config files read it) -> nested overrides.

    A dotted key sets a nested key (``scheduled_sampling.feed=argmax``); ``aliases`` renames a
    first part that has more after it (``model.dropout`` -> ``model_overrides.dropout``). The
    config loader checks the keys, strictly. ``examples`` and ``nested_example`` go in the errors.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not KEY=VALUE; e.g. {examples}")
        key, raw = item.split("=", 1)
        path = key.split(".")
        if len(path) > 1 and path[0] in (aliases or {}):
            path[0] = aliases[path[0]]
        if not all(path):
            raise UsageError(f"--set {item!r}: {key!r} is not a key; e.g. {nested_example}")
        nested: Any = parse_yaml_value(raw)
        for name in reversed(path):
            nested = {name: nested}
        out = merge(out, nested)
    return out
