"""Prepared datasets, written: text, JSONL, parquet or HF Arrow files tokenized in parallel into token shards.

The directory's format (manifest.json, tokenizer/, tokens-NNNNN.bin) and its reader, ``open_prepared``
(re-exported here), are ``arjax.train.shards``. `arjax data prepare` runs ``prepare``: everything is
written into a temporary sibling of the output directory that replaces it when complete.

The stream is the documents in input order, joined by a separator: the text "\\n\\n" for the byte
and char tokenizers (so the stream is the tokenization of the joined text, and one text file gives
exactly ``tokenizer.encode(text)``), the tokenizer's EOS for hf (else its encoding of "\\n\\n").
The last ``val_fraction`` of the stream is validation, as in ``data.tokenize_and_split``: training
from a prepared text file gives exactly the batches training from the text gives.

Documents: a text file is one document; a JSONL line, a parquet or Arrow row is one (its
``text_field``); empty documents are skipped. Work is split into units of about ``chunk_bytes``
(byte ranges of text and JSONL files, parquet row groups, runs of Arrow record batches) tokenized
by ``workers`` processes; byte and char tokenization is exact across any cut, so a text file is
cut anywhere (at a character boundary). An hf tokenizer's output depends on where text is cut, so
for hf each text file is one unit (held in memory while it is encoded) and JSONL/parquet/Arrow
units are cut between documents. The corpus is never held in memory: units stream through, and
shards are written as results arrive, in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from arjax.train.shards import (  # the format the writer writes; the reader is re-exported for its callers
    FORMAT,
    KINDS,
    MANIFEST,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    VERSION,
    Prepared,
    TokenArray,
    check_run_config,
    manifest_digest,
    open_prepared,
)

# Only the standard library and numpy at import time (arjax.train.shards too): worker processes start
# with spawn and import this module, and the training core (checkpoint, tokenizer) brings JAX, about a
# second per worker. The functions of the main process import it where they need it.
DEFAULT_SHARD_TOKENS = 2**26  # 128 MiB of uint16 per shard
DEFAULT_CHUNK_BYTES = 2**23  # 8 MiB of input per unit of work
SEPARATOR_TEXT = "\n\n"  # between documents (byte, char; hf without an EOS)


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


# ----------------------------------------------------------------------------- reading the inputs


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError("reading parquet and Arrow files needs pyarrow: pip install 'arjax[data]'") from None
    return pyarrow


@dataclasses.dataclass(frozen=True)
class _Source:
    path: str
    format: str  # text | jsonl | parquet | arrow


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One piece of work: rows or bytes [start, stop) of one source."""

    source: _Source
    start: int  # text/jsonl: byte offset; parquet: row group; arrow: record batch
    stop: int
    continues: bool = False  # a later piece of the same document (a text file cut in pieces)


class _RowError(ValueError):
    """A worker's error at a row counted from its unit's first row; the main process, which has
    seen the units before it, names the row in the file."""

    def __init__(self, path: str, row: int, message: str):
        super().__init__(path, row, message)


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".parquet":
        return "parquet"
    if ext == ".arrow":
        return "arrow"
    if ext == ".json":
        raise ValueError(f"{path!r} is a .json file; write one JSON object per line as .jsonl (or pass a text file)")
    return "text"


def _hf_dataset_files(directory: str) -> list[str]:
    """The Arrow files of a `datasets.Dataset.save_to_disk` directory, in the dataset's row order."""
    state = os.path.join(directory, "state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{state!r} is not a Hugging Face dataset state file ({e}); save the dataset again"
            ) from None
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".arrow"))
    files = [os.path.join(directory, n) for n in names]
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"{path!r}, listed in {state!r}, is missing; save the dataset again")
    if not files:
        raise ValueError(f"{directory!r} looks like a Hugging Face dataset but holds no .arrow files")
    return files


