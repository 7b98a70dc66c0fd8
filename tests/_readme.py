"""The README's commands and Python blocks, read from README.md, and how tests/test_readme*.py run each one.

Every line of a ```bash block is a command a user may paste, and `RUNS` says how the tests run
each one, keyed by its text in the README (its comment dropped). A command runs as written,
through bash, with the installed `arjax` script, in a scratch folder laid out like a checkout
(tpu_configs/, docs/studies/, ../shared/data/) that holds the files a user would have (doc.txt,
prompts.jsonl, corpus.txt, path/to/gpt2, my.yaml, ...). It is shrunk only by flags appended at the
end (a later flag wins: fewer steps, a smaller model) or, where a test cannot use what is written
(a port, another host's address), by a named substitution that must still match the README. A
README command missing from `RUNS` fails the tests, as does an entry whose command left it.

Each test file runs its share once per module (`run_all`), two processes at a time in the order of
`RUNS` as their inputs allow (`after`), and then checks each command's effect in its own test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"
# The README's recipes read ../shared/data/tinyshakespeare.txt beside the checkout.
SHARED_DATA = REPO.parent / "shared" / "data"
ARJAX = os.path.join(os.path.dirname(sys.executable), "arjax")  # the installed console script
TIMEOUT = 600  # seconds per command; the slowest (an 8-device compile on a busy machine) takes about a minute


# ----------------------------------------------------------------------------- the README


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` that starts a word outside quotes, as bash reads it."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands() -> list[str]:
    """Every command line of every bash block, comment dropped, in README order."""
    return [c for block in blocks("bash") for c in map(strip_comment, block.splitlines()) if c.strip()]


def python_blocks() -> dict[str, str]:
    """The Python blocks by what they show: the server's client (completions, chat), the decoding API, training."""
    found = blocks("python")
    named = {}
    for block in found:
        name = (
            "chat"
            if "chat.completions" in block
            else "client"
            if "OpenAI(" in block
            else "train"
            if "train(cfg" in block
            else "api"
            if "generate(" in block
            else None
        )
        assert name and name not in named, f"a README Python block the tests do not know:\n{block}"
        named[name] = block
    return named


def make_recipe(target: str) -> list[str]:
    """The commands of a Makefile target, continuation lines joined, with `$(VENV)/bin/` and `$(DEMO_DIR)` as a
    user of the README types them."""
    text = MAKEFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    recipe = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)
    assert recipe, f"the Makefile has no {target!r} target"
    lines = [" ".join(line.split()) for line in recipe.group(1).splitlines()]
    return [line.replace("$(VENV)/bin/", "").replace("$(DEMO_DIR)", "runs/demo") for line in lines]


# ----------------------------------------------------------------------------- the scratch checkout


