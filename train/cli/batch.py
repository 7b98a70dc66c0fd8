"""`arjax generate --input prompts.jsonl --output out.jsonl`: a file of prompts through the engine, resumable.

Input: one JSON object per line, ``{"prompt": "..."}`` plus optional ``id`` (a string or int; default:
the line number), ``max_new_tokens``, the sampling fields (``temperature``, ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty``: arjax.decode.sampling.SAMPLING_FIELDS, checked as the flags are), ``seed`` and
``stop`` (a string or a list) overriding the flags for that line.
Output: one line per input as each finishes (so not in input order): ``id``, ``prompt``, ``text``,
``tokens`` (count), ``stop_reason`` and, with ``--logprobs``, ``logprobs``. Every line is flushed
when written; a rerun reads the output back (dropping a line cut short by a kill), skips the ids
already there and appends the rest. A line's seed is its ``seed``, else ``--seed`` + its line index
(0-based), so a rerun draws what the first run would have.

Settings: ``OUT.settings.json`` (written atomically before the first line of OUT) records what the
lines' text depends on: the model's weights (a digest of its config, every weight's fingerprint and
its tokenizer; the --ckpt/--hf path is kept for the reader but may move), --quantize,
--kv-cache-dtype, the sampling flags, --seed, --max-new-tokens, --eos, --stop and --logprobs;
--max-len too when there is no --max-new-tokens (it then bounds each line's default budget).
--slots, --chunk-steps and the cache's size are not recorded: a rerun may change them. A rerun of
an output with lines in it and other settings is refused in one line naming the first flag that
differs; ``--force-settings`` continues anyway and appends the new settings to the file's
``written_with`` list with the output line they start at, so the file says that it is mixed. An
output with lines but no settings file (an older arjax wrote none, or the file was deleted)
is refused the same way: --force-settings records this run's settings from its next line on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from arjax.decode.engine import Request
from arjax.decode.sampling import SAMPLING_FIELDS, SAMPLING_NAMES, check_sampling, sampling_values
from arjax.model import quantize
from arjax.train.cli.common import (
    UsageError,
    engine_from_flags,
    eos_and_pad,
    load_from_flags,
    out_of_memory,
    sampling_flags,
    stop_strings,
)
from arjax.train.load import weights_digest

_LINE_KEYS = {"id", "prompt", "max_new_tokens", *SAMPLING_NAMES, "seed", "stop"}
SETTINGS_SUFFIX = ".settings.json"
SETTINGS_FORMAT = 1
# What a line's text depends on, in the order a refusal looks for the first difference ("model", the
# path the weights came from, is shown but not compared: a run directory may move).
_COMPARED = (
    "weights",
    "quantize",
    "kv_cache_dtype",
    *SAMPLING_NAMES,
    "seed",
    "max_new_tokens",
    "max_len",
    "eos",
    "stop",
    "logprobs",
)
# A sampling field missing from an older settings file was not there to set: its lines were written with its
# default (the value that turns it off).
_DEFAULTS = {f.name: f.default for f in SAMPLING_FIELDS}


def cmd_batch(args) -> int:
    """``arjax generate --input FILE --output O``: the model the flags name, an engine sized for the job, every line."""
    if args.prompt:
        raise UsageError("pass prompts with --prompt or in --input FILE, not both")
    if args.draft_ckpt or args.prompt_lookup or args.mesh:
        raise UsageError(
            "--input runs on the serving engine, which has no speculative decoding or --mesh; drop those flags"
        )
    sampling_flags(args)  # refused before anything loads
    model, tokenizer = load_from_flags(args)
    weights = weights_digest(model, tokenizer)  # as loaded: --quantize is recorded apart
    if args.quantize:
        model = quantize(model, args.quantize)  # int8 weights, per output channel (arjax.model.quant)
    args.slots = 32 if args.slots is None else args.slots
    eos, _ = eos_and_pad(args, tokenizer)
    if args.max_len is not None and not 2 <= args.max_len <= model.cfg.max_len:
        raise UsageError(
            f"--max-len {args.max_len} is out of range; give 2 to the model's context ({model.cfg.max_len})"
        )

    def make_engine(max_len):
        args.max_len = max_len
        with out_of_memory(
            f"{args.slots} slots of {max_len} tokens",  # allocating the slots' cache: too big fails here
            "lower --slots (or --max-len, or the longest prompt + max_new_tokens)",
        ):
            return engine_from_flags(args, model, tokenizer, max_queue=0)

    source = f"--ckpt {os.path.abspath(args.ckpt)}" if args.ckpt else f"--hf {os.path.abspath(args.hf)}"
    return run_batch(
        args,
        make_engine,
        tokenizer,
        eos=eos,
        stops=stop_strings(args),
        context=model.cfg.max_len,
        vocab_size=model.cfg.vocab_size,
        model={"model": source, "weights": weights, "dtype": model.cfg.dtype},
    )


def _read_input(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UsageError(
            f'--input {path!r} does not exist or is not a file; give a JSONL file of {{"prompt": ...}} lines'
        )
    items, seen = [], {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise UsageError(f"--input {path!r} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(
                f'{where} is not JSON ({e.msg}); each line must be an object like {{"prompt": "..."}}'
            ) from None
        if not isinstance(item, dict):
            raise UsageError(f'{where} is a JSON {type(item).__name__}, not an object; write {{"prompt": "..."}}')
        unknown = sorted(set(item) - _LINE_KEYS)
        if unknown:
            raise UsageError(f"{where} has unknown key {unknown[0]!r}; a line may hold {', '.join(sorted(_LINE_KEYS))}")
        if not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise UsageError(f'{where}: "prompt" must be a non-empty string')
        item.setdefault("id", number)
        if isinstance(item["id"], bool) or not isinstance(item["id"], (str, int)):
            raise UsageError(f'{where}: "id" must be a string or an integer, got {item["id"]!r}')
        if item["id"] in seen:
            first = seen[item["id"]]
            raise UsageError(f"{where} repeats id {item['id']!r} (first on line {first}); ids must be unique")
        seen[item["id"]] = number
        item["_line"] = number
        item["_index"] = len(items)
        items.append(item)
    if not items:
        raise UsageError(f"--input {path!r} holds no prompts")
    return items


def _read_done(path: str, prompts: dict) -> set:
    """Ids already in the output (``prompts``: the input's prompt per id); a last line cut short by a
    kill is removed from the file; a line for an id the input lacks, or for another prompt, is refused."""
    if not os.path.exists(path):
        return set()
    if not os.path.isfile(path):
        raise UsageError(f"--output {path!r} is not a file; give a file path")
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # an unfinished last line: written when the job was killed
        with open(path, "r+b") as f:
            f.truncate(end)
    done = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["id"]
            known = key in prompts
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UsageError(
                f"--output {path!r} line {number} is not an output record; give a new --output (or remove that line)"
            ) from None
        if not known:
            raise UsageError(
                f"--output {path!r} holds id {key!r}, which --input has not: is it another job's "
                "output? give a new --output"
            )
        if record.get("prompt") != prompts[key]:
            raise UsageError(
                f"--output {path!r} line {number} (id {key!r}) was written for another prompt than "
                "--input has now; give a new --output (or restore the input)"
            )
        done.add(key)
    return done


def job_settings(args, *, model: dict[str, Any], eos: list[int], stops: list[str]) -> dict[str, Any]:
    """What this job's lines are written with (``model``: ``model``, ``weights`` and ``dtype`` from the caller)."""
    settings = {
        "model": model["model"],
        "weights": model["weights"],
        "quantize": args.quantize,
        "kv_cache_dtype": args.kv_cache_dtype or model["dtype"],
        **sampling_values(args),
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "eos": list(eos),
        "stop": list(stops),
        "logprobs": bool(args.logprobs),
    }
    if args.max_new_tokens is None:  # then --max-len bounds each line's default budget (not otherwise)
        settings["max_len"] = args.max_len
    return settings


def _shown(key: str, value: Any) -> str:
    """A setting as the flags that give it: ``--seed 0``, ``no --max-new-tokens``, ``--stop "\\n" --stop "."``."""
    flag = "--" + key.replace("_", "-")
    if value is None or value is False or value == []:
        return f"no {flag}"
    if value is True:
        return flag
    if isinstance(value, list):
        return " ".join(f"{flag} {json.dumps(v, ensure_ascii=False)}" for v in value)
    return f"{flag} {value}"


def _settings_path(out_path: str) -> str:
    return out_path + SETTINGS_SUFFIX


def _read_settings(out_path: str) -> list[dict[str, Any]] | None:
    """The ``written_with`` list of an output's settings file; None when there is none."""
    path = _settings_path(out_path)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        written_with = data["written_with"]
        if (
            data.get("format") != SETTINGS_FORMAT
            or not written_with
            or not all(
                isinstance(w, dict) and isinstance(w.get("from_line"), int) and "settings" in w for w in written_with
            )
        ):
            raise ValueError("not a settings file of this arjax")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"cannot read {path!r}, the settings --output {out_path!r} was written with "
            f"({getattr(e, 'strerror', None) or e}); pass --force-settings to continue anyway, or give a "
            "new --output"
        ) from None
    return written_with


