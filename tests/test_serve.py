"""Serving: the continuous-batching engine against solo ``generate``, and the OpenAI-compatible server
driven by the official ``openai`` client (and by raw HTTP for what a client library would not send)."""

import collections
import http.client
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, generate
from arjax.decode.engine import Engine, Request
from arjax.decode.loop import TRACE_COUNTS
from arjax.model import Transformer, get_config
from arjax.train.tokenizer import ByteTokenizer, CharTokenizer

openai = pytest.importorskip("openai")
from arjax.decode.server import Server, bind, create_app

# 256 distinct characters, one per token id: decoding is injective, so equal text means equal tokens. The
# newline lets it write the default chat template.
TOK = CharTokenizer([chr(c) for c in range(32, 127)] + ["\n"] + [chr(c) for c in range(0x100, 0x100 + 160)])


_COMPILES = collections.Counter()  # XLA compilations in this process, whatever asked for them
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _COMPILES.update([name]) if name == "/jax/core/compile/backend_compile_duration" else None
)


def _engine_traces():
    """Traces of the engine's programs, and every XLA compile (a staging copy too)."""
    return {**{k: v for k, v in TRACE_COUNTS.items() if k.startswith("engine_")}, "xla": sum(_COMPILES.values())}


def _solo(model, ids, max_new, *, temperature=0.0, top_k=0, top_p=1.0, seed=0, eos=()):
    sampling = SamplingParams.make(1, temperature=temperature, top_k=top_k, top_p=top_p)
    out = generate(model, [ids], max_new_tokens=max_new, sampling=sampling, seed=seed, eos_ids=eos)
    return [int(t) for t in out.tokens[0, : out.lengths[0]]], str(out.stop_reason[0])


@pytest.fixture(scope="module")
def model():
    return Transformer(get_config("tiny"), rngs=nnx.Rngs(0))  # vocabulary 256, 64 positions, float32


@pytest.fixture(scope="module")
def served(model):
    engine = Engine(model, slots=8, chunk_steps=4, tokenizer=TOK, max_queue=64)
    engine.warmup()
    engine.start()
    server = Server(create_app(engine, TOK, "tiny"), bind("127.0.0.1", 0))
    server.start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(engine=engine, server=server, client=client, host=server.sock.getsockname()[:2])
    server.stop()
    engine.stop()


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(TOK.chars[int(i)] for i in rng.integers(0, 256, size=int(k))) for k in rng.integers(1, 40, size=n)]


def test_engine_equals_solo_generate_with_slots_reused_and_nothing_compiled(model):
    """Ten requests of mixed lengths, greedy and seeded sampling, through 3 slots, submitted in waves
    while others decode: each equals a solo ``generate`` of its prompt and seed; after the warm-up no
    prompt length or sampling value compiles anything."""
    engine = Engine(model, slots=3, max_len=64, chunk_steps=3)
    engine.warmup()
    before = _engine_traces()
    rng = np.random.default_rng(1)
    reqs = []
    for i in range(10):
        n = int(rng.integers(1, 31))  # two prompt buckets (16, 32) and one output bucket: few solo programs
        reqs.append(
            Request(
                prompt=[int(t) for t in rng.integers(0, 256, size=n)],
                max_new_tokens=int(rng.integers(1, 17)),
                temperature=[0.0, 0.7, 1.3][i % 3],
                top_k=[0, 5][i % 2],
                top_p=[1.0, 0.9][i % 2],
                seed=100 + i,
                eos_ids=(7,) if i == 4 else (),
            )
        )
    got = {i: [] for i in range(10)}
    reasons = {}

    def collect(i):
        def on_update(u):
            got[i].extend(u.tokens)
            if u.finish_reason:
                reasons[i] = u.finish_reason

        return on_update

    for i in range(4):
        engine.submit(reqs[i], collect(i))
    for _ in range(3):
        engine.step()
    for i in range(4, 10):  # a second wave joins while the first decodes
        engine.submit(reqs[i], collect(i))
        engine.step()
    engine.run_until_done()
    assert _engine_traces() == before
    for i, r in enumerate(reqs):
        tokens, reason = _solo(
            model,
            list(r.prompt),
            r.max_new_tokens,
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            seed=r.seed,
            eos=r.eos_ids,
        )
        assert got[i] == tokens, i
        assert reasons[i] == reason


