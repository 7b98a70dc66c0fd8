"""The engine from the command line: `arjax generate --input/--output` batch jobs (killed and resumed)
and `arjax serve` as a user starts it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from arjax.model import Transformer, get_config
from arjax.train import checkpoint as ckpt
from arjax.train import cli
from arjax.train.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (weights + byte tokenizer) as `arjax convert` writes one: a random tiny model."""
    return _random_run(str(tmp_path_factory.mktemp("jobs") / "run"), seed=0)


def _random_run(run, *, seed):
    """A tiny model with random weights (``seed``) saved as a run directory with a byte tokenizer."""
    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(seed))
    tok = ByteTokenizer()
    tok.save(ckpt.tokenizer_dir(run))
    manager = ckpt.make_manager(run)
    ckpt.save(
        manager,
        0,
        params=nnx.state(model, nnx.Param),
        meta={"model_config": model.cfg.to_dict(), "tokenizer": "byte", "tokenizer_sha256": ckpt.tokenizer_digest(run)},
    )
    manager.wait_until_finished()
    manager.close()
    return run


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_batch_job_killed_midway_and_rerun_equals_an_uninterrupted_run(run_dir, tmp_path, subprocess_env, capsys):
    rng = np.random.default_rng(0)
    words = ["the", "king", "é", "日本", "sea", "a", "\n", "to be"]
    lines = []
    for i in range(1000):
        item = {"id": f"p{i}", "prompt": " ".join(rng.choice(words, size=int(rng.integers(1, 8))))}
        if i % 10 == 3:
            item["temperature"] = 0.0  # per-line overrides
        if i % 10 == 7:
            item["max_new_tokens"] = 3
        lines.append(json.dumps(item, ensure_ascii=False))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = [
        "generate",
        "--ckpt",
        run_dir,
        "--input",
        str(prompts),
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--slots",
        "16",
        "--logprobs",
    ]

    whole = tmp_path / "whole.jsonl"
    assert cli.main([*flags, "--output", str(whole)]) == 0
    assert "1000 prompts done" in capsys.readouterr().err

    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "arjax.train.cli", *flags, "--output", str(out)],
        env=subprocess_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 100:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    kept = _records(out)
    assert 100 <= len(kept) < 1000
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "p999", "prompt": "the ki')  # what a kill in the middle of a write leaves

    assert cli.main([*flags, "--output", str(out)]) == 0
    assert f"({len(kept)} were already in" in capsys.readouterr().err
    resumed, reference = _records(out), {r["id"]: r for r in _records(whole)}
    assert sorted(r["id"] for r in resumed) == sorted(reference) and len(resumed) == 1000
    for r in resumed:
        want = reference[r["id"]]
        assert {k: v for k, v in r.items() if k != "logprobs"} == {k: v for k, v in want.items() if k != "logprobs"}
        np.testing.assert_allclose(r["logprobs"], want["logprobs"], atol=1e-5)
    assert {r["stop_reason"] for r in resumed} == {"length"} and reference["p7"]["tokens"] == 3