def _check_settings(out_path: str, settings: dict[str, Any], *, lines: int, force: bool) -> list[dict[str, Any]] | None:
    """The settings file's new ``written_with`` list (None: it already ends with this run's settings), or
    a refusal naming the first flag that differs from what the output's ``lines`` were written with."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not lines:  # nothing written yet (or a kill came before the first line): nothing to mix with
        return [{"from_line": 1, "time": now, "settings": settings}]
    try:
        recorded = _read_settings(out_path)
    except UsageError:
        if not force:
            raise
        recorded = [{"from_line": 1, "settings": None, "unreadable": True}]
    written_with = list(recorded or [{"from_line": 1, "settings": None, "unrecorded": True}])
    while len(written_with) > 1 and written_with[-1]["from_line"] > lines:  # a forced run killed before its first line
        written_with.pop()
    last = written_with[-1]["settings"]
    if not last and not force:
        raise UsageError(
            f"--output {out_path!r} has {lines} lines but no record of the settings they were written "
            f"with ({os.path.basename(_settings_path(out_path))}; an older arjax wrote none): pass "
            "--force-settings to continue with this run's settings (recorded from here on), or give a "
            "new --output"
        )
    differs = [k for k in _COMPARED if (last or {}).get(k, _DEFAULTS.get(k)) != settings.get(k)]
    if not differs:
        return None if written_with == recorded else written_with
    if not force:
        key = differs[0]
        if key == "weights":
            what = (
                f"was written by a model with other weights ({last.get('model')}, digest "
                f"{str(last['weights'])[:12]}) than this run's ({settings['model']}, digest "
                f"{settings['weights'][:12]}): rerun with that model"
            )
        else:
            what = (
                f"was written with {_shown(key, last.get(key, _DEFAULTS.get(key)))}; this run has "
                f"{_shown(key, settings.get(key))}: "
                "rerun with the same flags"
            )
        raise UsageError(
            f"--output {out_path!r} {what}, pass --force-settings to continue anyway (mixing settings), "
            "or give a new --output"
        )
    return written_with + [{"from_line": lines + 1, "time": now, "settings": settings, "forced": True}]


def _write_settings(out_path: str, written_with: list[dict[str, Any]]) -> None:
    """The settings file, replaced whole (a kill leaves the old one or the new one, never half of one)."""
    path = _settings_path(out_path)
    tmp = f"{path}.tmp-{os.getpid()}"
    body = {
        "format": SETTINGS_FORMAT,
        "about": f"the settings each part of {os.path.basename(out_path)} was written with, from its from_line "
        "on (arjax generate --input --output); a rerun must use the last ones or pass --force-settings",
        "written_with": written_with,
    }
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Rate(ProgressColumn):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        return Text(f"{self.counter['tokens'] / elapsed:,.0f} tok/s" if elapsed > 0 else "", style="cyan")


def run_batch(
    args,
    make_engine,
    tokenizer,
    *,
    eos: list[int],
    stops: list[str],
    context: int,
    vocab_size: int,
    model: dict[str, Any],
) -> int:
    """Every line of ``args.input`` not yet in ``args.output``, through an engine; one output line each.

    ``make_engine(max_len)`` builds the engine once the lines are read: its slots hold the longest
    prompt + max_new_tokens of this job (``--max-len`` overrides), not the model's whole ``context``.
    A line without max_new_tokens (and no --max-new-tokens) gets up to 200, as many as the context
    leaves after its prompt. A line's sampling values are checked against ``vocab_size`` as the flags
    are. ``model`` identifies the weights for the settings file (``job_settings``):
    an output written with other settings is refused unless ``args.force_settings``."""
    if not args.output:
        raise UsageError("--input needs --output FILE (the JSONL the results go to)")
    items = _read_input(args.input)
    out_path = args.output
    if os.path.exists(out_path) and os.path.samefile(out_path, args.input):
        raise UsageError("--output is the --input file; give another path")
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {out_path!r}: the directory {parent!r} does not exist; create it first")
    done = _read_done(out_path, {it["id"]: it["prompt"] for it in items})
    written_with = _check_settings(
        out_path, job_settings(args, model=model, eos=eos, stops=stops), lines=len(done), force=args.force_settings
    )
    todo = [it for it in items if it["id"] not in done]
    limit = args.max_len or context

    requests = []
    for it in todo:  # every line is checked before anything runs
        where = f"{args.input}:{it['_line']}"
        try:
            ids = tokenizer.encode(it["prompt"])
            max_new = it.get("max_new_tokens", args.max_new_tokens)
            if max_new is None:
                max_new = max(1, min(200, limit - len(ids)))
            stop = it.get("stop", stops)
            stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
                raise ValueError(f'"stop" must be a string or a list of strings, got {it["stop"]!r}')
            sampling = check_sampling(
                {name: it.get(name, getattr(args, name)) for name in SAMPLING_NAMES}, vocab_size=vocab_size
            )
            req = Request(
                prompt=ids,
                max_new_tokens=max_new,
                **sampling,
                seed=it.get("seed", args.seed + it["_index"]),
                eos_ids=eos,
                stop=stop,
                top_logprobs=0,
                logprobs=bool(args.logprobs),
            )
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
        requests.append((it, req, where))
    need = max(
        (len(r.prompt) + r.max_new_tokens if isinstance(r.max_new_tokens, int) else 2 for _, r, _ in requests),
        default=2,
    )
    engine = make_engine(args.max_len or min(context, max(2, need)))
    for _, req, where in requests:
        try:
            engine.check(req)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
    requests = [(it, req) for it, req, _ in requests]

    engine.max_queue = max(engine.max_queue, len(requests))
    counter = {"tokens": 0}
    progress = Progress(
        TextColumn("generate"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(counter),
        TimeRemainingColumn(),
        disable=not sys.stderr.isatty(),
        console=None,
        transient=False,
    )
    t0 = time.perf_counter()
    try:
        if written_with is not None:
            _write_settings(out_path, written_with)  # before the first line it describes
        written = _run(args, engine, requests, out_path, progress, counter, total=len(items), done=len(done))
    except OSError as e:  # disk full, permission: the lines written so far are kept
        raise UsageError(
            f"cannot write --output {out_path!r} ({e.strerror or e}); free space or choose another "
            "--output, then run the same command again: finished lines are kept and skipped"
        ) from None
    seconds = time.perf_counter() - t0
    print(
        f"arjax generate: {written} prompts done ({len(done)} were already in {out_path!r}), "
        f"{counter['tokens']} tokens in {seconds:.1f} s ({counter['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def _run(args, engine, requests, out_path, progress, counter, *, total: int, done: int) -> int:
    """Submit every request, step the engine until all are done, append each result as it finishes."""
    written = 0
    with open(out_path, "a", encoding="utf-8") as out, progress:
        task = progress.add_task("generate", total=total, completed=done)

        def collector(item):
            text, logprobs = [], []

            def on_update(u):
                nonlocal written
                text.append(u.text)
                logprobs.extend(u.logprobs)
                counter["tokens"] += len(u.tokens)
                if u.finish_reason is None:
                    return
                record = {
                    "id": item["id"],
                    "prompt": item["prompt"],
                    "text": "".join(text),
                    "tokens": u.completion_tokens,
                    "stop_reason": u.finish_reason,
                }
                if args.logprobs:
                    record["logprobs"] = logprobs
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # a killed job keeps every line written so far
                written += 1
                progress.advance(task)

            return on_update

        for item, req in requests:
            engine.submit(req, collector(item))
        engine.run_until_done()
        out.flush()
        os.fsync(out.fileno())
    return written
