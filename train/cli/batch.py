"""`arjax generate --input prompts.jsonl --output out.jsonl`: a file of prompts through the engine, resumable.

Input: one JSON object per line, ``{"prompt": "..."}`` plus optional ``id`` (a string or int; default:
the line number), ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty``, ``seed`` and ``stop`` (a string or a list) overriding the flags for that line.
Output: one line per input as each finishes (so not in input order): ``id``, ``prompt``, ``text``,
``tokens`` (count), ``stop_reason`` and, with ``--logprobs``, ``logprobs``. Every line is flushed
when written; a rerun reads the output back (dropping a line cut short by a kill), skips the ids
already there and appends the rest. A line's seed is its ``seed``, else ``--seed`` + its line index
(0-based), so a rerun draws what the first run would have.
"""

from __future__ import annotations

import json
import os
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from arjax.decode.engine import Request
from arjax.train.cli.common import UsageError

_LINE_KEYS = {"id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
              "seed", "stop"}


def _read_input(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UsageError(f"--input {path!r} does not exist or is not a file; give a JSONL file of {{\"prompt\": ...}} lines")
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
            raise UsageError(f"{where} is not JSON ({e.msg}); each line must be an object like {{\"prompt\": \"...\"}}") from None
        if not isinstance(item, dict):
            raise UsageError(f"{where} is a JSON {type(item).__name__}, not an object; write {{\"prompt\": \"...\"}}")
        unknown = sorted(set(item) - _LINE_KEYS)
        if unknown:
            raise UsageError(f"{where} has unknown key {unknown[0]!r}; a line may hold {', '.join(sorted(_LINE_KEYS))}")
        if not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise UsageError(f"{where}: \"prompt\" must be a non-empty string")
        item.setdefault("id", number)
        if isinstance(item["id"], bool) or not isinstance(item["id"], (str, int)):
            raise UsageError(f"{where}: \"id\" must be a string or an integer, got {item['id']!r}")
        if item["id"] in seen:
            raise UsageError(f"{where} repeats id {item['id']!r} (first on line {seen[item['id']]}); ids must be unique")
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
            raise UsageError(f"--output {path!r} line {number} is not an output record; give a new --output "
                             "(or remove that line)") from None
        if not known:
            raise UsageError(f"--output {path!r} holds id {key!r}, which --input has not: is it another job's "
                             "output? give a new --output")
        if record.get("prompt") != prompts[key]:
            raise UsageError(f"--output {path!r} line {number} (id {key!r}) was written for another prompt than "
                             "--input has now; give a new --output (or restore the input)")
        done.add(key)
    return done


class _Rate(ProgressColumn):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        return Text(f"{self.counter['tokens'] / elapsed:,.0f} tok/s" if elapsed > 0 else "", style="cyan")


def run_batch(args, make_engine, tokenizer, *, eos: list[int], stops: list[str], context: int) -> int:
    """Every line of ``args.input`` not yet in ``args.output``, through an engine; one output line each.

    ``make_engine(max_len)`` builds the engine once the lines are read: its slots hold the longest
    prompt + max_new_tokens of this job (``--max-len`` overrides), not the model's whole ``context``.
    A line without max_new_tokens (and no --max-new-tokens) gets up to 200, as many as the context
    leaves after its prompt."""
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
            req = Request(prompt=ids, max_new_tokens=max_new, temperature=it.get("temperature", args.temperature),
                          top_k=it.get("top_k", args.top_k), top_p=it.get("top_p", args.top_p),
                          min_p=it.get("min_p", args.min_p),
                          repetition_penalty=it.get("repetition_penalty", args.repetition_penalty),
                          seed=it.get("seed", args.seed + it["_index"]), eos_ids=eos, stop=stop,
                          top_logprobs=0)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
        requests.append((it, req, where))
    need = max((len(r.prompt) + r.max_new_tokens if isinstance(r.max_new_tokens, int) else 2 for _, r, _ in requests),
               default=2)
    engine = make_engine(args.max_len or min(context, max(2, need)))
    for _, req, where in requests:
        try:
            engine.check(req)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{where}: {e}") from None
    requests = [(it, req) for it, req, _ in requests]

    engine.max_queue = max(engine.max_queue, len(requests))
    counter = {"tokens": 0}
    progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), _Rate(counter),
                        TimeRemainingColumn(), disable=not sys.stderr.isatty(), console=None, transient=False)
    t0 = time.perf_counter()
    try:
        written = _run(args, engine, requests, out_path, progress, counter, total=len(items), done=len(done))
    except OSError as e:  # disk full, permission: the lines written so far are kept
        raise UsageError(f"cannot write --output {out_path!r} ({e.strerror or e}); free space or choose another "
                         "--output, then run the same command again: finished lines are kept and skipped") from None
    seconds = time.perf_counter() - t0
    print(f"arjax generate: {written} prompts done ({len(done)} were already in {out_path!r}), "
          f"{counter['tokens']} tokens in {seconds:.1f} s ({counter['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)",
          file=sys.stderr)
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
                record = {"id": item["id"], "prompt": item["prompt"], "text": "".join(text),
                          "tokens": u.completion_tokens, "stop_reason": u.finish_reason}
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
