"""One list of sampling fields: every entry point (Python, CLI flags, batch lines, HTTP) takes what
SAMPLING_FIELDS declares and refuses a value outside it with the same line; the CLI's shared helpers."""

import dataclasses
import http.client
import json

import numpy as np
import pytest
from flax import nnx

from arjax.decode.engine import Engine, Request
from arjax.decode.sampling import (
    SAMPLING_FIELDS,
    FieldError,
    SamplingParams,
    SamplingValues,
    check_sampling_field,
    request_sampling,
)
from arjax.model import Transformer, get_config
from arjax.train import checkpoint as ckpt
from arjax.train import cli
from arjax.train.cli import batch
from arjax.train.cli.common import UsageError, out_of_memory
from arjax.train.tokenizer import ByteTokenizer

VOCAB = 256  # the tiny preset's


def _out_of_range(f) -> list:
    """Values just outside a field's bounds (each open or closed end), as the field's type."""
    b, values = f.bounds, []
    if b.lo is not None:
        values.append(b.lo if b.lo_open else b.lo - 1)
    if b.hi is not None:
        values.append(b.hi if b.hi_open else b.hi + 1)
    return [f.kind(v) for v in values]


CASES = [(f, bad) for f in SAMPLING_FIELDS for bad in _out_of_range(f)]
CASES += [(f, VOCAB + 1) for f in SAMPLING_FIELDS if f.vocab_bound]  # beyond the vocabulary: known once the model is


