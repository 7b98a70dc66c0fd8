"""What the commands of the CLI share: the one-line user error, the help formatter, `--set KEY=VALUE`, the flag
groups of the decoding commands (model, quantization, mesh, sampling) and what they turn into (a loaded model,
an engine, sampling values), and the one out-of-memory message."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from arjax.decode.engine import Engine
from arjax.decode.sampling import SAMPLING_FIELDS, check_sampling, sampling_values
from arjax.model.sharding import parse_mesh
from arjax.train.config import parse_yaml_value
from arjax.train.load import load_for_decoding


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
        return (
            f"no space left on the device while writing {path!r}; free some space and run the command again (a "
            "training run continues from its last intact checkpoint with --resume)"
        )
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
    parser.add_argument(
        "--mesh",
        metavar="AXIS=N,...",
        help="device mesh, e.g. data=4,model=2 (axes data, fsdp, model; -1 takes the devices left "
        f"over; default: {default})",
    )


def add_model_flags(p) -> None:
    """Where the model comes from, and where its compiled programs are kept: `generate` and `serve`."""
    p.add_argument("--ckpt", metavar="DIR", help="run directory written by `arjax train --out DIR`")
    p.add_argument(
        "--hf", metavar="DIR", help="local Hugging Face checkpoint directory (config.json, safetensors, tokenizer)"
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep the compiled programs in DIR (JAX's persistent compilation cache), so that the next start with "
        "the same model, flags and jax version loads them instead of compiling again",
    )


def use_compile_cache(path: str | None) -> None:
    """``--compile-cache DIR``: JAX's persistent compilation cache in DIR (created if missing; ``~`` expanded,
    as a quoted or ``--flag=~/...`` path reaches us unexpanded), for every program compiled from here on."""
    if path is None:
        return
    if not path:
        raise UsageError("--compile-cache needs a directory; give a path, e.g. --compile-cache ~/.cache/arjax")
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"--compile-cache {path!r} cannot be made a directory ({e.strerror}); choose a directory you can write to"
        ) from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(
            f"--compile-cache {path!r} is not readable and writable by you; choose a directory you can write to"
        )
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program, not only slow ones


def add_quant_flags(p) -> None:
    """int8 weights and the KV cache's dtype: `generate` and `serve`."""
    p.add_argument("--quantize", choices=["int8"], help="decode with int8 weights (a scale per output channel)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["int8", "bfloat16", "float32"],
        metavar="{int8,bfloat16,float32}",
        help="KV cache dtype; int8 keeps a scale per token and head (default: the model's dtype)",
    )


def add_sampling_flags(p) -> None:
    """One flag per sampling field (arjax.decode.sampling.SAMPLING_FIELDS: name, type, default, help)."""
    for f in SAMPLING_FIELDS:
        p.add_argument(f.flag, type=f.kind, metavar=f.metavar, default=f.default, help=f.help)


def sampling_flags(args, *, vocab_size: int | None = None) -> dict[str, int | float]:
    """The sampling flags' values, each checked as every entry point checks it (a FieldError, one line)."""
    return check_sampling(sampling_values(args), vocab_size=vocab_size)


def load_from_flags(args):
    """``(model, tokenizer)`` from ``--ckpt DIR`` or ``--hf DIR`` (and ``--mesh``, runs only): float weights.
    ``--compile-cache`` takes effect here, after the flags are checked and before anything compiles."""
    if bool(args.ckpt) == bool(args.hf):
        raise UsageError("pass exactly one of --ckpt DIR (an arjax run) or --hf DIR (a Hugging Face checkpoint)")
    if args.hf and args.mesh:
        raise UsageError(
            "--mesh works with --ckpt; convert the Hugging Face checkpoint first (arjax convert --from-hf)"
        )
    use_compile_cache(getattr(args, "compile_cache", None))
    return load_for_decoding(
        ckpt=args.ckpt or None, hf_dir=args.hf or None, mesh=parse_mesh(args.mesh) if args.mesh else None
    )


