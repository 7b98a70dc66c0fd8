"""Tokenizers behind one interface: bytes, characters, and Hugging Face `tokenizers` (load a local
directory or train a byte-level BPE); `load_tokenizer(dir)` reads every kind."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from arjax.model.memory import Need, check_needs
from arjax.train.data import read_text

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

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (a byte of a split character too: OpenAI's logprobs ``bytes``)."""
        return bytes([int(token_id)]) if 0 <= int(token_id) < 256 else b""

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
    def fit(cls, text: str) -> CharTokenizer:
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

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode("utf-8")

    def save(self, directory: str) -> None:
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size, "chars": "".join(self.chars)})


KINDS = ("byte", "char", "hf")


def check_fits(tokenizer, model_vocab_size: int, *, covers: bool = False, fix: str | None = None) -> None:
    """The one vocabulary check: a tokenizer may not produce ids the model has no embedding for.

    ``covers``: the tokenizer must also be the model's own, i.e. cover its vocabulary up to the
    padding checkpoints add for speed (GPT-2's 50257 ids in a 50304-row table); a byte tokenizer
    next to a 50257-token model would decode every id as the wrong text.
    """
    n = tokenizer.vocab_size
    if n > model_vocab_size:
        fix = fix or f"use the tokenizer the model was trained with, or a model with vocab_size >= {n}"
        raise ValueError(
            f"the tokenizer has {n} tokens but the model's vocab_size is {model_vocab_size}; "
            f"ids past the embedding table would be silently clamped. Fix: {fix}"
        )
    padding = 128 + model_vocab_size // 256  # Qwen2 pads 151643 ids to 151936; GPT-2 variants to 50304
    if covers and n < model_vocab_size - padding:
        raise ValueError(
            f"the tokenizer has {n} tokens but the model's vocabulary has {model_vocab_size}: it is not the model's "
            f"tokenizer ({getattr(tokenizer, 'kind', type(tokenizer).__name__)}), "
            "and its ids would decode as the wrong "
            "text. Use the tokenizer the model was trained with"
        )


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
        return load_hf_tokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")