def test_a_reused_slot_never_sees_its_previous_occupant(model):
    engine = Engine(model, slots=1, max_len=64, chunk_steps=5)
    got = []
    long = Request(prompt=list(range(1, 41)), max_new_tokens=23, temperature=0.0)
    short = Request(prompt=[5, 6, 7], max_new_tokens=6, temperature=0.0)
    engine.submit(long, lambda u: None)
    engine.submit(short, lambda u: got.extend(u.tokens))
    engine.run_until_done()
    assert got == _solo(model, [5, 6, 7], 6)[0]
    # The slot's cache holds the short request's 3 + 6 positions (the last token is never fed) and nothing after.
    pos = np.asarray(engine._slots.cache.pos[0])
    assert list(pos[:8]) == list(range(8)) and (pos[9:] == -1).all()

    # A request cancelled mid-decode and a new one taking its slot in the same round.
    got.clear()
    reasons = []
    handle = engine.submit(long, lambda u: reasons.append(u.finish_reason))
    engine.step()
    handle.cancel()
    engine.submit(short, lambda u: got.extend(u.tokens))
    engine.run_until_done()
    assert reasons[-1] == "cancelled" and got == _solo(model, [5, 6, 7], 6)[0]


def test_openai_client_completion_stream_stop_seed_and_models(served, model):
    client = served.client
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "Hello, world"
    ids = TOK.encode(prompt)
    greedy = TOK.decode(_solo(model, ids, 12)[0])

    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == greedy and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    stop = greedy[4:6]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "never"])
    assert r.choices[0].text == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"

    sampled = [
        client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, seed=s).choices[0].text
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    assert sampled[0] == TOK.decode(_solo(model, ids, 16, temperature=1.0, seed=7)[0])

    r = client.completions.create(
        model="tiny", prompt=[prompt, "ab"], max_tokens=5, temperature=0, logprobs=2, echo=False
    )
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == greedy[:5]
    assert len(r.choices[1].logprobs.token_logprobs) == 5 and all(
        len(t) == 2 for t in r.choices[1].logprobs.top_logprobs
    )