@pytest.fixture(scope="module")
def model():
    return Transformer(get_config("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    """The tiny model saved as a run directory with a byte tokenizer (what `arjax convert` writes)."""
    run = str(tmp_path_factory.mktemp("spec") / "run")
    ByteTokenizer().save(ckpt.tokenizer_dir(run))
    manager = ckpt.make_manager(run)
    meta = {"model_config": model.cfg.to_dict(), "tokenizer": "byte", "tokenizer_sha256": ckpt.tokenizer_digest(run)}
    ckpt.save(manager, 0, params=nnx.state(model, nnx.Param), meta=meta)
    manager.wait_until_finished()
    manager.close()
    return run


@pytest.fixture(scope="module")
def host(model):
    """An HTTP server over an engine that never runs: every request here is refused before it is queued."""
    pytest.importorskip("fastapi")
    from arjax.decode.server import Server, bind, create_app

    engine = Engine(model, slots=1, max_len=16, tokenizer=ByteTokenizer())
    server = Server(create_app(engine, ByteTokenizer(), "tiny"), bind("127.0.0.1", 0))
    server.start()
    yield server.sock.getsockname()[:2]
    server.stop()


def _post(host, body: dict):
    conn = http.client.HTTPConnection(*host, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_every_entry_point_takes_the_fields_of_the_spec_with_its_defaults():
    from arjax.decode.server import CompletionRequest

    names = [f.name for f in SAMPLING_FIELDS]
    assert [f.name for f in dataclasses.fields(SamplingParams)] == names
    defaults = {f.name: f.default for f in SAMPLING_FIELDS}
    assert {f.name: f.default for f in dataclasses.fields(SamplingValues)} == defaults
    params = SamplingParams.make(1)
    request = Request(prompt=[1])
    args = cli.build_parser().parse_args(["generate", "--ckpt", "x"])
    for f in SAMPLING_FIELDS:
        assert np.asarray(getattr(params, f.name)).dtype == f.dtype and getattr(params, f.name)[0] == f.default
        assert getattr(request, f.name) == f.default, f.name  # the engine's Request
        assert getattr(args, f.name) == f.default and type(getattr(args, f.name)) is f.kind  # arjax generate's flags
        assert f.name in batch._LINE_KEYS  # a batch line may set it
        assert CompletionRequest.model_fields[f.http].default == f.default  # the HTTP body
    with pytest.raises(TypeError, match="unknown sampling fields"):
        SamplingParams.make(1, temprature=0.5)


@pytest.mark.parametrize("f, bad", CASES, ids=[f"{f.name}={bad}" for f, bad in CASES])
def test_a_value_outside_the_spec_is_refused_alike_everywhere(f, bad, run_dir, host, tmp_path, capsys):
    """Python, `arjax generate --flag`, a batch line and HTTP: the same one line (a batch of rows names the
    row; the batch job the file and line), and HTTP's 400 names the field as its ``param``."""
    with pytest.raises(FieldError) as e:
        check_sampling_field(f.name, bad, vocab_size=VOCAB)
    expected = str(e.value)
    assert e.value.field == f.name and expected.startswith(f"{f.name}={bad!r} ") and "\n" not in expected
    assert f.describe() in expected or "vocabulary" in expected  # names the allowed range

    with pytest.raises(FieldError) as e:  # Python: a batch of one, and a request
        SamplingParams.make(1, vocab_size=VOCAB, **{f.name: bad})
    assert e.value.field == f.name and str(e.value).replace(" (row 0)", "") == expected
    with pytest.raises(FieldError) as e:
        request_sampling(vocab_size=VOCAB, **{f.name: bad})
    assert str(e.value) == expected

    assert cli.main(["generate", "--ckpt", run_dir, f.flag, str(bad), "--max-new-tokens", "1"]) == 2  # a flag
    assert capsys.readouterr().err == f"arjax generate: error: {expected}\n"

    lines = tmp_path / "in.jsonl"  # a batch line
    lines.write_text(json.dumps({"prompt": "a", f.name: bad}) + "\n")
    argv = ["generate", "--ckpt", run_dir, "--input", str(lines), "--output", str(tmp_path / "out.jsonl")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"arjax generate: error: {lines}:1: {expected}\n"

    status, reply = _post(host, {"model": "tiny", "prompt": "a", "max_tokens": 1, f.http: bad})  # HTTP
    # The vocabulary bound is the engine's check; it names row 0 until Engine.check calls request_sampling.
    message = reply["error"]["message"].replace(" (row 0)", "")
    assert status == 400 and reply["error"]["param"] == f.http and message == expected, reply


def test_a_wrong_type_is_refused_alike_from_python_and_http(host):
    for f in SAMPLING_FIELDS:
        for bad in ("0.5", True, None):
            with pytest.raises(FieldError) as e:
                SamplingParams.make(1, **{f.name: bad})
            status, reply = _post(host, {"model": "tiny", "prompt": "a", f.http: bad})
            assert status == 400 and reply["error"] == {
                "message": str(e.value),
                "type": "invalid_request_error",
                "param": f.http,
                "code": None,
            }


def test_a_settings_file_from_before_a_field_existed_reads_it_as_its_default(tmp_path):
    """A sampling field a batch job's settings file lacks was not there to set: its lines used the default."""
    settings = {
        "weights": "w",
        "quantize": None,
        "kv_cache_dtype": "float32",
        "seed": 0,
        "max_new_tokens": 4,
        "eos": [],
        "stop": [],
        "logprobs": False,
        **{f.name: f.default for f in SAMPLING_FIELDS},
    }
    older = {k: v for k, v in settings.items() if k != SAMPLING_FIELDS[-1].name}
    out = str(tmp_path / "out.jsonl")
    batch._write_settings(out, [{"from_line": 1, "settings": older}])
    assert batch._check_settings(out, settings, lines=3, force=False) is None  # the same settings: nothing to add
    last = SAMPLING_FIELDS[-1]
    with pytest.raises(UsageError) as e:
        batch._check_settings(out, {**settings, last.name: last.default + 1}, lines=3, force=False)
    assert f"was written with {last.flag} {last.default}; this run has {last.flag} {last.default + 1}:" in str(e.value)


def test_out_of_memory_is_one_line_and_other_errors_pass():
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")
    with (
        pytest.raises(UsageError) as e,
        out_of_memory("4 slots of 64 tokens", "lower --slots", detail=" (the KV cache alone is 1.00 GiB)"),
    ):
        raise oom
    assert str(e.value) == (
        "4 slots of 64 tokens do not fit in the device's memory (the KV cache alone is 1.00 GiB); lower --slots"
    )
    with pytest.raises(KeyError), out_of_memory("4 slots", "lower --slots"):
        raise KeyError("x")