def load_tokenizer(directory: str):
    """Read back whatever a tokenizer's ``save(directory)`` wrote (kinds: byte, char, hf)."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        if os.path.exists(os.path.join(directory, "tokenizer.json")):
            return load_hf_tokenizer(directory)
        raise ValueError(f"no tokenizer in {directory!r}: expected {META_FILE} (ours) or tokenizer.json (Hugging Face)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{meta_path} is not a valid tokenizer file ({e}); restore the run's tokenizer/ from a copy"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{meta_path} holds a {type(meta).__name__}, not a tokenizer description; restore it from a copy"
        )
    kind = meta.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"{meta_path} describes a char tokenizer without its characters; restore it from a copy")
        return CharTokenizer(list(chars))
    if kind == "hf":
        return load_hf_tokenizer(directory)
    raise ValueError(f"{meta_path} has unknown tokenizer kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------- Hugging Face (the "hf" extra)

EOS_TOKEN = "<|endoftext|>"  # the one special token our trained BPE gets (GPT-2's convention)
_SPECIAL_FIELDS = ("eos_token", "bos_token", "pad_token")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the special-token ids transformers would give it."""

    kind = "hf"

    def __init__(
        self,
        tokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        add_special_tokens: bool = True,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.special_tokens = {"eos_token": eos_token, "bos_token": bos_token, "pad_token": pad_token}
        # Whether encode() runs the post-processor (e.g. Llama's BOS), as transformers' tokenizer(text) does.
        self.add_special_tokens = add_special_tokens
        # The Jinja template that writes a conversation as this model's prompt (arjax.decode.chat renders it).
        self.chat_template = chat_template
        self._added: set[int] | None = None  # ids of added tokens (specials), read on first use
        for field, token in self.special_tokens.items():
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{field}={token!r} is not in this tokenizer's vocabulary; fix tokenizer_config.json")

    def _id(self, field: str) -> int | None:
        token = self.special_tokens[field]
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def pad_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes: exact for byte-level BPE (GPT-2, Llama 3, Qwen, ours) and byte-fallback
        pieces (``<0x0A>``), where one token may hold part of a character; else the token decoded alone."""
        if self._added is None:
            self._added = set(self.tokenizer.get_added_tokens_decoder())
        piece = self.tokenizer.id_to_token(int(token_id))
        if piece is not None and int(token_id) not in self._added:
            if type(self.tokenizer.decoder).__name__ == "ByteLevel" and all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
        return self.decode([token_id]).encode("utf-8")

    def save(self, directory: str) -> None:
        """tokenizer.json + tokenizer_config.json (what transformers' AutoTokenizer reads) + our kind marker."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(1e30)}
        config.update({k: v for k, v in self.special_tokens.items() if v is not None})
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1, ensure_ascii=False)
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size})


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet (``bytes_to_unicode``), inverted: the character a byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_table()


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_tokens_from_files(directory: str, tokenizer) -> dict[str, str | None]:
    found: dict[str, str | None] = {k: None for k in _SPECIAL_FIELDS}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win, as in transformers
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            for field in _SPECIAL_FIELDS:
                if _token_str(data.get(field)) is not None:
                    found[field] = _token_str(data[field])
    # Fall back to the model's config.json ids (HF model directories keep eos/bos ids there).
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for field in _SPECIAL_FIELDS:
            value = data.get(field + "_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if found[field] is None and isinstance(value, int):
                found[field] = tokenizer.id_to_token(value)
    return found


def _chat_template_from_files(directory: str) -> str | None:
    """The directory's chat template, where transformers finds it: chat_template.jinja (transformers >= 4.43
    writes it there), else ``chat_template`` in tokenizer_config.json (a string, or a list of named
    templates of which the one named "default" is used)."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template in {path} is not a string (a Jinja template); fix or remove it")
    return template


def load_hf_tokenizer(directory: str) -> HFTokenizer:
    """A local HF tokenizer directory: tokenizer.json, or vocab/merges files that transformers can read."""
    from tokenizers import Tokenizer  # the "hf" extra

    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        tokenizer = Tokenizer.from_file(path)
        return HFTokenizer(
            tokenizer,
            **_special_tokens_from_files(directory, tokenizer),
            chat_template=_chat_template_from_files(directory),
        )
    if not os.path.isdir(directory):
        raise ValueError(f"tokenizer directory {directory!r} does not exist")
    try:  # slow-tokenizer files (vocab.json + merges.txt, tokenizer.model): transformers converts them offline
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (transformers raises many types here; the user needs one message)
        raise ValueError(f"no usable tokenizer in {directory!r} (expected tokenizer.json): {e}") from None
    if not hasattr(hf, "backend_tokenizer"):
        raise ValueError(f"the tokenizer in {directory!r} has no fast (tokenizers) backend; save it as tokenizer.json")
    tokens = {f: getattr(hf, f, None) for f in _SPECIAL_FIELDS}
    template = getattr(hf, "chat_template", None)
    return HFTokenizer(
        hf.backend_tokenizer,
        **{k: (str(v) if v is not None else None) for k, v in tokens.items()},
        chat_template=template if isinstance(template, str) else None,
    )


# Bytes the tokenizers BPE trainer reserves per vocabulary entry: a HashMap<String, u32> bucket
# (32 bytes + a control byte) and a Vec<String> slot (24 bytes).
_BPE_BYTES_PER_TOKEN = 57


def train_bpe(data_file: str, vocab_size: int, out_dir: str | None = None) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style: every string encodable) on a text file; save it if ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # the "hf" extra

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: the {len(alphabet)} byte symbols and "
            f"{EOS_TOKEN!r} need {len(alphabet) + 1}; use --vocab-size {len(alphabet) + 1} or more"
        )
    # The trainer reserves its tables for vocab_size entries up front (a hash map of token strings to
    # ids and a list of them): an absurd size aborts the process inside the allocator.
    check_needs(
        [
            Need(
                f"the BPE trainer's tables for vocab_size={vocab_size}",
                vocab_size * _BPE_BYTES_PER_TOKEN,
                "lower --vocab-size (GPT-2 has 50257 tokens)",
                per_device=False,
            )
        ]
    )
    if os.path.isdir(data_file):
        raise ValueError(f"training text {data_file!r} is a directory; pass a UTF-8 text file (--data FILE)")
    if not os.path.isfile(data_file):
        raise ValueError(f"training text {data_file!r} does not exist; pass --data FILE")
    read_text(data_file)  # UTF-8 and not empty, or an error naming the byte offset
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train([data_file], trainer)
    out = HFTokenizer(tokenizer, eos_token=EOS_TOKEN)
    if out_dir:
        out.save(out_dir)
    return out
