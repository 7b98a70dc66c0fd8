"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    """The Python blocks: the server client example, then the API examples (generate, training)."""
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_python_example_runs():
    scope: dict = {}
    exec(compile(_blocks()[1], str(README), "exec"), scope)
    out = scope["out"]
    assert out.tokens.shape == (2, 32) and len(out.lengths) == 2
    assert set(out.stop_reason) <= {"eos", "length"}


def test_readme_training_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes runs/readme-ss relative to the working directory
    blocks = _blocks()
    assert len(blocks) == 3
    scope: dict = {}
    exec(compile(blocks[2], str(README), "exec"), scope)
    result = scope["result"]
    assert result["final_step"] == 20 and result["val_losses"][0][0] == 20
    assert 0 < result["history"]["mix_rate"][-1] < 1 and (tmp_path / "runs/readme-ss/metrics.jsonl").is_file()


def test_readme_server_example_runs(capsys):
    """The client example against a live server (a random tiny model named "demo" on a free port)."""
    import pytest

    pytest.importorskip("openai")
    from flax import nnx

    from arjax.decode.engine import Engine
    from arjax.decode.server import Server, bind, create_app
    from arjax.model import Transformer, get_config
    from arjax.train.tokenizer import ByteTokenizer

    model = Transformer(get_config("tiny", max_len=256), rngs=nnx.Rngs(0))
    engine = Engine(model, slots=2, max_len=160, tokenizer=ByteTokenizer())
    engine.start()
    server = Server(create_app(engine, ByteTokenizer(), "demo"), bind("127.0.0.1", 0))
    server.start()
    try:
        block = _blocks()[0]
        assert "http://127.0.0.1:8000/v1" in block
        scope: dict = {}
        exec(compile(block.replace("http://127.0.0.1:8000", server.url), str(README), "exec"), scope)
    finally:
        server.stop()
        engine.stop()
    assert scope["r"].usage.completion_tokens <= 64 and scope["r"].choices[0].finish_reason in ("length", "stop")
    assert capsys.readouterr().out