def test_32_requests_at_once_and_staggered_equal_solo_generate(served, model):
    """Greedy requests sent together and staggered, with sampled ones of other settings in flight at
    the same time: every greedy reply is exactly its solo ``generate``; nothing compiles."""
    before = _engine_traces()
    prompts = _prompts(32, seed=3)
    max_tokens = [min(24, 64 - len(p)) for p in prompts]
    sampled = [dict(temperature=0.8 + 0.1 * (i % 4), top_k=i % 7, top_p=1.0 - 0.05 * (i % 3), seed=i) for i in range(8)]

    def greedy(i):
        if i >= 16:
            time.sleep(0.02 * (i - 16))  # staggered: these arrive while the first 16 decode
        r = served.client.completions.create(model="tiny", prompt=prompts[i], max_tokens=max_tokens[i], temperature=0)
        return r.choices[0].text

    def sample(i):  # top_k is our extension: the client sends it in extra_body
        s = sampled[i]
        return (
            served.client.completions.create(
                model="tiny",
                prompt=prompts[i],
                max_tokens=max_tokens[i],
                seed=s["seed"],
                temperature=s["temperature"],
                top_p=s["top_p"],
                extra_body={"top_k": s["top_k"]},
            )
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(40) as pool:
        sampled_texts = list(pool.map(sample, range(8)))
        greedy_texts = list(pool.map(greedy, range(32)))
    assert _engine_traces() == before
    for i, p in enumerate(prompts):
        assert greedy_texts[i] == TOK.decode(_solo(model, TOK.encode(p), max_tokens[i])[0]), i
    for i, s in enumerate(sampled):
        assert sampled_texts[i] == TOK.decode(_solo(model, TOK.encode(prompts[i]), max_tokens[i], **s)[0]), i


def _post(host, body: bytes | str, path="/v1/completions"):
    conn = http.client.HTTPConnection(*host, timeout=30)
    conn.request(
        "POST",
        path,
        body=body if isinstance(body, bytes) else body.encode(),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


BAD = [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature=-1.0 must be a finite number >= 0"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p=0.0 must be in (0, 1]"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens=0 generates nothing"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "max_tokens: Input should be greater than or equal to 0"),
    ({"model": "tiny", "prompt": [5, 300, 7]}, 400, "prompt[1]: token id 300 is outside the model's vocabulary"),
    ({"model": "tiny", "prompt": [[5], [6, -1]]}, 400, "prompt[1][1]: token id -1 is outside"),
    ({"model": "tiny", "prompt": [[5], []]}, 400, "prompt[1] is empty"),
    ({"model": "tiny", "prompt": ["a", 5]}, 400, "prompt must be a string, a non-empty list of strings, a list of"),
    ({"model": "tiny", "prompt": [1.5]}, 400, "prompt must be a string"),
    ({"model": "tiny", "prompt": [True]}, 400, "prompt must be a string"),
    ({"model": "tiny", "prompt": "a", "stream_options": {"include_usage": True}}, 400, "only allowed with stream"),
    (
        {"model": "tiny", "prompt": "a", "stream": True, "stream_options": {"usage": True}},
        400,
        "unknown field 'stream_options.usage'",
    ),
    ({"model": "tiny", "prompt": "a" * 70, "max_tokens": 0, "echo": True}, 400, "takes at most 63"),
    (
        {"model": "tiny", "prompt": "abc", "max_tokens": 100},
        400,
        "exceeds the 64 tokens a slot holds; lower max_tokens to <= 61",
    ),
    ({"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
    ({"model": "tiny", "prompt": "a" * 100_000}, 400, "shorten the prompt to at most 63 tokens"),
    ({"model": "tiny", "prompt": "a", "temprature": 0.5}, 400, "unknown field 'temprature'"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "serves 'tiny'"),
    ({"model": "tiny", "prompt": "a", "stop": ["x"] * 17}, 400, "stop: List should have at most 16 items"),
    ({"model": "tiny", "prompt": []}, 400, "prompt: List should have at least 1 item"),
    ({"model": "tiny", "prompt": ["a", ""]}, 400, "prompt[1] is empty"),
    ([1, 2], 400, "the request body must be a JSON object"),
    ({"model": "tiny", "prompt": "a", "top_k": 300}, 400, "top_k=300"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[m[:24] for _, _, m in BAD])
def test_bad_request_gets_its_status_and_message_then_a_good_one_succeeds(served, body, status, message):
    got, reply = _post(served.host, body if isinstance(body, bytes) else json.dumps(body))
    assert got == status and message in reply["error"]["message"], reply
    ok, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "ok", "max_tokens": 2}))
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2


def test_any_content_type_is_read_as_json_and_errors_have_openais_shape(served):
    conn = http.client.HTTPConnection(*served.host, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # what curl -d sends
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 2
    for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/embeddings", 404)):
        conn.request(method, path)
        resp = conn.getresponse()
        assert (
            resp.status == status
            and "this server has POST /v1/completions" in json.loads(resp.read())["error"]["message"]
        )
    conn.close()


def test_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(served, monkeypatch):
    engine = served.engine
    engine.max_queue = 0  # no waiting beyond the 8 slots
    try:
        got, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "a", "n": 8, "max_tokens": 2}))
        assert got == 200 and len(reply["choices"]) == 8  # an idle server takes as many as it has slots
        got, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "a", "n": 9}))
        assert got == 400 and "lower n" in reply["error"]["message"]  # could never fit
        import arjax.decode.engine as engine_module

        real = engine_module._chunk
        monkeypatch.setattr(engine_module, "_chunk", lambda *a: (time.sleep(0.1), real(*a))[1])  # 1.5 s a request
        busy = [
            engine.submit(Request(prompt=[1], max_new_tokens=60, temperature=0.0), lambda u: None) for _ in range(8)
        ]
        got, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "a"}))
        for h in busy:
            h.cancel()
        monkeypatch.setattr(engine_module, "_chunk", real)
    finally:
        engine.max_queue = 64
    assert got == 429 and "retry later" in reply["error"]["message"]

    conn = http.client.HTTPConnection(*served.host, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 60, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: {")  # decoding has begun
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0 and engine.stats["tokens"] > 0
    ok, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "ok", "max_tokens": 3}))
    assert ok == 200 and reply["choices"][0]["finish_reason"] == "length"

    # A non-streaming client that hangs up while its requests decode (slowed to 0.1 s a chunk, so that
    # they would take 1.5 s): the slots are freed too.
    import arjax.decode.engine as engine_module

    real = engine_module._chunk
    monkeypatch.setattr(engine_module, "_chunk", lambda *a: (time.sleep(0.1), real(*a))[1])
    before = engine.stats["finished"]
    conn = http.client.HTTPConnection(*served.host, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps({"model": "tiny", "prompt": "y", "max_tokens": 60, "n": 8}),
        headers={"Content-Type": "application/json"},
    )
    deadline = time.time() + 10
    while not engine.active and time.time() < deadline:
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0 and engine.stats["finished"] - before < 8  # cancelled, not decoded to the end


