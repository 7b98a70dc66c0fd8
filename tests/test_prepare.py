"""Prepared datasets (`arjax data prepare`): text, JSONL, parquet and HF Arrow inputs become token
shards whose batches equal the text path's; damage is refused."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from arjax.train import checkpoint as ckpt
from arjax.train import data as data_lib
from arjax.train import prepare as prep
from arjax.train.cli import main
from arjax.train.config import TrainConfig
from arjax.train.evaluate import evaluate_run
from arjax.train.loop import train
from arjax.train.tokenizer import KINDS, ByteTokenizer, CharTokenizer, load_tokenizer

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the "data" extra
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow (pip install 'arjax[data]') is not installed")

_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dög ✓\n" for i in range(300))
_DOCS = [f"document {i}: " + "naïve café " * (i % 7) + "end." for i in range(60)] + [""]  # an empty one, skipped


def _batches(ids, T=32, steps=4):
    w = data_lib.Windows(ids, T)
    return [w.batch(batch_size=6, seed=3, step=s) for s in range(steps)]


def _assert_same_data(prepared, split, T=32):
    """Every batch and eval window of the prepared data equals the text path's."""
    assert len(prepared.train) == len(split.train) and len(prepared.val) == len(split.val)
    np.testing.assert_array_equal(np.asarray(prepared.train), split.train)
    np.testing.assert_array_equal(np.asarray(prepared.val), split.val)
    for a, b in zip(_batches(prepared.train, T), _batches(split.train, T)):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    windows = [data_lib.eval_windows(ids, n_windows=5, seq_len=T) for ids in (prepared.val, split.val)]
    np.testing.assert_array_equal(*windows)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(_TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def byte_prepared(text_file, tmp_path_factory):
    """The text file, byte tokenizer, in 7-token shards and 100-byte units over 2 worker processes."""
    out = str(tmp_path_factory.mktemp("prep") / "byte")
    prep.prepare([text_file], out, tokenizer="byte", shard_tokens=997, chunk_bytes=1000, workers=2)
    return out


def test_kinds_agree_with_the_tokenizer_module():
    assert prep.KINDS == KINDS


def test_a_text_file_gives_the_text_paths_batches_exactly(text_file, byte_prepared):
    p = prep.open_prepared(byte_prepared)
    m = p.manifest
    assert (
        len(m["shards"]) > 10 and m["dtype"] == "uint16" and m["tokens"] == len(_TEXT.encode()) and m["documents"] == 1
    )
    assert m["tokenizer"]["kind"] == "byte" and m["sources"][0]["bytes"] == os.path.getsize(text_file)
    _assert_same_data(p, data_lib.tokenize_and_split(_TEXT, ByteTokenizer(), val_fraction=0.1))
    assert p.train[-3:].tolist() == list(_TEXT.encode()[len(p.train) - 3 : len(p.train)])
    assert p.train[990:1010:3].tolist() == list(_TEXT.encode()[990:1010:3])  # strided, across a shard boundary
    assert p.train[-1] == _TEXT.encode()[len(p.train) - 1] and p.train[5:5].shape == (0,)
    # Shards are plain little-endian files, nanoGPT style.
    first = np.fromfile(os.path.join(byte_prepared, m["shards"][0]["file"]), dtype="<u2")
    assert first.tolist() == list(_TEXT.encode()[:997])


def test_char_tokenizer_and_another_val_fraction(text_file, tmp_path):
    out = str(tmp_path / "char")
    prep.prepare(text_file, out, tokenizer="char", val_fraction=0.25, shard_tokens=512, chunk_bytes=333, workers=1)
    p = prep.open_prepared(out)
    tok = CharTokenizer.fit(_TEXT)
    assert p.tokenizer.chars == tok.chars and "\n\n" not in _TEXT
    _assert_same_data(p, data_lib.tokenize_and_split(_TEXT, tok, val_fraction=0.25))
    # One document cut into many pieces is still one: no separator, so no "\n" in the vocabulary.
    (tmp_path / "line.txt").write_text("abc déf ✓ " * 300, encoding="utf-8")
    m = prep.prepare([str(tmp_path / "line.txt")], str(tmp_path / "line"), tokenizer="char", chunk_bytes=50, workers=1)
    assert m["documents"] == 1 and m["separator"] == []
    assert prep.open_prepared(str(tmp_path / "line")).tokenizer.chars == CharTokenizer.fit("abc déf ✓ ").chars


@needs_pyarrow
def test_documents_from_jsonl_parquet_and_a_hf_dataset_dir(tmp_path):
    """Every format gives the documents joined by "\\n\\n", as the text path tokenizes that text."""
    joined = "\n\n".join(d for d in _DOCS if d)
    split = data_lib.tokenize_and_split(joined, CharTokenizer.fit(joined))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"id": i, "body": d}) + "\n" + ("\n" if i == 3 else "") for i, d in enumerate(_DOCS))
    )
    table = pa.table({"id": list(range(len(_DOCS))), "body": _DOCS})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=16)
    # What datasets.Dataset.save_to_disk writes: Arrow IPC streams + state.json + dataset_info.json.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(names, (table.slice(0, 25), table.slice(25))):
        with pa.OSFile(str(hf_dir / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            for batch in part.to_batches(max_chunksize=7):
                writer.write_batch(batch)
    (hf_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"}))
    (hf_dir / "dataset_info.json").write_text(
        json.dumps({"features": {"id": {"dtype": "int64"}, "body": {"dtype": "string"}}})
    )
    for source in (jsonl, tmp_path / "docs.parquet", hf_dir):
        out = str(tmp_path / f"out-{source.name}")
        m = prep.prepare(
            [str(source)], out, tokenizer="char", text_field="body", shard_tokens=100, chunk_bytes=200, workers=1
        )
        assert m["documents"] == len(_DOCS) - 1, source
        _assert_same_data(prep.open_prepared(out), split, T=16)
    # Several inputs in one prepare: one stream, in the order given.
    out = str(tmp_path / "two")
    m = prep.prepare([str(jsonl), str(hf_dir)], out, tokenizer="byte", text_field="body", workers=1)
    assert [s["format"] for s in m["sources"]] == ["jsonl", "arrow", "arrow"]
    both = (joined + "\n\n" + joined).encode()
    assert np.asarray(prep.open_prepared(out).train).tolist() + np.asarray(
        prep.open_prepared(out).val
    ).tolist() == list(both)


@needs_pyarrow
def test_bad_records_name_the_file_and_line(tmp_path, monkeypatch):
    good = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40))
    for bad, expect in [
        ('{"text": 1}', "'text' is a int, not text"),
        ("not json", "not JSON"),
        ('{"body": "x"}', "no 'text' field (found: body); pass --text-field NAME"),
    ]:
        path = tmp_path / "bad.jsonl"
        path.write_text(good + bad + "\n" + good)
        with pytest.raises(ValueError, match=f"bad.jsonl:41: .*{expect}".replace("(", r"\(").replace(")", r"\)")):
            prep.prepare(
                [str(path)], str(tmp_path / "out"), chunk_bytes=50, workers=1
            )  # many units before the bad line
    raw = _TEXT.encode()[:500] + b"\xff" + _TEXT.encode()
    (tmp_path / "latin.txt").write_bytes(raw)
    with pytest.raises(ValueError, match=r"latin.txt' is not UTF-8 text: byte 500 is 0xff"):
        prep.prepare([str(tmp_path / "latin.txt")], str(tmp_path / "out"), chunk_bytes=64, workers=1)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: body\); pass --text-field NAME"):
        prep.prepare([str(tmp_path / "t.parquet")], str(tmp_path / "out"), workers=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"needs pyarrow: pip install 'arjax\[data\]'"):
        prep.prepare([str(tmp_path / "t.parquet")], str(tmp_path / "out"), workers=1)
    assert not os.path.exists(tmp_path / "out") and not [n for n in os.listdir(tmp_path) if "arjax-tmp" in n]


