"""Prepared datasets, read back: the token-shard format and `open_prepared(dir)`, checked and memory-mapped.

A prepared directory (written by ``arjax.train.prepare``, `arjax data prepare`) holds:

    manifest.json        format, tokenizer identity, vocabulary, dtype, shards, split, sources
    tokenizer/           the tokenizer (tokenizer.save), hashed into the manifest
    tokens-00000.bin ... one token stream, little-endian uint16 (vocabulary <= 65536) or uint32,
                         cut into shards of at most ``shard_tokens`` tokens (nanoGPT's .bin files)

``open_prepared`` refuses damage (a malformed manifest, a missing, truncated or stray shard, an
edited tokenizer; with ``verify``, changed bytes) in one line that says to prepare again. Its
``train`` and ``val`` are ``TokenArray``s: ``len()`` and ``[a:b]`` (int32, across shards) over lazily
opened ``np.memmap``s, which is all ``data.Windows`` and ``data.eval_windows`` use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

# Only the standard library and numpy at import time: the writer's worker processes start with spawn
# and import this module through arjax.train.prepare, and the training core (checkpoint, tokenizer)
# brings JAX, about a second per worker. Functions import it where they need it.
KINDS = ("byte", "char", "hf")  # = arjax.train.tokenizer.KINDS (a test keeps them equal)

MANIFEST = "manifest.json"
FORMAT = "arjax.tokens"
VERSION = 1
SHARD_PREFIX, SHARD_SUFFIX = "tokens-", ".bin"
_FIX = "re-run `arjax data prepare` into a new --out (or with --overwrite)"  # what to do about damage


class TokenArray:
    """Tokens [start, stop) of a prepared token stream as a 1-D int32 array: ``len()``, ``a[i]`` and
    ``a[i:j]`` (across shard boundaries; a copy), read through np.memmap, so nothing is loaded
    until it is sliced. ``np.asarray(a)`` reads it all."""

    ndim = 1
    dtype = np.dtype(np.int32)

    def __init__(self, paths: Sequence[str], counts: Sequence[int], dtype: str, start: int, stop: int):
        self._paths = list(paths)
        self._counts = [int(c) for c in counts]
        self._offsets = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)])  # [S+1]
        self._file_dtype = np.dtype(dtype).newbyteorder("<")
        self._start, self._stop = int(start), int(stop)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:  # opened on first use: a huge corpus has many shards
            self._maps[i] = np.memmap(self._paths[i], dtype=self._file_dtype, mode="r", shape=(self._counts[i],))
        return self._maps[i]

    def _read(self, a: int, b: int) -> np.ndarray:
        """Positions [a, b) of this view as int32."""
        a, b = a + self._start, b + self._start
        out = np.empty(max(0, b - a), np.int32)
        i = int(np.searchsorted(self._offsets, a, side="right")) - 1
        done = 0
        while a + done < b:
            lo = a + done - int(self._offsets[i])
            piece = self._shard(i)[lo : min(self._counts[i], lo + b - a - done)]
            out[done : done + len(piece)] = piece
            done += len(piece)
            i += 1
        return out

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            r = range(*key.indices(n))
            if not r:
                return np.zeros(0, np.int32)
            lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
            span = self._read(lo, hi)
            return span if r.step == 1 else span[r[0] - lo :: r.step]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of range for {n} tokens")
            return int(self._read(i, i + 1)[0])
        raise TypeError(f"a TokenArray is indexed by an int or a slice, not {type(key).__name__}")

    def __array__(self, dtype=None, copy=None):
        out = self._read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self):  # pickles as paths and offsets, not as mapped memory
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"TokenArray({len(self):,} tokens over {len(self._paths)} shard(s))"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An opened prepared dataset: its manifest, tokenizer and the train / val token streams."""

    path: str
    manifest: dict
    tokenizer: Any
    train: TokenArray
    val: TokenArray
    digest: str  # SHA-256 identity: tokenizer, vocabulary, dtype, shards, split (not where the sources were)