def test_a_client_that_hangs_up_mid_body_ends_its_request_quietly(served, caplog, capfd):
    """Part of a body (a Content-Length it never reaches, or an unfinished chunk), then the client hangs
    up: no traceback in the server's log, and the next request is served."""
    capfd.readouterr()
    caplog.clear()
    heads = [b"Content-Length: 1000\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n40\r\n"]
    for head in heads:
        sock = socket.create_connection(served.host, timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: arjax\r\nContent-Type: application/json\r\n"
            + head
            + b'{"model": "tiny", "pro'
        )
        time.sleep(0.2)  # the handler is waiting for the rest of the body
        sock.close()
        time.sleep(0.2)
        ok, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "ok", "max_tokens": 2}))
        assert ok == 200 and reply["usage"]["completion_tokens"] == 2
    logged = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING)
    out, err = capfd.readouterr()
    for text in (logged, err, out):
        assert (
            "Traceback" not in text and "Exception in ASGI application" not in text and "ClientDisconnect" not in text
        ), text


def _model_that_spells(text: str) -> Transformer:
    """A 1-layer model whose greedy output is ``text``'s UTF-8 bytes, whatever the prompt: the blocks add
    nothing, position p's embedding is a one-hot, and the head maps position p to byte p."""
    cfg = get_config("tiny", n_layers=1, d_model=64, tie_embeddings=False, max_len=64)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    target = text.encode()
    m.embed.embedding[...] = jnp.zeros_like(m.embed.embedding[...])
    m.pos_embed.embedding[...] = 10.0 * jnp.eye(64, cfg.d_model)
    for layer in (m.blocks[0].attn.o, m.blocks[0].mlp.down):
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
        layer.bias[...] = jnp.zeros_like(layer.bias[...])
    head = np.zeros((cfg.d_model, 256), np.float32)
    head[np.arange(len(target)), list(target)] = 1.0
    m.lm_head.kernel[...] = jnp.asarray(head)
    return m


def test_multibyte_characters_split_across_tokens_stream_without_replacement_characters():
    text = "né ü — 日本語 ✓ €!"  # 2-, 3-byte characters, each byte a token; chunks of 3 cut through them
    model = _model_that_spells(text)
    n = len(text.encode())
    engine = Engine(model, slots=2, chunk_steps=3, tokenizer=ByteTokenizer())
    engine.start()
    server = Server(create_app(engine, ByteTokenizer(), "spell"), bind("127.0.0.1", 0))
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        pieces = [
            c.choices[0].text
            for c in client.completions.create(model="spell", prompt="a", max_tokens=n, temperature=0, stream=True)
            if c.choices
        ]
    finally:
        server.stop()
        engine.stop()
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it did stream, in pieces