def _expand(inputs: Sequence[str]) -> list[_Source]:
    """Every file to read, in order: files as given; a dataset directory's Arrow files; any other
    directory's files, recursively in sorted order (hidden files skipped)."""
    sources: list[_Source] = []
    for given in inputs:
        if not isinstance(given, str) or not given:
            raise ValueError(f"--data {given!r} is not a path; pass text, JSONL, parquet files or dataset directories")
        if not os.path.exists(given):
            raise ValueError(f"--data {given!r} does not exist; check the path")
        if os.path.isfile(given):
            sources.append(_Source(given, _format_of(given)))
            continue
        if os.path.isfile(os.path.join(given, MANIFEST)):
            raise ValueError(f"--data {given!r} is a prepared dataset already; train on it directly (data: {given})")
        if os.path.isfile(os.path.join(given, "dataset_dict.json")):
            raise ValueError(
                f"--data {given!r} is a Hugging Face DatasetDict; "
                f"pass one split's directory, e.g. {os.path.join(given, 'train')}"
            )
        if os.path.isfile(os.path.join(given, "state.json")) or os.path.isfile(
            os.path.join(given, "dataset_info.json")
        ):
            sources.extend(_Source(p, "arrow") for p in _hf_dataset_files(given))
            continue
        found = []
        for dirpath, dirnames, files in os.walk(given):
            if MANIFEST in files:
                raise ValueError(
                    f"{dirpath!r}, inside --data {given!r}, is a prepared dataset; leave it out of the inputs"
                )
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, n) for n in sorted(files) if not n.startswith("."))
        if not found:
            raise ValueError(f"--data {given!r} is a directory with no files in it")
        sources.extend(_Source(p, _format_of(p)) for p in found)
    for s in sources:
        if not os.access(s.path, os.R_OK):
            raise ValueError(f"cannot read {s.path!r} (permission denied); fix its permissions or leave it out")
    return sources


def _text_cuts(path: str, size: int, chunk: int) -> list[int]:
    """Offsets about ``chunk`` apart, each moved forward to the start of a UTF-8 character."""
    cuts = [0]
    with open(path, "rb") as f:
        pos = chunk
        while pos < size:
            f.seek(pos)
            head = f.read(4)
            skip = 0
            while skip < len(head) and head[skip] & 0xC0 == 0x80:  # continuation bytes 10xxxxxx
                skip += 1
            pos += skip if skip < 4 else 0  # four in a row is not UTF-8; the worker reports it
            if pos < size:
                cuts.append(pos)
            pos += chunk
    return cuts + [size]


def _line_cuts(path: str, size: int, chunk: int) -> list[int]:
    """Offsets about ``chunk`` apart, each just after a newline."""
    cuts = [0]
    with open(path, "rb") as f:
        pos = chunk
        while pos < size:
            f.seek(pos - 1)
            while True:
                block = f.read(1 << 16)
                if not block:
                    pos = size
                    break
                i = block.find(b"\n")
                if i >= 0:
                    pos = f.tell() - len(block) + i + 1
                    break
            if pos < size:
                cuts.append(pos)
            pos += chunk
    return cuts + [size]


def _open_arrow(path: str):
    """A reader of an Arrow IPC file: the stream format (what save_to_disk writes), else the file format."""
    pa = _pyarrow()
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            raise ValueError(f"{path!r} is not an Arrow IPC file (stream or file format)") from None
        return _BatchesOf(reader)


class _BatchesOf:
    """An Arrow IPC file-format reader iterated like a stream reader."""

    def __init__(self, reader):
        self.schema = reader.schema
        self._reader = reader

    def __iter__(self):
        return (self._reader.get_batch(i) for i in range(self._reader.num_record_batches))


def _check_text_column(schema, path: str, field: str) -> None:
    pa = _pyarrow()
    if field not in schema.names:
        raise ValueError(
            f"{path!r} has no column {field!r} (columns: {', '.join(schema.names)}); pass --text-field NAME"
        )
    kind = schema.field(field).type
    if pa.types.is_dictionary(kind):  # parquet's dictionary-encoded strings
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path!r}: column {field!r} holds {kind}, not text; pass --text-field with a string column")


