"""Tokenizers (byte, char, saved and reloaded) and the data pipeline: default corpus, split, seeded windows."""

import json

import numpy as np
import pytest

from arjax.train import data as data_lib
from arjax.train.tokenizer import META_FILE, ByteTokenizer, CharTokenizer, build_tokenizer, load_tokenizer


def test_byte_tokenizer_round_trip_and_invalid_utf8(tmp_path):
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # invalid UTF-8 is replaced, not raised
    tok.save(str(tmp_path))
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


def test_char_tokenizer_sorted_vocab_save_load_and_unknown_char(tmp_path):
    tok = build_tokenizer("char", text="hello world")
    assert tok.chars == sorted(set("hello world")) and tok.vocab_size == 8
    assert tok.decode(tok.encode("hold")) == "hold"
    with pytest.raises(ValueError, match=r"'z' is not in this character-level vocabulary"):
        tok.encode("zzz")
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_tokenizer(str(tmp_path))
    (tmp_path / META_FILE).write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("sentencepiece")


def test_default_corpus_is_pythons_pydoc_topics():
    text = data_lib.read_text(None)
    assert len(text) > 100_000 and "while" in text  # ~465k characters on CPython 3.11
    assert data_lib.read_text("pydoc") == text


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data_lib.read_text(str(tmp_path / "nope.txt"))


def test_split_is_last_fraction():
    split = data_lib.tokenize_and_split("abcdefghij" * 10, ByteTokenizer(), val_fraction=0.1)
    assert len(split.train) == 90 and len(split.val) == 10
    assert bytes(split.val.tolist()) == b"abcdefghij"


def test_batches_are_a_pure_function_of_seed_and_step():
    ids = np.arange(1000, dtype=np.int32)
    a = data_lib.get_batch(ids, batch_size=4, seq_len=16, seed=3, step=7)
    b = data_lib.get_batch(ids, batch_size=4, seq_len=16, seed=3, step=7)
    assert a.shape == (4, 17)
    np.testing.assert_array_equal(a, b)
    # Windows are contiguous slices of the stream.
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)
    assert not np.array_equal(a, data_lib.get_batch(ids, batch_size=4, seq_len=16, seed=3, step=8))
    assert not np.array_equal(a, data_lib.get_batch(ids, batch_size=4, seq_len=16, seed=4, step=7))
    # Every start is reachable, up to the last full window.
    starts = np.concatenate([data_lib.batch_offsets(40, batch_size=64, seq_len=8, seed=0, step=s) for s in range(20)])
    assert starts.min() == 0 and starts.max() == 40 - 9


def test_eval_windows_fixed_and_short_split_error():
    ids = np.arange(200, dtype=np.int32)
    w = data_lib.eval_windows(ids, n_windows=5, seq_len=10)
    assert w.shape == (5, 11) and w[0, 0] == 0 and w[-1, -1] == 199
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data_lib.eval_windows(ids[:8], n_windows=2, seq_len=10)


def test_load_tokenizer_dispatches_hugging_face_dirs(tmp_path):
    """A bare HF tokenizer.json (no arjax metadata) and an HF tokenizer's own save both load as kind hf."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.kind == "hf" and loaded.vocab_size == 3 and loaded.encode("a b a") == [0, 1, 0]
    loaded.save(str(tmp_path / "again"))
    assert load_tokenizer(str(tmp_path / "again")).encode("b") == [1]
