"""The engine's prefill: prompts batched into one pass, long prompts in pieces between decode chunks,
prompt prefixes reused from the prefix store, prompt log-probabilities, log-probabilities only when
asked. Each against solo ``generate`` (or the teacher-forced pass), on models loaded from disk with and
without biases, with nothing compiled after the warm-up."""

import collections

import jax
import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, generate
from arjax.decode.engine import Engine, Request
from arjax.decode.loop import TRACE_COUNTS
from arjax.model import Transformer, get_config
from arjax.train import checkpoint as ckpt
from arjax.train.load import load_for_decoding
from arjax.train.tokenizer import ByteTokenizer

_COMPILES = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _COMPILES.update([name]) if name == "/jax/core/compile/backend_compile_duration" else None
)


def _compiles():
    return {**{k: v for k, v in TRACE_COUNTS.items() if k.startswith("engine_")}, "xla": sum(_COMPILES.values())}


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "no-bias"])
def model(request, tmp_path_factory):
    """A tiny model written as a run directory and loaded back the way `arjax serve` loads it."""
    path = str(tmp_path_factory.mktemp("run"))
    cfg = get_config("tiny", use_bias=request.param, max_len=128)
    m = Transformer(cfg, rngs=nnx.Rngs(3))
    ByteTokenizer().save(ckpt.tokenizer_dir(path))
    manager = ckpt.make_manager(path)
    ckpt.save(
        manager,
        0,
        params=nnx.state(m, nnx.Param),
        meta={"model_config": cfg.to_dict(), "tokenizer": "byte", "tokenizer_sha256": ckpt.tokenizer_digest(path)},
    )
    manager.wait_until_finished()
    manager.close()
    loaded, _ = load_for_decoding(ckpt=path)
    return loaded