def _units(source: _Source, *, chunk_bytes: int, text_field: str, whole_text: bool) -> list[_Unit]:
    size = os.path.getsize(source.path)
    if source.format in ("text", "jsonl"):
        if source.format == "jsonl":
            cuts = _line_cuts(source.path, size, chunk_bytes)
        else:
            cuts = _text_cuts(source.path, size, size if whole_text else chunk_bytes) if size else [0, 0]
        return [
            _Unit(source, a, b, continues=source.format == "text" and a > 0)
            for a, b in itertools.pairwise(cuts)
            if b > a
        ]
    if source.format == "parquet":
        pa = _pyarrow()
        try:
            meta = pa.parquet.ParquetFile(source.path)
        except pa.ArrowException as e:
            raise ValueError(f"{source.path!r} is not a readable parquet file ({e})") from None
        _check_text_column(meta.schema_arrow, source.path, text_field)
        return [_Unit(source, i, i + 1) for i in range(meta.num_row_groups)]
    reader = _open_arrow(source.path)
    _check_text_column(reader.schema, source.path, text_field)
    units, first, nbytes, n = [], 0, 0, 0
    for n, batch in enumerate(reader, start=1):  # memory-mapped: reading the headers copies no data
        nbytes += batch.nbytes
        if nbytes >= chunk_bytes:
            units.append(_Unit(source, first, n))
            first, nbytes = n, 0
    if n > first:
        units.append(_Unit(source, first, n))
    return units


def _utf8(raw: bytes, path: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path!r} is not UTF-8 text: byte {offset + e.start} is 0x{raw[e.start]:02x} ({e.reason}); "
            "convert it to UTF-8"
        ) from None


def _read_bytes(unit: _Unit) -> bytes:
    with open(unit.source.path, "rb") as f:
        f.seek(unit.start)
        return f.read(unit.stop - unit.start)