def _text(n_chars: int, start: int = 0) -> str:
    """Real prose and code: Python's bundled documentation (the demo's corpus), a slice of it."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))[start : start + n_chars]


MY_YAML = """\
# A user's own small run config: the tiny preset (4 heads, vocabulary 256: both split over model=4) \
on the bundled corpus.
model: tiny
tokenizer: byte
batch_size: 8
seq_len: 32
steps: 3
warmup_steps: 1
eval_iters: 1
"""


def make_workspace(root: pathlib.Path) -> pathlib.Path:
    """``root/repo``: the checkout's recipes and studies (links), and the files the README's commands name."""
    ws = root / "repo"
    (ws / "docs").mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(SHARED_DATA)  # read only, where the recipes look for it
    (ws / "tpu_configs").symlink_to(REPO / "tpu_configs")
    (ws / "docs" / "studies").symlink_to(REPO / "docs" / "studies")
    # A document with repeats for prompt lookup, short enough to leave the demo's 128 bytes room to generate.
    (ws / "doc.txt").write_text("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n")
    prompts = [{"id": "p1", "prompt": "The "}, {"id": "p2", "prompt": "def "}, {"id": "p3", "prompt": "import "}]
    (ws / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (ws / "corpus.txt").write_text(_text(60_000))
    for d, names in (("corpus", ("a.txt", "b.txt")), ("books", ("one.txt", "two.txt"))):
        (ws / d).mkdir()
        for i, name in enumerate(names):
            (ws / d / name).write_text(_text(8_000, start=20_000 * i))
    (ws / "wiki.jsonl").write_text(
        "".join(json.dumps({"text": _text(1_000, start=100_000 + 3_000 * i)}) + "\n" for i in range(6))
    )
    _hf_dataset_dir(ws / "hf_dataset_dir", [_text(1_500, start=150_000 + 2_000 * i) for i in range(8)])
    (ws / "my.yaml").write_text(MY_YAML)
    (ws / "runs").mkdir()
    (ws / "data").mkdir()
    (ws / "runs" / "big").symlink_to("demo")  # the README's target model is the demo run; runs/small is trained
    # A second machine's checkout, for the second recipe that writes runs/g (a v4-8 instead of a v5e-8).
    (root / "v4-8").mkdir()
    for name in ("tpu_configs", "data"):
        (root / "v4-8" / name).symlink_to(ws / name if name == "data" else REPO / name)
    return ws


def _hf_dataset_dir(path: pathlib.Path, texts: list[str]) -> None:
    """What `datasets.Dataset.save_to_disk` writes: an Arrow IPC stream, state.json and dataset_info.json."""
    import pyarrow as pa

    path.mkdir()
    table = pa.table({"text": texts})
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (path / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"})
    )
    (path / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))


def make_hf_checkpoints(ws: pathlib.Path) -> None:
    """path/to/gpt2 (a tiny random GPT-2) and path/to/hf-dir (a tiny random Llama), each saved by transformers'
    save_pretrained with a byte-level BPE of its vocabulary."""
    import torch
    import transformers

    torch.manual_seed(0)
    vocab = 320
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
        )
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    for model, directory in ((gpt2, ws / "path/to/gpt2"), (llama, ws / "path/to/hf-dir")):
        model.eval().save_pretrained(str(directory))
        _bpe(ws, vocab, directory)


def _bpe(ws: pathlib.Path, vocab: int, directory: pathlib.Path):
    from arjax.train.tokenizer import train_bpe

    (ws / "text-for-bpe.txt").write_text(_text(20_000, start=200_000))
    return train_bpe(str(ws / "text-for-bpe.txt"), vocab, str(directory))


def prepare_gpt2_data(ws: pathlib.Path) -> None:
    """data/openwebtext-gpt2, the GPT-2 recipes' data: `arjax data prepare`'s output with a GPT-2-style BPE."""
    from arjax.train.prepare import prepare

    _bpe(ws, 320, ws / "gpt2-tokenizer")
    (ws / "owt.txt").write_text(_text(30_000, start=250_000))
    prepare(
        [str(ws / "owt.txt")],
        str(ws / "data/openwebtext-gpt2"),
        tokenizer="hf",
        tokenizer_path=str(ws / "gpt2-tokenizer"),
        workers=1,
    )


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Result:
    command: str  # what ran, shrink flags and substitutions included
    cwd: pathlib.Path  # where it ran
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    extra: dict = dataclasses.field(default_factory=dict)  # what a special runner saw (the client's replies, each host)


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # a short name: the test id, and what `after` refers to
    module: str  # the test file that runs it
    command: str  # the README's text (comment dropped), or a setup step's command
    append: str = ""  # flags appended to shrink it (a later flag wins)
    replace: tuple[tuple[str, str], ...] = ()  # (text, substitute) for what a test cannot run as written
    after: tuple[str, ...] = ()  # runs whose outputs it reads (or must not race: a resume after the readers)
    devices: int = 1  # fake CPU devices (--xla_force_host_platform_device_count)
    how: str = (
        "bash"  # bash | serve (in the background, then the client) | hosts (one process per host) | make | python
    )
    check: Callable[[Result, pathlib.Path], None] | None = None  # (result, its cwd): the command's effect
    readme: bool = True  # False: a setup step the README leaves to the user (a draft model, the HF checkpoints)
    where: str = "repo"  # the scratch checkout it runs in (a folder of the test's scratch root)
    func: Callable[[pathlib.Path], None] | None = None  # how="python": a setup function of the workspace

    def shell(self, **subs: str) -> str:
        text = self.command
        for old, new in self.replace:
            assert old in text, f"{old!r} is no longer in the README command {self.command!r}"
            text = text.replace(old, new.format(**subs))
        return f"{text} {self.append}".strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_env(base: dict, devices: int = 1) -> dict:
    env = {**base, "PATH": os.path.dirname(ARJAX) + os.pathsep + base.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _bash(run: Run, cwd: pathlib.Path, env: dict) -> Result:
    cmd = run.shell()
    t0 = time.perf_counter()
    p = subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=command_env(env, run.devices),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )
    return Result(cmd, cwd, p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def _serve(run: Run, cwd: pathlib.Path, env: dict) -> Result:
    """The server in the background; once it is up, the README's client block against it; then SIGINT."""
    cmd = run.shell()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + cmd],
        cwd=cwd,
        env=command_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    out: list[str] = []
    err: list[str] = []

    def read(f, acc):
        for line in f:
            acc.append(line)
            lines.put(line)

    readers = [
        threading.Thread(target=read, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err), daemon=True),
    ]
    for t in readers:
        t.start()
    extra: dict = {}
    try:
        deadline = time.monotonic() + TIMEOUT
        while "url" not in extra and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                m = re.search(r"^arjax serve: .* on (http://\S+) ", lines.get(timeout=1))
                if m:
                    extra["url"] = m.group(1)
        if "url" in extra:
            try:
                extra["client"] = run_client_block(extra["url"])
                extra["chat"] = run_chat_block(extra["url"])
            except Exception:  # noqa: BLE001 (shown by the check, beside the server's own output)
                extra["client_error"] = traceback.format_exc()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for t in readers:
                t.join(timeout=10)
    return Result(cmd, cwd, proc.returncode, "".join(out), "".join(err), time.perf_counter() - t0, extra)