def test_a_failed_round_fails_its_requests_with_500_and_the_server_goes_on(served, monkeypatch, capfd):
    import arjax.decode.engine as engine_module

    real, calls = engine_module._chunk, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(*args)

    monkeypatch.setattr(engine_module, "_chunk", fails_once)
    got, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 3}))
    assert got == 500 and "decoding failed on the server" in reply["error"]["message"]
    assert "a decoding round failed (RuntimeError: device lost)" in capfd.readouterr().err
    ok, reply = _post(served.host, json.dumps({"model": "tiny", "prompt": "ok", "max_tokens": 3}))
    assert ok == 200 and reply["usage"]["completion_tokens"] == 3

    # A stream under way when its round fails ends with an error event (no finish_reason): the official
    # client raises it.
    calls.clear()
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 3}
    with pytest.raises(openai.APIError, match="decoding failed on the server"):
        list(served.client.chat.completions.create(**chat, stream=True))
    assert "a decoding round failed" in capfd.readouterr().err
    assert served.client.chat.completions.create(**chat).usage.completion_tokens == 3


def test_engine_with_int8_weights_and_cache_equals_generate(model):
    from arjax.model import quantize

    m, kv = quantize(model, "int8"), "int8"
    engine = Engine(m, slots=2, max_len=64, chunk_steps=4, kv_cache_dtype=kv)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(0, 256, size=int(n))] for n in (3, 17, 9)]
    got = {i: [] for i in range(3)}
    for i, p in enumerate(prompts):
        engine.submit(Request(prompt=p, max_new_tokens=12, temperature=0.0), lambda u, i=i: got[i].extend(u.tokens))
    engine.run_until_done()
    for i, p in enumerate(prompts):
        assert got[i] == [int(t) for t in generate(m, [p], max_new_tokens=12, kv_cache_dtype=kv).tokens[0]], i


def test_shutting_down_ends_every_stream_properly_and_refuses_new_requests(model, monkeypatch):
    import arjax.decode.engine as engine_module

    engine = Engine(model, slots=2, chunk_steps=2, tokenizer=TOK)
    engine.start()
    server = Server(create_app(engine, TOK, "tiny"), bind("127.0.0.1", 0))
    server.start()
    real = engine_module._chunk
    monkeypatch.setattr(engine_module, "_chunk", lambda *a: (time.sleep(0.05), real(*a))[1])
    try:
        host = server.sock.getsockname()[:2]
        conn = http.client.HTTPConnection(*host, timeout=30)
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 60, "stream": True}),
        )
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: {")
        engine.close()  # what a SIGINT / SIGTERM to `arjax serve` does first
        rest = resp.read().decode()
        # No finish_reason of OpenAI's fits a response cut short: the stream ends with an error event, then [DONE].
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert events[-1] == {
            "error": {
                "message": "the server is shutting down; retry on another",
                "type": "server_error",
                "param": None,
                "code": 503,
            }
        }
        assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"]), rest
        assert rest.endswith("data: [DONE]\n\n") and "cancelled" not in rest
        got, reply = _post(host, json.dumps({"model": "tiny", "prompt": "a"}))
        assert got == 503 and "shutting down" in reply["error"]["message"]
    finally:
        server.stop()
        engine.stop()


# ---------------------------------------------------------------------------- the chat API and OpenAI's details


def _teacher_forced(model, ids: list[int]) -> np.ndarray:
    """log p(token t | tokens before it) for every t >= 1, and the whole [T, V] table: the model's own pass."""
    logits = model(jnp.asarray([ids], jnp.int32))[0][0]  # [T, V]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def test_chat_completion_with_the_official_client_stream_n_stop_seed_and_usage(served, model):
    from arjax.decode.chat import ChatTemplate

    client = served.client
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    prompt = ChatTemplate(TOK).render(messages)
    assert prompt == "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"  # the default template
    ids = TOK.encode(prompt)
    greedy = TOK.decode(_solo(model, ids, 8)[0])
    assert "<|end|>" not in greedy  # (the default template's stop string would cut it)

    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == greedy
    assert r.choices[0].finish_reason == "length" and r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    # max_tokens is max_completion_tokens' deprecated name; both may be sent if equal. Text parts join with
    # newlines; developer is OpenAI's newer name for system.
    alike = [
        dict(messages=messages, max_tokens=8),
        dict(messages=messages, max_tokens=8, max_completion_tokens=8),
        dict(messages=[{"role": "developer", "content": "S"}, messages[1]], max_completion_tokens=8),
        dict(
            messages=[
                messages[0],
                {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]},
            ],
            max_completion_tokens=8,
        ),
    ]
    for i, kwargs in enumerate(alike):
        r = client.chat.completions.create(model="tiny", temperature=0, **kwargs)
        want = greedy if i < 3 else TOK.decode(_solo(model, TOK.encode(prompt.replace("Hi", "H\ni")), 8)[0])
        assert r.choices[0].message.content == want, i

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=8, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length" and last.delta.content is None and last.delta.role is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    # include_usage: every chunk carries usage null, then one more with no choices and the usage.
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_completion_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len(ids) and all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == greedy

    stop = greedy[3:5]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stop=stop)
    assert r.choices[0].message.content == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"

    # n choices, choice i seeded seed + i; the same seed gives the same text, streamed or not.
    sampled = [
        [
            c.message.content
            for c in client.chat.completions.create(
                model="tiny", messages=messages, max_completion_tokens=10, temperature=1.0, seed=s, n=3
            ).choices
        ]
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2] and len(set(sampled[0])) == 3
    for i, text in enumerate(sampled[0]):
        assert text == TOK.decode(_solo(model, ids, 10, temperature=1.0, seed=7 + i)[0]), i
    texts = collections.defaultdict(str)
    for c in client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=10, temperature=1.0, seed=7, n=3, stream=True
    ):
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert [texts[i] for i in range(3)] == sampled[0]