def manifest_digest(manifest: dict) -> str:
    keys = ("format", "version", "tokenizer", "vocab_size", "dtype", "tokens", "separator", "split", "shards")
    identity = {k: manifest.get(k) for k in keys}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_manifest(path: str) -> dict:
    where = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ValueError(f"prepared dataset {path!r} does not exist; run `arjax data prepare --data FILE --out {path}`")
    if not os.path.isfile(where):
        raise ValueError(
            f"{path!r} is a directory but not a prepared dataset (no {MANIFEST}); prepare it with "
            f"`arjax data prepare --data {path} --out DIR`, or pass a text file"
        )
    try:
        with open(where, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e}); the prepared dataset is damaged: {_FIX}") from None

    def bad(what: str):
        return ValueError(f"{where} is malformed ({what}); the prepared dataset is damaged: {_FIX}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise ValueError(
            f"{where} has format version {manifest.get('version')!r}; this arjax reads version {VERSION}: "
            "upgrade arjax, or prepare the data again with this one"
        )

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    tok, split, shards = manifest.get("tokenizer"), manifest.get("split"), manifest.get("shards")
    if not (isinstance(tok, dict) and tok.get("kind") in KINDS and isinstance(tok.get("sha256"), str)):
        raise bad("tokenizer")
    if (
        manifest.get("dtype") not in ("uint16", "uint32")
        or not is_int(manifest.get("vocab_size"))
        or not is_int(manifest.get("tokens"))
    ):
        raise bad("dtype, vocab_size or tokens")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("file"), str)
        and os.path.basename(s["file"]) == s["file"]
        and is_int(s.get("tokens"))
        and isinstance(s.get("sha256"), str)
        for s in shards
    ):
        raise bad("shards")
    n = manifest["tokens"]
    if sum(s["tokens"] for s in shards) != n:
        raise bad(f"the shards hold {sum(s['tokens'] for s in shards)} tokens, not {n}")
    if not (
        isinstance(split, dict)
        and all(
            isinstance(split.get(k), list) and len(split[k]) == 2 and all(map(is_int, split[k]))
            for k in ("train", "val")
        )
        and split["train"][0] == 0
        and split["train"][1] == split["val"][0]
        and split["val"][1] == n
        and 0 < split["train"][1] < n
    ):
        raise bad("split")
    return manifest


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def open_prepared(path: str, *, verify: bool = False) -> Prepared:
    """A prepared dataset, checked: the manifest, every shard's size (``verify``: and its SHA-256),
    no stray shard, and the tokenizer's files against the manifest."""
    from arjax.train import checkpoint as ckpt
    from arjax.train.tokenizer import load_tokenizer

    manifest = _read_manifest(path)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    listed = {s["file"] for s in manifest["shards"]}
    for s in manifest["shards"]:
        file = os.path.join(path, s["file"])
        if not os.path.isfile(file):
            raise ValueError(f"shard {file} is missing; the prepared dataset is incomplete: {_FIX}")
        size, want = os.path.getsize(file), s["tokens"] * itemsize
        if size != want:
            raise ValueError(
                f"shard {file} has {size} bytes, not the {want} ({s['tokens']} tokens of "
                f"{manifest['dtype']}) "
                f"its manifest records: it is truncated or was replaced; {_FIX}"
            )
        if verify and _sha256_file(file) != s["sha256"]:
            raise ValueError(f"shard {file} does not match the SHA-256 in its manifest: its bytes changed; {_FIX}")
    extra = sorted(
        n for n in os.listdir(path) if n.startswith(SHARD_PREFIX) and n.endswith(SHARD_SUFFIX) and n not in listed
    )
    if extra:
        raise ValueError(
            f"{os.path.join(path, extra[0])} is a shard the manifest does not list (from another prepare?); {_FIX}"
        )
    tok_dir = ckpt.tokenizer_dir(path)
    if not os.path.isdir(tok_dir):
        raise ValueError(f"the prepared dataset {path!r} has no tokenizer/ directory; {_FIX}")
    if ckpt.tokenizer_digest(path) != manifest["tokenizer"]["sha256"]:
        raise ValueError(
            f"the tokenizer in {tok_dir} is not the one the shards were made with (its files changed); "
            f"restore it from a copy, or {_FIX}"
        )
    tokenizer = load_tokenizer(tok_dir)
    kind, vocab = manifest["tokenizer"]["kind"], manifest["vocab_size"]
    if getattr(tokenizer, "kind", None) != kind or tokenizer.vocab_size != vocab:
        raise ValueError(
            f"the tokenizer in {tok_dir} is not the {manifest['tokenizer']['kind']} tokenizer of "
            f"{manifest['vocab_size']} tokens the manifest records; {_FIX}"
        )
    paths = [os.path.join(path, s["file"]) for s in manifest["shards"]]
    counts = [s["tokens"] for s in manifest["shards"]]
    (a, b), (c, d) = manifest["split"]["train"], manifest["split"]["val"]
    return Prepared(
        path=path,
        manifest=manifest,
        tokenizer=tokenizer,
        train=TokenArray(paths, counts, manifest["dtype"], a, b),
        val=TokenArray(paths, counts, manifest["dtype"], c, d),
        digest=manifest_digest(manifest),
    )


def check_run_config(prepared: Prepared, cfg) -> None:
    """A run config that trains on ``prepared`` must agree with it: its tokenizer and split were fixed when made."""
    from arjax.train import checkpoint as ckpt
    from arjax.train.tokenizer import build_tokenizer

    kind = prepared.manifest["tokenizer"]["kind"]
    if cfg.tokenizer != kind:
        raise ValueError(
            f"data: {prepared.path!r} was prepared with the {kind} tokenizer but the run config says "
            f"tokenizer: {cfg.tokenizer}; set tokenizer: {kind}, or prepare the data with "
            f"--tokenizer {cfg.tokenizer}"
        )
    want = prepared.manifest["split"]["val_fraction"]
    if cfg.val_fraction != want:
        raise ValueError(
            f"data: {prepared.path!r} was prepared with val_fraction {want} but the run config says "
            f"{cfg.val_fraction}; set val_fraction: {want}, or prepare the data with "
            f"--val-fraction {cfg.val_fraction}"
        )
    if cfg.tokenizer_path:
        with tempfile.TemporaryDirectory() as tmp:  # the same files, saved the same way, or another tokenizer
            build_tokenizer("hf", path=cfg.tokenizer_path).save(ckpt.tokenizer_dir(tmp))
            same = ckpt.tokenizer_digest(tmp) == prepared.manifest["tokenizer"]["sha256"]
        if not same:
            raise ValueError(
                f"tokenizer_path {cfg.tokenizer_path!r} is not the tokenizer {prepared.path!r} was "
                "prepared with; "
                "drop tokenizer_path (a prepared dataset carries its tokenizer)"
            )