def _documents(unit: _Unit, text_field: str) -> tuple[list[str], int]:
    """(the unit's non-empty documents, its number of rows)."""
    path = unit.source.path
    if unit.source.format == "text":
        text = _utf8(_read_bytes(unit), path, unit.start)
        return [text] if text else [], 0
    if unit.source.format == "jsonl":
        lines = _utf8(_read_bytes(unit), path, unit.start).split("\n")
        if lines and not lines[-1]:
            lines.pop()  # the newline that ends the last line
        docs = []
        for row, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise _RowError(
                    path, row, f"not JSON ({e}); each line must be one JSON object with a {text_field!r} field"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise _RowError(path, row, f"no {text_field!r} field (found: {keys}); pass --text-field NAME")
            if not isinstance(record[text_field], str):
                raise _RowError(path, row, f"{text_field!r} is a {type(record[text_field]).__name__}, not text")
            if record[text_field]:
                docs.append(record[text_field])
        return docs, len(lines)
    if unit.source.format == "parquet":
        pa = _pyarrow()
        column = pa.parquet.ParquetFile(path).read_row_group(unit.start, columns=[text_field]).column(text_field)
        values = column.to_pylist()
    else:
        values = []
        for i, batch in enumerate(_open_arrow(path)):
            if i >= unit.stop:
                break
            if i >= unit.start:
                values.extend(batch.column(batch.schema.get_field_index(text_field)).to_pylist())
    for row, value in enumerate(values):
        if value is None:
            raise _RowError(path, row, f"{text_field!r} is null; drop such rows or fill them")
    return [v for v in values if v], len(values)


# ----------------------------------------------------------------------------- tokenizing (in worker processes)


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every worker needs besides its unit (small: it travels with every unit)."""

    mode: str  # "chars": the characters used (to build a char vocabulary); "tokens": the token ids
    text_field: str
    kind: str = "byte"
    chars: str = ""  # char: the vocabulary, in id order
    tokenizer_dir: str = ""  # hf: the saved tokenizer
    separator: tuple[int, ...] = ()
    dtype: str = "uint16"


_LOADED: dict[str, Any] = {}  # per worker process: tokenizer_dir -> tokenizer


def _char_ids(text: str, chars: str) -> np.ndarray:
    """CharTokenizer.encode, vectorized: each character's index in ``chars``."""
    codes = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4")
    order = np.argsort(codes)
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    found = np.minimum(np.searchsorted(codes[order], points), len(codes) - 1)
    if not np.array_equal(codes[order][found], points):
        bad = text[int(np.argmax(codes[order][found] != points))]
        raise ValueError(f"character {bad!r} is not in the character vocabulary; this is a bug in arjax data prepare")
    return order[found]


def _encode(job: _Job, docs: list[str]) -> np.ndarray:
    """The unit's documents joined by the separator, as token ids."""
    if job.kind in ("byte", "char"):
        text = SEPARATOR_TEXT.join(docs)  # the separator is this text, so one encode is exact
        if job.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return _char_ids(text, job.chars)
    if job.tokenizer_dir not in _LOADED:
        from arjax.train.tokenizer import load_tokenizer

        _LOADED[job.tokenizer_dir] = load_tokenizer(job.tokenizer_dir)
    tok = _LOADED[job.tokenizer_dir]
    # encode_batch is tokenizer.encode for each document, in Rust threads.
    encoded = [e.ids for e in tok.tokenizer.encode_batch(docs, add_special_tokens=tok.add_special_tokens)]
    separator = np.asarray(job.separator, np.int64)
    pieces = [
        piece for i, ids in enumerate(encoded) for piece in ([separator] if i else []) + [np.asarray(ids, np.int64)]
    ]
    return np.concatenate(pieces)


def _work(job: _Job, unit: _Unit) -> tuple[Any, int, int]:
    """(the unit's characters or tokens, its number of documents, its number of rows)."""
    docs, rows = _documents(unit, job.text_field)
    n_docs = 0 if unit.continues else len(docs)  # a later piece of a text file is no new document
    if job.mode == "chars":
        return "".join(sorted(set().union(*map(set, docs)))), n_docs, rows
    ids = _encode(job, docs) if docs else np.zeros(0, np.int64)
    limit = np.iinfo(job.dtype).max
    if len(ids) and int(ids.max()) > limit:
        raise ValueError(f"token id {int(ids.max())} does not fit {job.dtype}; this is a bug in arjax data prepare")
    return ids.astype(job.dtype), n_docs, rows


def _in_order(
    pool: concurrent.futures.Executor | None, job: _Job, units: list[_Unit], window: int
) -> Iterator[tuple[Any, int, int]]:
    """``_work`` of each unit, in order; with a pool at most ``window`` results wait in memory."""
    if pool is None:
        yield from (_work(job, unit) for unit in units)
        return
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    for unit in units:
        pending.append(pool.submit(_work, job, unit))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _run(job: _Job, units: list[_Unit], pool, window: int) -> Iterator[tuple[_Unit, tuple[Any, int, int]]]:
    """Each unit with its result, in order; a worker's error at a row names the row in its file."""
    rows_before: dict[str, int] = {}
    results = _in_order(pool, job, units, window)
    for unit in units:
        try:
            result = next(results)
        except _RowError as e:  # results come in order, so every earlier unit of the file is counted
            path, row, message = e.args
            raise ValueError(f"{path}:{rows_before.get(path, 0) + row + 1}: {message}") from None
        rows_before[unit.source.path] = rows_before.get(unit.source.path, 0) + result[2]
        yield unit, result


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    """Appends tokens to shards of at most ``shard_tokens``, hashing each as it is written."""

    def __init__(self, directory: str, dtype: str, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, np.dtype(dtype).newbyteorder("<"), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                name = f"{SHARD_PREFIX}{len(self.shards):05d}{SHARD_SUFFIX}"
                self._file = open(os.path.join(self.directory, name), "wb")  # noqa: SIM115 (open across write calls; closed by close())
                self._hash, self._count = hashlib.sha256(), 0
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
            take = ids[: self.shard_tokens - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(take)
            ids = ids[len(take) :]
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"--{name} {value!r} must be an integer in [{lo}, {hi}]")
    return int(value)


def _check_out(out_dir: str, overwrite: bool, inputs: Sequence[str]) -> None:
    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError("--out is empty; pass the directory to write the prepared dataset to")
    out = os.path.realpath(out_dir)
    for given in map(os.path.realpath, inputs):
        if os.path.commonpath([given, out]) in (given, out):
            raise ValueError(
                f"--out {out_dir!r} is, holds or lies inside --data {given!r}; choose a directory apart from the inputs"
            )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out_dir!r} is a file; choose a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out {out_dir!r} is not empty; pass --overwrite to replace it, or choose a new directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        # --overwrite replaces a prepared dataset, never a folder of something else.
        raise ValueError(
            f"--out {out_dir!r} holds files but no prepared dataset ({MANIFEST}); --overwrite replaces only "
            "a directory written by `arjax data prepare`: choose a new or empty directory"
        )


def _fresh_out(out_dir: str) -> str:
    """An empty temporary sibling of ``out_dir`` to write into (see ``_replace``)."""
    out = os.path.realpath(out_dir)
    parent, base = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):  # what a killed prepare left (its process is gone)
        if name.startswith(f".{base}.arjax-tmp-"):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f".{base}.arjax-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _replace(tmp: str, out_dir: str) -> None:
    """The finished temporary directory becomes ``out_dir``; an old ``out_dir`` goes away whole."""
    out = os.path.realpath(out_dir)
    old = None
    if os.path.isdir(out):
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.arjax-old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    inputs: Sequence[str],
    out_dir: str,
    *,
    tokenizer: str = "byte",
    tokenizer_path: str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (text/JSONL/parquet files, dataset directories) into ``out_dir``; returns the manifest.

    Everything is written into a temporary sibling of ``out_dir`` that replaces it when complete,
    so a failed or killed prepare leaves ``out_dir`` as it was.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no --data given; pass text, JSONL or parquet files, or dataset directories")
    if tokenizer not in KINDS:
        raise ValueError(f"--tokenizer {tokenizer!r} is not one of {', '.join(KINDS)}")
    if tokenizer == "hf" and not tokenizer_path:
        raise ValueError("--tokenizer hf needs --tokenizer-path DIR (a directory with tokenizer.json)")
    if tokenizer != "hf" and tokenizer_path:
        raise ValueError(f"--tokenizer-path applies to --tokenizer hf only, not {tokenizer!r}; drop it")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError("--text-field is empty; pass the name of the field or column holding the text")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not (math.isfinite(val_fraction) and 0 < val_fraction < 1)
    ):
        raise ValueError(f"--val-fraction {val_fraction!r} must be a number in (0, 1), e.g. 0.1")
    shard_tokens = _check_int("shard-tokens", shard_tokens, 1, 2**40)
    workers = _check_int("workers", default_workers() if workers is None else workers, 1, 1024)
    chunk_bytes = _check_int("chunk-bytes", chunk_bytes, 1, 2**40)
    from arjax.train import checkpoint as ckpt
    from arjax.train.tokenizer import (
        ByteTokenizer,
        CharTokenizer,
        build_tokenizer,
        load_tokenizer,
    )

    _check_out(out_dir, overwrite, list(inputs) + ([tokenizer_path] if tokenizer_path else []))
    sources = _expand(inputs)
    tok = build_tokenizer("hf", path=tokenizer_path) if tokenizer == "hf" else None  # a bad directory fails early
    units = [
        u
        for s in sources
        for u in _units(s, chunk_bytes=chunk_bytes, text_field=text_field, whole_text=tokenizer == "hf")
    ]
    everything_empty = f"no text in --data {' '.join(inputs)}: every document is empty"

    tmp = _fresh_out(out_dir)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        pool = None
        if workers > 1 and len(units) > 1:  # spawn: the parent may run JAX threads, which a fork would copy mid-flight
            pool = concurrent.futures.ProcessPoolExecutor(
                min(workers, len(units)), mp_context=multiprocessing.get_context("spawn")
            )
            cleanup.callback(pool.shutdown, wait=True, cancel_futures=True)
        window = 2 * workers
        if tokenizer == "char":  # a first pass: the vocabulary is every character of the joined text
            chars, docs = set(), 0
            for _, (used, n, _) in _run(_Job("chars", text_field), units, pool, window):
                chars.update(used)
                docs += n
            if docs > 1:
                chars.update(SEPARATOR_TEXT)
            if not chars:
                raise ValueError(everything_empty)
            tok = CharTokenizer(sorted(chars))
        elif tokenizer == "byte":
            tok = ByteTokenizer()
        tok_dir = ckpt.tokenizer_dir(tmp)
        tok.save(tok_dir)
        tok = load_tokenizer(tok_dir)  # what workers and trainers will use
        dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
        if tokenizer == "hf":
            separator = (
                [tok.eos_id]
                if tok.eos_id is not None
                else tok.tokenizer.encode(SEPARATOR_TEXT, add_special_tokens=False).ids
            )
        elif tokenizer == "byte" or docs > 1:
            separator = tok.encode(SEPARATOR_TEXT)
        else:  # one document: no separator (and "\n" need not be in the char vocabulary)
            separator = []
        job = _Job(
            "tokens",
            text_field,
            kind=tokenizer,
            chars="".join(getattr(tok, "chars", "")),
            tokenizer_dir=tok_dir,
            separator=tuple(separator),
            dtype=dtype,
        )

        writer = _ShardWriter(tmp, dtype, shard_tokens)
        per_source = {
            s.path: {
                "path": os.path.abspath(s.path),
                "format": s.format,
                "bytes": os.path.getsize(s.path),
                "documents": 0,
                "tokens": 0,
            }
            for s in sources
        }
        total, docs = 0, 0
        for unit, (ids, n_docs, _) in _run(job, units, pool, window):
            if not len(ids):
                continue
            if total and not unit.continues:
                writer.write(np.asarray(separator))
                total += len(separator)
            writer.write(ids)
            total += len(ids)
            docs += n_docs
            per_source[unit.source.path]["documents"] += n_docs
            per_source[unit.source.path]["tokens"] += len(ids)
        shards = writer.close()
        n_val = max(1, int(total * val_fraction))  # exactly data.tokenize_and_split's split
        if total == 0:
            raise ValueError(everything_empty)
        if total - n_val < 1:
            raise ValueError(f"--data has only {total} tokens; a train and a validation split need at least 2")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": {"kind": tokenizer, "sha256": ckpt.tokenizer_digest(tmp)},
            "vocab_size": tok.vocab_size,
            "dtype": dtype,
            "tokens": total,
            "documents": docs,
            "separator": list(separator),
            "text_field": text_field,
            "split": {"val_fraction": val_fraction, "train": [0, total - n_val], "val": [total - n_val, total]},
            "shards": shards,
            "sources": list(per_source.values()),
        }
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
        _replace(tmp, out_dir)
    return manifest


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_SHARD_TOKENS",
    "SEPARATOR_TEXT",
    "default_workers",
    "prepare",
    # the format, and its reader re-exported from arjax.train.shards
    "FORMAT",
    "KINDS",
    "MANIFEST",
    "SHARD_PREFIX",
    "SHARD_SUFFIX",
    "VERSION",
    "Prepared",
    "TokenArray",
    "check_run_config",
    "manifest_digest",
    "open_prepared",
]