def _hf_tokenizer(directory, n_words):
    """A word-level HF tokenizer of n_words + 2 tokens with an EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<eos>"}, f)
    return str(directory)


def test_hf_tokenizer_documents_joined_by_eos_and_uint16_or_uint32(tmp_path):
    pytest.importorskip("tokenizers")
    docs = ["w1 w2 w70000 w3", "w65600 w5", "w9"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for n_words, dtype in ((100, "uint16"), (70_000, "uint32")):
        tok_dir = _hf_tokenizer(tmp_path / f"tok{n_words}", n_words)
        out = str(tmp_path / f"out{n_words}")
        m = prep.prepare(
            [str(tmp_path / "d.jsonl")], out, tokenizer="hf", tokenizer_path=tok_dir, workers=1, chunk_bytes=20
        )
        p = prep.open_prepared(out)
        ids = (
            [i + 2 if i < n_words else 0 for i in (1, 2, 70000, 3)]
            + [1]
            + [i + 2 if i < n_words else 0 for i in (65600, 5)]
            + [1, 11]
        )
        assert m["dtype"] == dtype and m["separator"] == [1] and p.tokenizer.vocab_size == n_words + 2
        assert np.asarray(p.train).tolist() + np.asarray(p.val).tolist() == ids
        assert os.path.getsize(os.path.join(out, m["shards"][0]["file"])) == len(ids) * (2 if dtype == "uint16" else 4)
    # A run config may name the prepared directory alone (it carries its tokenizer), or the same tokenizer, not another.
    p = prep.open_prepared(out)
    prep.check_run_config(p, TrainConfig(tokenizer="hf", data=out))
    prep.check_run_config(p, TrainConfig(tokenizer="hf", data=out, tokenizer_path=tok_dir))
    with pytest.raises(ValueError, match="is not the tokenizer .* was prepared with; drop tokenizer_path"):
        prep.check_run_config(p, TrainConfig(tokenizer="hf", data=out, tokenizer_path=str(tmp_path / "tok100")))


def test_damage_is_refused_with_the_fix(byte_prepared, tmp_path):
    def damaged(edit):
        d = str(tmp_path / f"d{len(os.listdir(tmp_path))}")
        shutil.copytree(byte_prepared, d)
        edit(d)
        return d

    m = prep.open_prepared(byte_prepared).manifest

    def shard(d, i=1):
        return os.path.join(d, m["shards"][i]["file"])

    def overwrite_start(path, data, mode="r+b"):
        with open(path, mode) as f:
            f.write(data)

    cases = [
        (
            lambda d: overwrite_start(os.path.join(d, "manifest.json"), b"}"),
            r"manifest.json is not valid JSON .*re-run `arjax data prepare`",
        ),
        (
            lambda d: os.truncate(shard(d), 100),
            r"tokens-00001.bin has 100 bytes, not the 1994 .* truncated .*re-run `arjax data prepare`",
        ),
        (lambda d: os.remove(shard(d)), r"tokens-00001.bin is missing"),
        (
            lambda d: shutil.copy(shard(d), os.path.join(d, "tokens-99999.bin")),
            r"tokens-99999.bin is a shard the manifest does not list",
        ),
        (
            lambda d: CharTokenizer(list("ab")).save(os.path.join(d, "tokenizer")),
            r"tokenizer .* is not the one the shards were made with",
        ),
        (
            lambda d: os.remove(os.path.join(d, "manifest.json")),
            r"not a prepared dataset \(no manifest.json\); prepare it with `arjax data prepare",
        ),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            prep.open_prepared(damaged(edit))
    flipped = damaged(lambda d: overwrite_start(shard(d, 0), b"Z"))
    prep.open_prepared(flipped)  # same size: only verify reads the bytes
    with pytest.raises(ValueError, match=r"tokens-00000.bin does not match the SHA-256 in its manifest"):
        prep.open_prepared(flipped, verify=True)


def test_cli_prepare_checks_paths_and_numbers_and_replaces_out_whole(text_file, tmp_path, capsys):
    out = str(tmp_path / "p")
    assert main(["data", "prepare", "--data", text_file, "--out", out, "--workers", "1", "--shard-tokens", "4096"]) == 0
    assert "train with: arjax train --data" in capsys.readouterr().out
    digest = prep.open_prepared(out).digest
    assert main(["data", "verify", out]) == 0 and digest in capsys.readouterr().out
    for argv, message in [
        (["--data", text_file, "--out", out], "is not empty; pass --overwrite"),
        (
            ["--data", os.path.dirname(text_file), "--out", os.path.join(os.path.dirname(text_file), "x")],
            "lies inside --data",
        ),
        (
            ["--data", text_file, "--out", str(tmp_path / "q"), "--workers", "0"],
            "--workers 0 must be an integer in [1, 1024]",
        ),
        (
            ["--data", text_file, "--out", str(tmp_path / "q"), "--val-fraction", "1"],
            "--val-fraction 1.0 must be a number in (0, 1)",
        ),
        (["--data", text_file, "--out", str(tmp_path / "q"), "--shard-tokens", "0"], "--shard-tokens 0 must be"),
        (["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q")], "does not exist"),
        (["--data", out, "--out", str(tmp_path / "q")], "is a prepared dataset already"),
        (
            ["--data", text_file, "--out", str(tmp_path / "q"), "--tokenizer", "hf"],
            "--tokenizer hf needs --tokenizer-path",
        ),
    ]:
        assert main(["data", "prepare", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # --overwrite replaces the directory whole; a failure midway leaves the old one as it was.
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert main(["data", "prepare", "--data", text_file, str(tmp_path / "bad.jsonl"), "--out", out, "--overwrite"]) == 2
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    assert prep.open_prepared(out, verify=True).digest == digest
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".p.")]
    # --overwrite never replaces a folder that is not a prepared dataset.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    assert main(["data", "prepare", "--data", text_file, "--out", str(precious), "--overwrite"]) == 2
    assert "holds files but no prepared dataset" in capsys.readouterr().err and (precious / "thesis.tex").exists()


def test_training_from_a_prepared_dir(text_file, byte_prepared, tmp_path):
    cfg = TrainConfig(
        model="tiny",
        model_overrides={"n_layers": 1},
        data=byte_prepared,
        batch_size=4,
        seq_len=32,
        steps=2,
        warmup_steps=1,
        eval_interval=2,
        eval_iters=1,
        log_interval=1,
        ckpt_interval=2,
    )
    with pytest.raises(
        ValueError, match="was prepared with the byte tokenizer but the run config says tokenizer: char"
    ):
        train(cfg.replace(tokenizer="char"), str(tmp_path / "r0"), quiet=True)
    with pytest.raises(ValueError, match="was prepared with val_fraction 0.1 but the run config says 0.2"):
        train(cfg.replace(val_fraction=0.2), str(tmp_path / "r0"), quiet=True)
    run = str(tmp_path / "run")
    result = train(cfg, run, quiet=True)
    assert result["final_step"] == 2 and np.isfinite(result["losses"]).all()
    meta = ckpt.read_meta(run)[1]
    assert meta["data_sha256"] == prep.open_prepared(byte_prepared).digest
    assert load_tokenizer(ckpt.tokenizer_dir(run)).vocab_size == 256
    # eval reads the run's prepared validation split: the number the training log reported.
    assert evaluate_run(run)["loss"] == pytest.approx(result["val_losses"][-1][1], rel=1e-5)
    # A resume refuses other prepared data (the same text with another split is other data).
    other = str(tmp_path / "other")
    prep.prepare([text_file], other, val_fraction=0.2, workers=1)
    with pytest.raises(ValueError, match="the prepared data in .* is not the data the run .* was trained on"):
        train(cfg.replace(data=other, val_fraction=0.2, steps=3), run, resume=True, quiet=True)