def _solo(model, r: Request):
    sampling = SamplingParams.make(1, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
    out = generate(model, [list(r.prompt)], max_new_tokens=r.max_new_tokens, sampling=sampling, seed=r.seed)
    return [int(t) for t in out.tokens[0, : out.lengths[0]]]


def _run(engine, requests, *, waves=1):
    """Submit ``requests`` in ``waves`` (stepping between them), run to the end; tokens and updates per request."""
    got = {i: [] for i in range(len(requests))}
    updates = {i: [] for i in range(len(requests))}

    def collect(i):
        def on_update(u):
            got[i].extend(u.tokens)
            updates[i].append(u)

        return on_update

    per = -(-len(requests) // waves)
    for w in range(waves):
        for i in range(w * per, min(len(requests), (w + 1) * per)):
            engine.submit(requests[i], collect(i))
        engine.step()
    engine.run_until_done()
    return got, updates


def test_batched_and_chunked_prefill_equal_solo_generate_and_compile_nothing_after_warmup(model):
    """Prompts from 1 to 100 tokens through pieces of 16 and rounds of at most 48 prefill tokens, greedy
    and seeded sampling, arriving together and in waves: every request equals its solo ``generate``."""
    engine = Engine(model, slots=4, max_len=128, chunk_steps=3, prefill_chunk=16, prefill_tokens=48)
    engine.warmup()
    before = _compiles()
    rng = np.random.default_rng(0)
    lengths = [1, 100, 17, 40, 5, 64, 33, 90, 2, 16]
    reqs = [
        Request(
            prompt=[int(t) for t in rng.integers(0, 256, size=n)],
            max_new_tokens=int(rng.integers(1, 12)),
            temperature=[0.0, 0.8][i % 2],
            top_k=[0, 7][i % 2],
            seed=50 + i,
        )
        for i, n in enumerate(lengths)
    ]
    got, updates = _run(engine, reqs, waves=3)
    assert _compiles() == before
    for i, r in enumerate(reqs):
        assert got[i] == _solo(model, r), (i, len(r.prompt))
        assert updates[i][-1].finish_reason in ("length", "eos")
    # a long prompt really went in pieces: 100 tokens at 16 a piece is 7 pieces, interleaved with decoding
    assert engine.stats["prefill_tokens"] >= sum(lengths)


def test_a_round_prefills_several_prompts_in_one_pass():
    """Requests arriving together are prefilled by one call of the (width, rows) program, not one each."""
    m = Transformer(get_config("tiny"), rngs=nnx.Rngs(0))
    engine = Engine(m, slots=8, max_len=64, chunk_steps=2)
    engine.warmup()
    calls = []
    real = engine._run_prefill
    engine._run_prefill = lambda pieces, P, R, warm=False: (calls.append((len(pieces), P, R)), real(pieces, P, R))
    for i in range(6):
        engine.submit(Request(prompt=[1 + i] * (10 + i), max_new_tokens=2), lambda u: None)
    engine.step()
    assert calls == [(6, 16, 8)]
    engine.run_until_done()
    # Mixed widths: the widest call's spare row (3 prompts of 64 in a 4-row program) takes a narrower
    # prompt, which costs nothing there; its output is still solo generate's.
    calls.clear()
    lengths = (40, 33, 50, 20, 30, 9, 5)  # widths 64, 64, 64, 32, 32, 16, 16
    reqs = [Request(prompt=[int(t) for t in range(3 + i, 3 + i + n)], max_new_tokens=3) for i, n in enumerate(lengths)]
    got = {}
    for i, r in enumerate(reqs):
        engine.submit(r, lambda u, i=i: got.setdefault(i, []).extend(u.tokens))
    engine.run_until_done()
    assert calls == [(4, 64, 4), (1, 32, 1), (2, 16, 2)]
    for i in (3, 4):  # the width-32 prompts, one of them in the width-64 call
        assert got[i] == _solo(m, reqs[i]), i


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_prefix_reuse_is_exact_and_counted(model, temperature):
    """Prompts sharing a 48-token system prefix: the first stores it, the rest reuse it (hits counted);
    every output equals solo ``generate``, greedy and seeded."""
    engine = Engine(model, slots=4, max_len=128, chunk_steps=4, prefix_cache=2, prefix_block=16)
    engine.warmup()
    before = _compiles()
    rng = np.random.default_rng(1)
    system = [int(t) for t in rng.integers(0, 256, size=48)]
    reqs = [
        Request(
            prompt=system + [int(t) for t in rng.integers(0, 256, size=int(k))],
            max_new_tokens=6,
            temperature=temperature,
            seed=i,
        )
        for i, k in enumerate([3, 20, 1, 9, 30, 12])
    ]
    got, _ = _run(engine, reqs)
    assert _compiles() == before
    for i, r in enumerate(reqs):
        assert got[i] == _solo(model, r), i
    assert engine.prefix.hits >= 5 and engine.prefix.tokens_reused >= 5 * 48
    # Another prefix evicts nothing it should not: two entries, LRU; a third distinct prefix takes the oldest.
    other = [int(t) for t in rng.integers(0, 256, size=40)]
    more = [Request(prompt=other + [5, 6, 7], max_new_tokens=3), Request(prompt=system + [9], max_new_tokens=3)]
    got, _ = _run(engine, more)
    assert [got[0], got[1]] == [_solo(model, r) for r in more]


def test_a_matched_prefix_taken_before_its_first_piece_is_prefilled_whole(model):
    """B matches the store's one entry when admitted, but the round's budget (one piece of 16) goes to A,
    admitted before it, for three rounds; A's prompt then takes that entry. B's first piece must not copy
    A's rows: it is prefilled whole (the hit taken back) and equals solo ``generate``."""
    engine = Engine(
        model, slots=4, max_len=128, chunk_steps=2, prefix_cache=1, prefix_block=16, prefill_chunk=16, prefill_tokens=16
    )
    rng = np.random.default_rng(7)
    system = [int(t) for t in rng.integers(0, 256, size=33)]
    _run(engine, [Request(prompt=system + [1], max_new_tokens=2, temperature=0.0)])
    assert engine.prefix.holds(0, np.asarray(system[:32]))
    a = Request(prompt=[int(t) for t in rng.integers(0, 256, size=40)], max_new_tokens=2, temperature=0.0)
    b = Request(prompt=system[:32] + [5, 6, 7], max_new_tokens=8, temperature=0.0, logprobs=True)
    got, updates = _run(engine, [a, b])
    want = generate(model, [b.prompt], max_new_tokens=8)
    assert got[1] == [int(t) for t in want.tokens[0]]
    # A tiny random model's greedy tokens barely depend on early context; its log-probabilities do.
    np.testing.assert_allclose([lp for u in updates[1] for lp in u.logprobs], want.logprobs[0], rtol=1e-5, atol=1e-5)
    assert engine.prefix.hits == 0 and engine.prefix.tokens_reused == 0


def test_a_repetition_penalty_request_never_takes_a_stored_prefix(model):
    """The store's rows lack the prefix tokens' penalty set: such requests prefill their whole prompt."""
    engine = Engine(model, slots=2, max_len=64, chunk_steps=4, prefix_cache=2)
    engine.warmup()
    prompt = list(range(40, 90))
    plain = Request(prompt=prompt, max_new_tokens=4)
    penal = Request(prompt=prompt + [3], max_new_tokens=8, repetition_penalty=1.5, temperature=0.0)
    got, _ = _run(engine, [plain])
    hits = engine.prefix.hits
    got2, _ = _run(engine, [penal])
    assert engine.prefix.hits == hits
    sampling = SamplingParams.make(1, repetition_penalty=1.5, temperature=0.0)
    ref = generate(model, [penal.prompt], max_new_tokens=8, sampling=sampling)
    assert got2[0] == [int(t) for t in ref.tokens[0, : ref.lengths[0]]]


def test_prompt_logprobs_equal_the_teacher_forced_pass(model):
    """``prompt_logprobs=k``: the first update carries each prompt token's log-probability given the ones
    before it (the first None) and the k most likely alternatives, as the teacher-forced pass gives them."""
    engine = Engine(model, slots=2, max_len=64, chunk_steps=2)
    engine.warmup()
    before = _compiles()
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 256, size=37)]
    _, updates = _run(engine, [Request(prompt=prompt, max_new_tokens=2, prompt_logprobs=3, logprobs=True)])
    assert _compiles() == before
    first = updates[0][0]
    logp = np.asarray(jax.nn.log_softmax(model(np.asarray([prompt]))[0][0], axis=-1))  # [T, V]
    assert first.prompt_logprobs[0] is None and first.prompt_top_logprobs[0] is None
    want = [float(logp[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    np.testing.assert_allclose(first.prompt_logprobs[1:], want, rtol=1e-5, atol=1e-5)
    for t in range(1, len(prompt)):
        ids = [i for i, _ in first.prompt_top_logprobs[t]]
        assert ids == list(np.argsort(-logp[t - 1])[:3])
    assert all(u.prompt_logprobs is None for u in updates[0][1:])
    # the completion's own log-probabilities were asked for too: real values, not zeros
    assert all(lp < 0 for u in updates[0] for lp in u.logprobs)


def test_logprobs_are_zeros_unless_asked_and_then_equal_generates(model):
    engine = Engine(model, slots=2, max_len=64, chunk_steps=3)
    engine.warmup()
    prompt = list(range(10, 30))
    _, plain = _run(engine, [Request(prompt=prompt, max_new_tokens=5, temperature=0.0)])
    _, asked = _run(engine, [Request(prompt=prompt, max_new_tokens=5, temperature=0.0, logprobs=True)])
    assert all(lp == 0.0 for u in plain[0] for lp in u.logprobs)
    ref = generate(model, [prompt], max_new_tokens=5)
    got = [lp for u in asked[0] for lp in u.logprobs]
    np.testing.assert_allclose(got, np.asarray(ref.logprobs[0, :5]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt_logprobs=9 must be None or an int in \[0, 5\]"):
        engine.submit(Request(prompt=prompt, prompt_logprobs=9), lambda u: None)


def test_the_server_reuses_a_shared_system_prompt_and_health_reports_hits(model):
    """Over HTTP with the official client: chat requests sharing a long system message reuse its
    prefix (the hits are in /health) and each answer equals the one a store-less server gives."""
    if not model.cfg.use_bias:
        pytest.skip("the HTTP path once is enough: the engine tests above cover both models")
    openai = pytest.importorskip("openai")
    import json
    import urllib.request

    from arjax.decode.server import Server, bind, create_app

    tok = ByteTokenizer()
    system = "You are a careful assistant. Answer in one short line, quoting the question. " * 2
    answers = {}
    for rows in (0, 2):
        engine = Engine(model, slots=2, max_len=128, chunk_steps=4, tokenizer=tok, prefix_cache=rows, prefill_chunk=64)
        engine.warmup()
        engine.start()
        server = Server(create_app(engine, tok, "tiny"), bind("127.0.0.1", 0))
        server.start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            got = []
            for q in ("why?", "what now?", "who is it?"):
                r = client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "system", "content": system[:56]}, {"role": "user", "content": q}],
                    max_tokens=6,
                    temperature=0,
                )
                got.append(r.choices[0].message.content)
            answers[rows] = got
            health = json.load(urllib.request.urlopen(server.url + "/health"))
        finally:
            server.stop()
            engine.stop()
        if rows:
            assert health["prefix_cache"]["hits"] == 2 and health["prefix_cache"]["tokens_reused"] >= 2 * 48
        else:
            assert health["prefix_cache"] is None
    assert answers[0] == answers[2]