def test_batch_job_input_errors_are_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"prompt": "a"}\n{"prompt": "b", "temprature": 1}\n', "bad.jsonl:2 has unknown key 'temprature'"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "repeats id 1 (first on line 1)"),
        ('{"prompt": ""}\n', '"prompt" must be a non-empty string'),
        ("[1, 2]\n", "is a JSON list, not an object"),
        ('{"prompt": "' + "a" * 70 + '"}\n', "bad.jsonl:1: prompt (70 tokens)"),
        ('{"prompt": "a", "top_p": 0}\n', "top_p"),
    ]
    for text, message in cases:
        bad.write_text(text)
        assert (
            cli.main(["generate", "--ckpt", run_dir, "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
        )
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (message, err)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "zz", "prompt": "a", "text": "", "tokens": 0, "stop_reason": "length"}\n')
    bad.write_text('{"prompt": "a"}\n')
    assert cli.main(["generate", "--ckpt", run_dir, "--input", str(bad), "--output", str(other)]) == 2
    assert "holds id 'zz', which --input has not" in capsys.readouterr().err
    # The input edited since the output was written: the old result is not passed off as the new one's.
    other.write_text('{"id": 1, "prompt": "b", "text": "", "tokens": 0, "stop_reason": "length"}\n')
    assert cli.main(["generate", "--ckpt", run_dir, "--input", str(bad), "--output", str(other)]) == 2
    assert "line 1 (id 1) was written for another prompt" in capsys.readouterr().err
    bad.write_text('{"prompt": "a", "stop": null, "max_new_tokens": 2}\n')  # null: no stop strings
    assert cli.main(["generate", "--ckpt", run_dir, "--input", str(bad), "--output", str(tmp_path / "n.jsonl")]) == 0
    capsys.readouterr()


def test_arjax_serve_starts_serves_and_stops(run_dir, subprocess_env):
    openai = pytest.importorskip("openai")
    proc = subprocess.Popen(
        [sys.executable, "-m", "arjax.train.cli", "serve", "--ckpt", run_dir, "--port", "0", "--slots", "4"],
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "4 slots of 64 tokens (KV cache 0.1 MiB), compiled in" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        url = line.split(" on ")[1].split(" ")[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["run"]
        r = client.completions.create(model="run", prompt="To be", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        # A second server on the same port: one line, before loading anything.
        port = url.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "arjax.train.cli", "serve", "--ckpt", run_dir, "--port", port],
            env=subprocess_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"127.0.0.1:{port} is in use; pick another --port" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)  # what a process manager sends
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped after" in err and "1 requests, 5 tokens" in err, err
    assert "Traceback" not in err and os.path.isdir(run_dir)


SIGNAL_AT_READY = """
import os, signal
from flax import nnx
from arjax.decode import server
from arjax.decode.engine import Engine
from arjax.model import Transformer, get_config
from arjax.train.tokenizer import ByteTokenizer

engine = Engine(Transformer(get_config("tiny"), rngs=nnx.Rngs(0)), slots=1, max_len=32, tokenizer=ByteTokenizer())
engine.warmup()

def ready(running):
    print("handled:", signal.getsignal(signal.SIGINT) is not signal.default_int_handler, flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # what a user's Ctrl-C at the ready line does

server.serve(engine, ByteTokenizer(), "m", server.bind("127.0.0.1", 0), on_ready=ready)
print("returned", flush=True)
"""


def test_a_signal_at_the_ready_line_stops_the_server_cleanly(subprocess_env):
    """The ready line comes once uvicorn handles signals, so a SIGINT the moment it appears stops the
    server as any SIGINT does: ``serve`` returns (the CLI then exits 0 with its summary). When the line
    came before uvicorn's handlers, such a signal was a KeyboardInterrupt outside them, and once it left a
    GPT-2-size server running."""
    run = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_READY], env=subprocess_env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.splitlines() == ["handled: True", "returned"], run.stdout + run.stderr


def test_batch_job_rerun_with_other_settings_is_refused_unless_forced(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "the king " * (i + 1)}) + "\n" for i in range(6)))
    flags = [
        "generate",
        "--ckpt",
        run_dir,
        "--input",
        str(prompts),
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.9",
        "--slots",
        "2",
    ]
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    assert cli.main([*flags, "--output", str(whole)]) == 0
    assert cli.main([*flags, "--output", str(out)]) == 0
    settings = json.loads((tmp_path / "out.jsonl.settings.json").read_text())["written_with"]
    assert [w["from_line"] for w in settings] == [1] and settings[0]["settings"]["seed"] == 0
    assert "slots" not in settings[0]["settings"] and "max_len" not in settings[0]["settings"]
    first_two = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(first_two))  # as a kill after two lines leaves it
    capsys.readouterr()

    for extra, was, now in [
        (["--seed", "1"], "--seed 0", "--seed 1"),
        (["--max-new-tokens", "4"], "--max-new-tokens 3", "--max-new-tokens 4"),
        (["--top-p", "0.9"], "--top-p 1.0", "--top-p 0.9"),
        (["--logprobs"], "no --logprobs", "--logprobs"),
    ]:
        assert cli.main([*flags, *extra, "--output", str(out)]) == 2, extra  # a repeated flag: the last one counts
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"was written with {was}; this run has {now}" in err, err
        assert "--force-settings" in err and "new --output" in err
    assert out.read_text() == "".join(first_two)  # nothing was added

    # More slots (and another chunk size) change no result: accepted, and the job ends as an uninterrupted one.
    assert cli.main([*flags, "--slots", "5", "--chunk-steps", "2", "--output", str(out)]) == 0
    assert sorted(_records(out), key=lambda r: r["id"]) == sorted(_records(whole), key=lambda r: r["id"])

    # --force-settings continues with the new settings and records from which line on.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(first_two))
    (tmp_path / "mixed.jsonl.settings.json").write_text((tmp_path / "out.jsonl.settings.json").read_text())
    assert cli.main([*flags, "--seed", "1", "--force-settings", "--output", str(mixed)]) == 0
    written_with = json.loads((tmp_path / "mixed.jsonl.settings.json").read_text())["written_with"]
    assert [(w["from_line"], w["settings"]["seed"], w.get("forced", False)) for w in written_with] == [
        (1, 0, False),
        (3, 1, True),
    ]
    assert len(_records(mixed)) == 6
    capsys.readouterr()
    assert cli.main([*flags, "--seed", "1", "--output", str(mixed)]) == 0  # the latest settings: accepted
    assert cli.main([*flags, "--output", str(mixed)]) == 2
    assert "was written with --seed 1; this run has --seed 0" in capsys.readouterr().err

    # An output with lines and no settings file (an older arjax): refused, or recorded from here on.
    old = tmp_path / "old.jsonl"
    old.write_text("".join(first_two))
    assert cli.main([*flags, "--output", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 lines but no record of the settings" in err and "--force-settings" in err
    assert cli.main([*flags, "--force-settings", "--output", str(old)]) == 0
    written_with = json.loads((tmp_path / "old.jsonl.settings.json").read_text())["written_with"]
    assert [(w["from_line"], w["settings"] is None) for w in written_with] == [(1, True), (3, False)]
    assert sorted(_records(old), key=lambda r: r["id"]) == sorted(_records(whole), key=lambda r: r["id"])

    # The weights are what count, not where they are: a moved run is the same model, another one is not.
    moved = str(tmp_path / "moved")
    shutil.copytree(run_dir, moved)
    assert cli.main([*[moved if a == run_dir else a for a in flags], "--output", str(out)]) == 0
    other = _random_run(str(tmp_path / "other"), seed=1)
    capsys.readouterr()
    assert cli.main([*[other if a == run_dir else a for a in flags], "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was written by a model with other weights" in err and other in err, err


def test_compile_cache_serves_the_next_start_from_disk(run_dir, tmp_path, subprocess_env, capsys):
    """`--compile-cache DIR`: the first start writes its programs there, the next one loads every
    program it needs from there (JAX's own log of cache hits and misses) and prints the same text."""
    cache = tmp_path / "compiled"
    env = {k: v for k, v in subprocess_env.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    argv = [sys.executable, "-m", "arjax.train.cli", "generate", "--ckpt", run_dir, "--prompt", "To be"]
    argv += ["--max-new-tokens", "6", "--temperature", "0", "--compile-cache", str(cache)]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert os.listdir(cache)
    second = subprocess.run(
        argv, env={**env, "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "Persistent compilation cache hit" in second.stderr
    assert "persistent compilation cache miss" not in second.stderr.lower(), second.stderr[-2000:]
    # A file where the directory should be: one line naming it, before anything loads.
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["generate", "--ckpt", run_dir, "--prompt", "x", "--compile-cache", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--compile-cache {str(blocker)!r} cannot be made a directory" in err, err