def run_client_block(url: str) -> dict:
    """The README's client block, as written but for the server's address: its reply and what it printed."""
    block = python_blocks()["client"]
    assert "http://127.0.0.1:8000/v1" in block
    printed: list[str] = []
    scope: dict = {"print": lambda *a, **k: printed.append(k.get("sep", " ").join(map(str, a)) + k.get("end", "\n"))}
    exec(compile(block.replace("http://127.0.0.1:8000", url), str(README), "exec"), scope)
    return {"r": scope["r"], "printed": "".join(printed)}


def run_chat_block(url: str) -> str:
    """The README's streaming chat block, as written but for the server's address: what it printed."""
    block = python_blocks()["chat"]
    assert "http://127.0.0.1:8000/v1" in block and "stream=True" in block
    printed: list[str] = []
    scope: dict = {"print": lambda *a, **k: printed.append(k.get("sep", " ").join(map(str, a)) + k.get("end", "\n"))}
    exec(compile(block.replace("http://127.0.0.1:8000", url), str(README), "exec"), scope)
    return "".join(printed)


def _hosts(run: Run, cwd: pathlib.Path, env: dict) -> Result:
    """One process per host, all on this machine: host0 is 127.0.0.1 on a free port, $I each process's id."""
    cmd = run.shell(port=str(free_port()), shared=str(cwd.parent / "shared-fs"))
    n = int(re.search(r"--num-processes (\d+)", cmd).group(1))
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["bash", "-c", cmd],
            cwd=cwd,
            env={**command_env(env), "JAX_PLATFORMS": "cpu", "I": str(i)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    return Result(
        cmd,
        cwd,
        max(codes, key=abs),
        outs[0][0],
        "".join(e for _, e in outs),
        time.perf_counter() - t0,
        {"returncodes": codes, "stdouts": [o for o, _ in outs]},
    )


def _make(run: Run, cwd: pathlib.Path, env: dict) -> Result:
    """`make demo`: its train line is the README's first command (the run "demo", shrunk); the rest of the
    recipe runs here as the Makefile writes it. `make test` is this suite: read, not run from inside it."""
    target = run.command.split()[1]
    recipe = make_recipe(target)
    if target == "test":
        return Result(run.command, cwd, 0, "\n".join(recipe), "", 0.0, {"recipe": recipe})
    train = RUNS_BY_NAME["demo"].command
    if recipe[0] != train:  # then it would train for minutes here: refuse, and say why
        return Result(
            run.command, cwd, -1, "", f"make demo no longer starts with the README's {train!r}: {recipe}", 0.0
        )
    rest = " && ".join(recipe[1:])
    t0 = time.perf_counter()
    p = subprocess.run(
        ["bash", "-c", rest],
        cwd=cwd,
        env=command_env(env),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
    )
    return Result(rest, cwd, p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, {"recipe": recipe})


def _python(run: Run, cwd: pathlib.Path, env: dict) -> Result:
    t0 = time.perf_counter()
    run.func(cwd)
    return Result(run.name, cwd, 0, "", "", time.perf_counter() - t0)


RUNNERS = {"bash": _bash, "serve": _serve, "hosts": _hosts, "make": _make, "python": _python}


def run_all(module: str, root: pathlib.Path, env: dict, parallel: int = 2) -> dict[str, Result]:
    """Every run of ``module`` in the scratch checkouts under ``root``, ``parallel`` at a time, each as soon
    as the runs it reads have finished."""
    pending = [r for r in RUNS if r.module == module]
    names = {r.name for r in pending}
    for r in pending:
        assert set(r.after) <= names, f"{r.name} runs after {set(r.after) - names}, which {module} does not run"
    results: dict[str, Result] = {}
    running: dict = {}

    def start(run: Run) -> Result:
        try:
            return RUNNERS[run.how](run, root / run.where, env)
        except Exception as e:  # noqa: BLE001 (reported by the run's own test, not by the fixture)
            return Result(
                run.command, root / run.where, -1, "", f"the test could not run it: {type(e).__name__}: {e}", 0.0
            )

    with ThreadPoolExecutor(parallel) as pool:
        while pending or running:
            for run in [r for r in pending if set(r.after) <= set(results)][: parallel - len(running)]:
                pending.remove(run)
                running[pool.submit(start, run)] = run.name
            assert running, f"runs waiting on each other: {[r.name for r in pending]}"
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                results[running.pop(future)] = future.result()
    return results


def check(results: dict[str, Result], name: str) -> None:
    """The run ``name`` exited 0 without a traceback, and did what its README line says."""
    run, r = RUNS_BY_NAME[name], results[name]
    shown = f"$ {r.command}\n--- stdout (end):\n{r.stdout[-3000:]}\n--- stderr (end):\n{r.stderr[-3000:]}"
    assert r.returncode == 0, shown
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, shown
    if run.check is not None:
        try:
            run.check(r, r.cwd)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{shown}") from None


# ----------------------------------------------------------------------------- what each command must do


def _trained(step: int, run_dir: str):
    def check(r: Result, ws: pathlib.Path) -> None:
        assert f"trained to step {step}:" in r.stdout
        assert (ws / run_dir / "checkpoints" / str(step)).is_dir()
        assert math.isfinite(float(re.search(r"val loss (\S+),", r.stdout).group(1)))

    return check


def _metrics_steps(ws: pathlib.Path, run_dir: str) -> list[int]:
    with open(ws / run_dir / "metrics.jsonl") as f:
        return [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]


def _resumed(step: int, run_dir: str, mesh: str | None = None):
    def check(r: Result, ws: pathlib.Path) -> None:
        _trained(step, run_dir)(r, ws)
        steps = _metrics_steps(ws, run_dir)
        assert steps == list(range(1, step + 1)), steps  # continued: every step once, in order, as one run's log
        if mesh:
            _says(mesh)(r, ws)

    return check


def _says(text: str, then: Callable | None = None):
    """``text`` is in the output (rich wraps long lines at spaces: compared with whitespace runs as one space)."""

    def check(r: Result, ws: pathlib.Path) -> None:
        assert text in " ".join((r.stdout + r.stderr).split()), f"expected {text!r} in the output"
        if then:
            then(r, ws)

    return check


def _generated(*prompts: str, then: Callable | None = None):
    """The summary names each prompt with at least one new token."""

    def check(r: Result, ws: pathlib.Path) -> None:
        for i, prompt in enumerate(prompts, 1):
            m = re.search(
                rf"^--- \[{i}\] prompt {re.escape(repr(prompt))}: (\d+) new tokens, stopped on (\w+)$", r.stdout, re.M
            )
            assert m and int(m.group(1)) >= 1, f"no output for prompt {i} {prompt!r}"
        assert not re.search(rf"^--- \[{len(prompts) + 1}\]", r.stdout, re.M)
        if then:
            then(r, ws)

    return check


def _solo_text(r: Result) -> str:
    """What a one-prompt `generate` printed after its prompt (the text, up to the summary's rule)."""
    return r.stdout.split("\n\n" + "=" * 72 + "\n")[0]


def _no_newline_after(prompt: str):
    def check(r: Result, ws: pathlib.Path) -> None:
        text = _solo_text(r)
        assert text.startswith(prompt) and "\n" not in text[len(prompt) :], repr(text)  # the row ended at its newline

    return check


def _without(*stops: str):
    def check(r: Result, ws: pathlib.Path) -> None:
        text = _solo_text(r)[len("The ") :]
        assert not any(s in text for s in stops), repr(text)

    return check


def _speculative(r: Result, ws: pathlib.Path) -> None:
    assert re.search(r"^speculative decoding: \d+% of drafts accepted", r.stdout, re.M), "no acceptance report"


def _batch_job(r: Result, ws: pathlib.Path) -> None:
    prompts = [json.loads(line) for line in (ws / "prompts.jsonl").read_text().splitlines()]
    lines = [json.loads(line) for line in (ws / "out.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(p["id"] for p in prompts)  # one line per prompt
    assert all(isinstance(x["text"], str) and x["tokens"] >= 1 for x in lines), lines


def _served(r: Result, ws: pathlib.Path) -> None:
    assert "client_error" not in r.extra, f"the README's client block failed:\n{r.extra.get('client_error')}"
    client = r.extra.get("client")
    assert client, "the server never printed its address"
    reply = client["r"]
    assert reply.model == "demo" and 1 <= reply.usage.completion_tokens <= 64
    assert reply.choices[0].finish_reason in ("length", "stop") and isinstance(reply.choices[0].text, str)
    assert client["printed"], "the streamed completion printed nothing"
    assert r.extra.get("chat") and "None" not in r.extra["chat"], "the streamed chat printed nothing"
    assert "arjax serve: stopped after" in r.stderr and "3 requests" in r.stderr, "SIGINT did not stop it cleanly"


def _evaluated(r: Result, ws: pathlib.Path) -> None:
    m = re.search(r"loss (\S+), perplexity (\S+) over", r.stdout)
    assert m and math.isfinite(float(m.group(1))) and math.isfinite(float(m.group(2)))


def _checkpoints_ok(r: Result, ws: pathlib.Path) -> None:
    assert re.search(r"^step\s+3\s+ok\b", r.stdout, re.M) and "1 of 1 checkpoints intact" in r.stdout


def _tokenizer(r: Result, ws: pathlib.Path) -> None:
    from arjax.train.tokenizer import load_tokenizer

    tok = load_tokenizer(str(ws / "tok"))
    text = "def main():\n    return 0\n"
    assert 257 < tok.vocab_size <= 4096 and tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # merges learned, not bytes alone


def _imported(r: Result, ws: pathlib.Path) -> None:
    from arjax.train.checkpoint import verify

    assert all(c["ok"] for c in verify(str(ws / "runs/gpt2"))) and (ws / "runs/gpt2/tokenizer").is_dir()


def _exported(r: Result, ws: pathlib.Path) -> None:
    from safetensors.numpy import load_file

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (ws / "hf-out").iterdir()}
    assert json.loads((ws / "hf-out/config.json").read_text())["model_type"] == "gpt2"
    back, original = (
        load_file(str(ws / "hf-out/model.safetensors")),
        load_file(str(ws / "path/to/gpt2/model.safetensors")),
    )
    for name, array in original.items():  # the same weights as the GPT-2 that came in
        assert name in back and (back[name] == array).all(), name


def _prepared(out: str, sources: int):
    def check(r: Result, ws: pathlib.Path) -> None:
        m = json.loads((ws / out / "manifest.json").read_text())
        assert len(m["sources"]) == sources and m["tokens"] > 0 and m["shards"], m

    return check


def _studied(r: Result, ws: pathlib.Path) -> None:
    report = (ws / "runs/study/report.md").read_text()
    assert "teacher_forcing" in report and "ss_sample" in report and "ss_sequential_argmax" in report
    assert r.stdout.rstrip().endswith("report: runs/study/report.md")


def _studied_again(r: Result, ws: pathlib.Path) -> None:
    for method in ("teacher_forcing", "ss_sample", "ss_sequential_argmax"):  # read back, not trained again
        assert f"  {method} seed=0: done earlier, read from" in r.stdout, method
    assert "  trained " not in r.stdout
    _studied(r, ws)


def _hosts_trained(r: Result, ws: pathlib.Path) -> None:
    run = ws.parent / "shared-fs" / "run"
    assert r.extra["returncodes"] == [0, 0] and "trained to step 3:" in r.extra["stdouts"][0]
    _says("2 processes")(r, ws)
    assert (run / "checkpoints" / "3").is_dir() and _metrics_steps(ws, str(run)) == [1, 2, 3]


def _demo_recipe(r: Result, ws: pathlib.Path) -> None:
    recipe = r.extra["recipe"]
    assert len(recipe) == 2, recipe  # the README's train command, then this generate
    words = shlex.split(recipe[1])
    _generated(*(words[i + 1] for i, w in enumerate(words) if w == "--prompt"))(r, ws)


def _test_recipe(r: Result, ws: pathlib.Path) -> None:
    assert r.extra["recipe"] == [
        "ruff check .",
        "ruff format --check .",
        "$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile",
    ], r.extra["recipe"]
    # The lint steps are seconds: run them here as the recipe does (the pytest step is this suite).
    ruff = pathlib.Path(sys.executable).parent / "ruff"
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([str(ruff), *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout}{done.stderr}"


# ----------------------------------------------------------------------------- the table

# Shrinking, and why: the demo's 900 steps and the recipes' thousands become 3 (one evaluation batch),
# enough to write and reload a checkpoint; what the run is (preset, data, tokenizer, mesh) stays.
STEPS = "--steps 3 --set eval_iters=1"
# GPT-2 small (124M) does not train in seconds on a CPU: these runs keep the gpt2-small preset and its
# padded 50304 vocabulary, the recipe's mesh, sharding, dtype and prepared hf-tokenized data, and
# shrink the width, depth, batch and window by flags (`--set model.KEY` overrides the preset).
GPT2 = (
    f"{STEPS} --batch-size 8 --accum-steps 1 --seq-len 32 --warmup-steps 1 "
    "--set model.n_layers=1 --set model.d_model=64 --set model.n_heads=4"
)
# The study's grid (3 methods, each decoded greedily and by sampling) stays; each run is 2 steps on
# fewer, shorter sequences, one seed, fewer rollouts. --resume needs the same overrides.
STUDY = (
    "--set train.steps=2 --set seeds=[0] --set data.n_train=64 --set data.n_test=32 "
    "--set eval.n_rollouts=16 --set eval.n_boot=10"
)

DEMO, CLI, MESH = "test_readme.py", "test_readme_cli.py", "test_readme_mesh.py"
# In each module, longer chains come first: the scheduler starts ready runs in this order.
RUNS: list[Run] = [
    # test_readme.py: the demo run, and what reads it.
    Run(
        "demo",
        DEMO,
        "arjax train --config tpu_configs/cpu-demo.yaml --out runs/demo",
        STEPS,
        check=_trained(3, "runs/demo"),
    ),
    # The draft for speculative decoding: the demo recipe with the tiny preset (same byte tokenizer).
    Run(
        "small",
        DEMO,
        "arjax train --config tpu_configs/cpu-demo.yaml --model tiny --out runs/small",
        STEPS,
        readme=False,
        check=_trained(3, "runs/small"),
    ),
    Run(
        "draft-model",
        DEMO,
        "arjax generate --ckpt runs/big --draft-ckpt runs/small --draft-k 4 --temperature 0.8",
        after=("demo", "small"),
        check=_generated("\n", then=_speculative),
    ),
    Run(
        "serve",
        DEMO,
        "arjax serve --ckpt runs/demo --slots 16 --port 8000",
        replace=(("--port 8000", "--port 0"),),
        after=("demo",),
        how="serve",
        check=_served,
    ),
    Run(
        "prompt-lookup",
        DEMO,
        'arjax generate --ckpt runs/demo --prompt "$(cat doc.txt)" --prompt-lookup --temperature 0',
        after=("demo",),
        check=_speculative,
    ),
    Run(
        "batch-file",
        DEMO,
        "arjax generate --ckpt runs/demo --input prompts.jsonl --output out.jsonl",
        after=("demo",),
        check=_batch_job,
    ),
    Run(
        "sample",
        DEMO,
        'arjax generate --ckpt runs/demo --prompt "The " --prompt "def " --temperature 0.8 --top-k 40',
        after=("demo",),
        check=_generated("The ", "def "),
    ),
    Run(
        "greedy-stop",
        DEMO,
        "arjax generate --ckpt runs/demo --prompt \"def \" --stop '\\n' --temperature 0",
        after=("demo",),
        check=_generated("def ", then=_no_newline_after("def ")),
    ),
    Run(
        "int8",
        DEMO,
        'arjax generate --ckpt runs/demo --prompt "The " --quantize int8 --kv-cache-dtype int8',
        after=("demo",),
        check=_generated("The "),
    ),
    Run(
        "stop-strings",
        DEMO,
        'arjax generate --ckpt runs/demo --prompt "The " --stop "\\n\\n" --stop "###"',
        after=("demo",),
        check=_generated("The ", then=_without("\n\n", "###")),
    ),
    Run("eval", DEMO, "arjax eval --ckpt runs/demo", after=("demo",), check=_evaluated),
    Run("checkpoints", DEMO, "arjax checkpoints runs/demo", after=("demo",), check=_checkpoints_ok),
    Run("make-demo", DEMO, "make demo", after=("demo",), how="make", check=_demo_recipe),
    Run("make-test", DEMO, "make test", how="make", check=_test_recipe),
    # Last: it adds checkpoints to runs/demo, which the commands above read.
    Run(
        "resume",
        DEMO,
        "arjax train --config tpu_configs/cpu-demo.yaml --out runs/demo --resume",
        "--steps 5 --set eval_iters=1",
        after=(
            "sample",
            "greedy-stop",
            "int8",
            "stop-strings",
            "draft-model",
            "prompt-lookup",
            "serve",
            "batch-file",
            "eval",
            "checkpoints",
            "make-demo",
        ),
        check=_resumed(5, "runs/demo"),
    ),
    # test_readme_cli.py: the single-device tools.
    Run("study", CLI, "arjax study docs/studies/oracle-tf-vs-ss.yaml --out runs/study", STUDY, check=_studied),
    Run(
        "study-resume",
        CLI,
        "arjax study docs/studies/oracle-tf-vs-ss.yaml --out runs/study --resume",
        STUDY,
        after=("study",),
        check=_studied_again,
    ),
    Run("hf-checkpoints", CLI, "", how="python", func=make_hf_checkpoints, readme=False),
    Run(
        "shakespeare",
        CLI,
        "arjax train --config tpu_configs/shakespeare-char-cpu.yaml --data ../shared/data/tinyshakespeare.txt "
        "--out runs/sc",
        STEPS,
        check=_trained(3, "runs/sc"),
    ),
    Run(
        "shakespeare-ss",
        CLI,
        "arjax train --config tpu_configs/shakespeare-char-cpu-ss.yaml --out runs/sc-ss",
        STEPS,
        check=_says("mixing rate", then=_trained(3, "runs/sc-ss")),
    ),
    Run(
        "prepare-mix",
        CLI,
        "arjax data prepare --data books/ wiki.jsonl --tokenizer byte --out data/mix --workers 8",
        check=_prepared("data/mix", 3),
    ),
    Run(
        "train-mix",
        CLI,
        "arjax train --config tpu_configs/cpu-demo.yaml --data data/mix --out runs/mix",
        STEPS,
        after=("prepare-mix",),
        check=_trained(3, "runs/mix"),
    ),
    Run("verify", CLI, "arjax data verify data/mix", after=("prepare-mix",), check=_says("intact")),
    Run("tokenizer", CLI, "arjax tokenizer train --data corpus.txt --vocab-size 4096 --out tok/", check=_tokenizer),
    Run(
        "prepare-hf",
        CLI,
        "arjax data prepare --data hf_dataset_dir/ --tokenizer hf --tokenizer-path tok/ --out data/hf",
        after=("tokenizer",),
        check=_prepared("data/hf", 1),
    ),
    Run(
        "prepare-corpus", CLI, "arjax data prepare --data corpus/ --out data/corpus", check=_prepared("data/corpus", 2)
    ),
    Run(
        "from-hf",
        CLI,
        "arjax convert --from-hf path/to/gpt2 --out runs/gpt2",
        after=("hf-checkpoints",),
        check=_imported,
    ),
    Run("to-hf", CLI, "arjax convert --to-hf runs/gpt2 --out hf-out/", after=("from-hf",), check=_exported),
    Run(
        "generate-hf",
        CLI,
        'arjax generate --hf path/to/hf-dir --prompt "Hello"',
        after=("hf-checkpoints",),
        check=_generated("Hello"),
    ),
    # test_readme_mesh.py: several devices (fake CPU devices: 8 as on a v5e-8 host, 4 as a v4-8's chips), and
    # several processes.
    Run(
        "dp-tp",
        MESH,
        "arjax train --config my.yaml --mesh data=2,model=4 --out runs/t",
        devices=8,
        check=_says("mesh data=2 x fsdp=1 x model=4", then=_trained(3, "runs/t")),
    ),
    Run(
        "resume-other-mesh",
        MESH,
        "arjax train --config my.yaml --out runs/t --resume --mesh data=-1",
        "--steps 5",
        after=("dp-tp",),
        devices=8,
        check=_resumed(5, "runs/t", mesh="mesh data=8 x fsdp=1 x model=1"),
    ),
    Run(
        "tp-generate",
        MESH,
        'arjax generate --ckpt runs/t --mesh model=4 --prompt "The "',
        after=("resume-other-mesh",),
        devices=8,
        check=_generated("The "),
    ),
    Run("gpt2-data", MESH, "", how="python", func=prepare_gpt2_data, readme=False),
    Run(
        "hosts",
        MESH,
        "arjax train --config my.yaml --out /shared/run --coordinator host0:1234 --num-processes 4 --process-id $I",
        # Two processes of one CPU device each on this machine; the "every host mounts" folder is a scratch one.
        replace=(
            ("host0:1234", "127.0.0.1:{port}"),
            ("/shared/run", "{shared}/run"),
            ("--num-processes 4", "--num-processes 2"),
        ),
        how="hosts",
        check=_hosts_trained,
    ),
    Run(
        "kaggle-v5e-8",
        MESH,
        "arjax train --config tpu_configs/gpt2-small-kaggle-v5e-8.yaml --out runs/g",
        GPT2,
        after=("gpt2-data",),
        devices=8,
        check=_says("mesh data=8 x fsdp=1 x model=1", then=_trained(3, "runs/g")),
    ),
    # Another machine's runs/g: a checkout of its own (the same recipes, the same prepared data).
    Run(
        "v4-8-fsdp",
        MESH,
        "arjax train --config tpu_configs/gpt2-small-v4-8.yaml --mesh fsdp=-1 --out runs/g",
        GPT2,
        where="v4-8",
        after=("gpt2-data",),
        devices=4,
        check=_says("mesh data=1 x fsdp=4 x model=1", then=_trained(3, "runs/g")),
    ),
]
RUNS_BY_NAME = {r.name: r for r in RUNS}
assert len(RUNS_BY_NAME) == len(RUNS)
