"""HF tokenizers: byte-level BPE training, save/load beside a checkpoint, transformers compatibility, vocab checks."""

import json

import pytest

pytest.importorskip("tokenizers")

from arjax.train.data import default_corpus_text
from arjax.train.tokenizer import EOS_TOKEN, HFTokenizer, check_fits, load_hf_tokenizer, load_tokenizer, train_bpe

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcödé ✓ 42\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    # The bundled default corpus: present wherever arjax is installed (no shared/ data needed).
    # A slice: training on it takes well under a second.
    path.write_text(default_corpus_text()[:60_000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bpe(text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_bpe(text_file, 400, str(out)), str(out)


def test_trained_bpe_round_trips_and_compresses(bpe):
    tok, _ = bpe
    assert tok.vocab_size == 400
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte-level: even characters never seen in training survive
    assert max(ids) < tok.vocab_size
    assert len(ids) < len(SAMPLE.encode("utf-8"))  # merges were learned
    assert tok.eos_id == tok.tokenizer.token_to_id(EOS_TOKEN) and tok.bos_id is None
    assert tok.decode(ids + [tok.eos_id]) == SAMPLE  # specials are dropped on decode


def test_saved_tokenizer_reloads_through_the_shared_loader(bpe):
    tok, directory = bpe
    again = load_tokenizer(directory)  # the loader train/ and the CLI use for every kind
    assert isinstance(again, HFTokenizer)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert (again.vocab_size, again.eos_id) == (tok.vocab_size, tok.eos_id)


def test_saved_tokenizer_loads_in_transformers(bpe):
    transformers = pytest.importorskip("transformers")
    tok, directory = bpe
    theirs = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert theirs(SAMPLE)["input_ids"] == tok.encode(SAMPLE)
    assert theirs.eos_token_id == tok.eos_id


def test_hf_directory_special_ids_come_from_its_files(bpe, tmp_path):
    tok, _ = bpe
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    eos = tok.tokenizer.id_to_token(5)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos}, "pad_token": eos}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 7}))
    loaded = load_hf_tokenizer(str(tmp_path))
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id) == (5, 5, 7)


def test_vocab_and_merges_directory_loads_via_transformers(bpe, tmp_path):
    pytest.importorskip("transformers")
    tok, _ = bpe
    tok.tokenizer.model.save(str(tmp_path))  # GPT-2's original layout: vocab.json + merges.txt
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    loaded = load_hf_tokenizer(str(tmp_path))
    assert loaded.encode("hear me speak") == tok.encode("hear me speak")
    assert loaded.eos_id == tok.eos_id


def test_bad_inputs(bpe, tmp_path, text_file):
    tok, _ = bpe
    with pytest.raises(ValueError, match="has 400 tokens but the model's vocab_size is 256"):
        check_fits(tok, 256)
    check_fits(tok, 512)  # a larger embedding table is fine (padded vocabularies)
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*--vocab-size 257"):
        train_bpe(text_file, 100)
    with pytest.raises(ValueError, match="does not exist"):
        train_bpe(str(tmp_path / "missing.txt"), 300)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_hf_tokenizer(str(tmp_path))