def engine_from_flags(args, model, tokenizer, *, max_queue: int) -> Engine:
    """The serving engine ``--slots``, ``--max-len``, ``--chunk-steps``, ``--kv-cache-dtype`` and (`serve` only)
    the prefill, prefix-store and prompt-lookup flags ask for."""
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0
    for flag, value in (("--slots", args.slots), ("--chunk-steps", args.chunk_steps)):
        if not 1 <= value <= 65536:
            raise UsageError(f"{flag} {value} is out of range; give 1 to 65536")
    if args.max_len is not None and not 2 <= args.max_len < 2**31:
        raise UsageError(f"--max-len {args.max_len} is out of range; give at least 2 (prompt + new tokens per request)")
    prefill = {  # serve's prefill and prefix-store flags; other engine users take the defaults
        "prefill_chunk": ("--prefill-chunk", getattr(args, "prefill_chunk", 512), 1),
        "prefill_tokens": ("--prefill-tokens", getattr(args, "prefill_tokens", 2048), 1),
        "prefix_cache": ("--prefix-cache", getattr(args, "prefix_cache", 0), 0),
        "prefix_block": ("--prefix-block", getattr(args, "prefix_block", 16), 1),
    }
    for flag, value, lo in prefill.values():
        if not lo <= value <= 2**20:
            raise UsageError(f"{flag} {value} is out of range; give {lo} to {2**20}")
    # serve's --prompt-lookup K (`arjax generate`'s own --prompt-lookup is a switch, which its --input refuses)
    lookup = getattr(args, "prompt_lookup_k", 0)
    ngram, threshold = getattr(args, "lookup_ngram", None), getattr(args, "lookup_threshold", None)
    if not 0 <= lookup <= 64:
        raise UsageError(f"--prompt-lookup {lookup} is out of range; give 0 (off) to 64 drafts a step (4-8 is typical)")
    if not lookup and (ngram is not None or threshold is not None):
        flag = "--lookup-ngram" if ngram is not None else "--lookup-threshold"
        raise UsageError(f"{flag} sets prompt lookup; add --prompt-lookup K (drafts a step, e.g. 4)")
    ngram = 3 if ngram is None else ngram
    threshold = 1.0 if threshold is None else threshold
    if not 1 <= ngram <= 16:
        raise UsageError(f"--lookup-ngram {ngram} is out of range; give 1 to 16")
    if not (math.isfinite(threshold) and 0 <= threshold <= max(lookup, 1)):
        raise UsageError(
            f"--lookup-threshold {threshold} is out of range; give 0 (always speculate) to --prompt-lookup ({lookup})"
        )
    return Engine(
        model,
        slots=args.slots,
        max_len=args.max_len,
        chunk_steps=args.chunk_steps,
        tokenizer=tokenizer,
        pad_id=pad,
        max_queue=max_queue,
        kv_cache_dtype=args.kv_cache_dtype,
        **{name: value for name, (_, value, _) in prefill.items()},
        prompt_lookup=lookup,
        lookup_ngram=ngram,
        lookup_threshold=threshold,
    )


@contextlib.contextmanager
def out_of_memory(what: str, fix: str, *, detail: str = ""):
    """The device running out of memory inside (XLA reports it as a runtime error) becomes one line:
    ``{what} do not fit in the device's memory{detail}; {fix}``. Anything else passes through."""
    try:
        yield
    except Exception as e:  # XLA's memory exhaustion has no exception type of its own
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        raise UsageError(f"{what} do not fit in the device's memory{detail}; {fix}") from None


def stop_strings(args) -> list[str]:
    """``--stop`` texts with ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` read as escapes (a shell passes them literally)."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return [re.sub(r"\\([ntr\\])", lambda m: escapes[m.group(1)], text) for text in args.stop or []]


def eos_and_pad(args, tokenizer) -> tuple[list[int], int]:
    """The EOS ids (``--eos``, else the tokenizer's, if any) and the padding id (the tokenizer's, else 0)."""
    eos = list(args.eos or [])
    if not eos and tokenizer.eos_id is not None:
        eos = [tokenizer.eos_id]
    return eos, tokenizer.pad_id if tokenizer.pad_id is not None else 0


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(
    items: Sequence[str], *, examples: str, nested_example: str, aliases: Mapping[str, str] | None = None
) -> dict[str, Any]:
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
