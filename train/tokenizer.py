"""Byte- and character-level tokenizers sharing one interface, and `load_tokenizer(dir)` for every kind."""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

# The file our tokenizers write; a directory holding a Hugging Face tokenizer.json without this
# file is treated as kind "hf".
META_FILE = "arjax_tokenizer.json"


class Tokenizer(Protocol):
    """What the trainer, the CLI and the decoder rely on (docs/design.md)."""

    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str) -> None: ...


def _write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, META_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(directory, META_FILE))  # atomic: a reader never sees half a file


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to fit, every string encodable."""

    kind = "byte"
    vocab_size = 256
    eos_id = None
    bos_id = None
    pad_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A sampled byte sequence need not be valid UTF-8; show U+FFFD rather than fail.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size})


class CharTokenizer:
    """One token per character of the training text (nanoGPT's shakespeare_char): ids follow sorted order."""

    kind = "char"
    eos_id = None
    bos_id = None
    pad_id = None

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars or any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer needs a non-empty list of distinct single characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text; check the --data file")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in this character-level vocabulary of {self.vocab_size} "
                "characters (it never occurs in the training text); remove it or use the byte tokenizer"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] if 0 <= int(i) < len(self.chars) else "\ufffd" for i in ids)

    def save(self, directory: str) -> None:
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size, "chars": "".join(self.chars)})


KINDS = ("byte", "char", "hf")


def build_tokenizer(kind: str, text: str | None = None, path: str | None = None):
    """A fresh tokenizer for training: "byte" needs nothing, "char" is fit on ``text``, "hf" loads ``path``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if text is None:
            raise ValueError("the char tokenizer is built from the training text; pass text=")
        return CharTokenizer.fit(text)
    if kind == "hf":
        if not path:
            raise ValueError("tokenizer kind 'hf' needs a directory with tokenizer.json; set tokenizer_path")
        return _load_hf(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")


def _load_hf(directory: str):
    try:
        from arjax.train import hf_tokenizer
    except ImportError as e:
        raise ValueError(
            f"{directory} holds a Hugging Face tokenizer but arjax.train.hf_tokenizer is unavailable ({e}); "
            "install the extra with `pip install arjax[hf]`"
        ) from None
    return hf_tokenizer.load(directory)


def load_tokenizer(directory: str):
    """Read back whatever a tokenizer's ``save(directory)`` wrote (kinds: byte, char, hf)."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        if os.path.exists(os.path.join(directory, "tokenizer.json")):
            return _load_hf(directory)
        raise ValueError(f"no tokenizer in {directory!r}: expected {META_FILE} (ours) or tokenizer.json (Hugging Face)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(meta["chars"]))
    if kind == "hf":
        return _load_hf(directory)
    raise ValueError(f"{meta_path} has unknown tokenizer kind {kind!r}; expected one of {KINDS}")