def test_chat_logprobs_in_openais_chat_shape_equal_the_teacher_forced_pass(served, model):
    client = served.client
    messages = [{"role": "user", "content": "Tell me"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    text = r.choices[0].message.content
    assert len(content) == 5 and "".join(e.token for e in content) == text
    ids = TOK.encode("<|user|>\nTell me<|end|>\n<|assistant|>\n") + [TOK.encode(e.token)[0] for e in content]
    table = _teacher_forced(model, ids)
    P = len(ids) - 5
    for j, e in enumerate(content):
        assert e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3
        assert e.logprob == pytest.approx(float(table[P + j - 1, ids[P + j]]), abs=1e-4)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy
        best = np.argsort(-table[P + j - 1])[:3]
        assert [TOK.encode(a.token)[0] for a in e.top_logprobs] == [int(b) for b in best]
        assert [a.bytes for a in e.top_logprobs] == [list(a.token.encode()) for a in e.top_logprobs]

    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=5, logprobs=True, seed=1)
    assert len(r.choices[0].logprobs.content) == 5 and all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    streamed = [
        e
        for c in client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=5, logprobs=True, seed=1, stream=True
        )
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in r.choices[0].logprobs.content]


def test_completions_take_token_ids_echo_with_the_prompts_logprobs_and_include_usage(served, model):
    client = served.client
    text = "Hello, world"
    ids = TOK.encode(text)
    greedy = TOK.decode(_solo(model, ids, 6)[0])
    for prompt in (ids, [ids, TOK.encode("ab")]):  # one prompt of token ids, several
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == greedy and r.usage.prompt_tokens == sum(len(p) for p in r_prompts(prompt))
    assert len(r.choices) == 2

    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == text + greedy

    # echo + logprobs: the prompt's tokens too, the first one's logprob and alternatives null (as OpenAI's
    # completions were), every value the model's own teacher-forced log-probability.
    r = client.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text + greedy and "".join(lp.tokens) == text + greedy
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(len(ids) + 6))  # one character per token here
    full = ids + TOK.encode(greedy)
    table = _teacher_forced(model, full)
    for t in range(1, len(full)):
        assert lp.token_logprobs[t] == pytest.approx(float(table[t - 1, full[t]]), abs=1e-4), t
        best = [TOK.decode([int(b)]) for b in np.argsort(-table[t - 1])[:2]]
        assert list(lp.top_logprobs[t]) == best, t

    # max_tokens=0 with echo: scoring only (what evaluation harnesses send), nothing generated.
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length" and lp.top_logprobs is None
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx([float(table[t - 1, full[t]]) for t in range(1, len(ids))], abs=1e-4)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)

    # Streamed: the echo arrives with the prompt's log-probabilities; include_usage adds the usage chunk.
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=text,
            max_tokens=6,
            temperature=0,
            echo=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        len(ids),
        6,
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text + greedy
    streamed = [x for c in chunks[:-1] if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(
        [float(table[t - 1, full[t]]) for t in range(1, len(full))], abs=1e-4
    )


def r_prompts(prompt):
    return [prompt] if isinstance(prompt[0], int) else prompt


BAD_CHAT = [
    ({"messages": []}, "messages must be a non-empty list", "messages"),
    ({"messages": "hi"}, "messages must be a non-empty list", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role 'tool' is not supported", "messages"),
    (
        {"messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role must be one of system, developer",
        "messages",
    ),
    ({"messages": [{"role": "user"}]}, "messages[0].content must be a string or a list of text parts", "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]: parts of type 'image_url' are not supported",
        "messages",
    ),
    (
        {"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "café"}]},
        "messages[1].content: character 'é' is not in this character-level vocabulary",
        "messages",
    ),
    (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
        "messages[0].tool_calls: tool calls are not supported",
        "messages",
    ),
    ({"messages": [{"role": "user", "content": "a", "weight": 1}]}, "messages[0]: unknown field 'weight'", "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported by this server", "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format is not supported", "response_format"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs=true", "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 6}, "top_logprobs: Input should be less than or equal to 5", "top_logprobs"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens=4 and max_completion_tokens=5 disagree", "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens: Input should be greater than or equal to 1", None),
    ({"max_completion_tokens": 60}, "lower max_completion_tokens to <=", "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "a" * 60}]}, "shorten the messages", "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream=true", None),
    ({"temperature": -1}, "temperature=-1.0 must be a finite number >= 0", "temperature"),
    ({"best_of": 2}, "unknown field 'best_of'; /v1/chat/completions takes model, messages", "best_of"),
    ({"model": "gpt-4"}, "serves 'tiny'", "model"),
]


@pytest.mark.parametrize("fields, message, param", BAD_CHAT, ids=[m[:24] for _, m, _ in BAD_CHAT])
def test_bad_chat_request_is_a_400_naming_the_field(served, fields, message, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    got, reply = _post(served.host, json.dumps(body), "/v1/chat/completions")
    assert got == (404 if "model" in fields else 400) and message in reply["error"]["message"], reply
    assert reply["error"]["param"] == (param or reply["error"]["param"]) and "\n" not in reply["error"]["message"]
    ok, reply = _post(
        served.host,
        json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        "/v1/chat/completions",
    )
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2


def _load_readme_helper():
    """tests/_readme.py (the README's blocks), as the README tests load it."""
    import importlib.util
    import pathlib
    import sys

    if "_readme" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_readme", pathlib.Path(__file__).with_name("_readme.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_readme"] = module
        spec.loader.exec_module(module)
    return sys.modules["_readme"]


def test_readme_streaming_chat_example_runs_as_written(served):
    """The README's chat block, against this module's engine served under the README's model name."""
    readme = _load_readme_helper()
    server = Server(create_app(served.engine, TOK, "demo"), bind("127.0.0.1", 0))
    server.start()
    try:
        printed = readme.run_chat_block(server.url)
    finally:
        server.stop()
    assert printed and "None" not in printed


def test_a_tokenizers_own_chat_template_is_used_and_adds_no_stop_string(served, model):
    """A template of the tokenizer's own (ChatML here) writes the prompt; the default's <|end|> is no stop."""
    from arjax.decode.chat import ChatTemplate

    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    app = create_app(served.engine, TOK, "tiny")
    app.state.chat = ChatTemplate(TOK, chatml)
    assert app.state.chat.stops == ()
    server = Server(app, bind("127.0.0.1", 0))
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
        )
    finally:
        server.stop()
    ids = TOK.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == TOK.decode(_solo(model, ids, 6)[0])
