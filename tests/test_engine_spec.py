"""The engine's speculative decoding by prompt lookup: every token (and log-probability) equals the plain
engine's (and solo ``generate``'s), greedy and seeded, whether drafts are accepted (text that repeats) or
rejected (random text); EOS inside a block, exact budgets, the repetition penalty, prompts in pieces and
from the prefix store; nothing compiled after the warm-up; drafts really accepted; the engine speculates
only while it pays. On models loaded from disk with and without biases.

Every engine here has the same shape (``KW``: 4 slots, chunks of 3 steps, pieces of 16, K = 4 unless a
test is about K) so that their programs compile once for the file; the plain engine equals solo
``generate`` in tests/test_engine.py, so solo runs here are few."""

import argparse
import collections
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from arjax.decode import SamplingParams, generate
from arjax.decode.engine import LOOKUP_PROBE, Engine, Request
from arjax.decode.loop import TRACE_COUNTS
from arjax.model import Transformer, get_config
from arjax.train import checkpoint as ckpt
from arjax.train.cli.common import UsageError, engine_from_flags
from arjax.train.load import load_for_decoding
from arjax.train.tokenizer import ByteTokenizer

_COMPILES = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _COMPILES.update([name]) if name == "/jax/core/compile/backend_compile_duration" else None
)


def _compiles():
    return {**{k: v for k, v in TRACE_COUNTS.items() if k.startswith("engine_")}, "xla": sum(_COMPILES.values())}


def _save_and_load(path: str, m: Transformer) -> Transformer:
    """``m`` written as a run directory and loaded back the way `arjax serve` loads it."""
    ByteTokenizer().save(ckpt.tokenizer_dir(path))
    manager = ckpt.make_manager(path)
    ckpt.save(
        manager,
        0,
        params=nnx.state(m, nnx.Param),
        meta={"model_config": m.cfg.to_dict(), "tokenizer": "byte", "tokenizer_sha256": ckpt.tokenizer_digest(path)},
    )
    manager.wait_until_finished()
    manager.close()
    loaded, _ = load_for_decoding(ckpt=path)
    return loaded


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "no-bias"])
def model(request, tmp_path_factory):
    """A tiny random model (its text does not repeat: drafts are rejected)."""
    cfg = get_config("tiny", use_bias=request.param, max_len=128)
    return _save_and_load(str(tmp_path_factory.mktemp("run")), Transformer(cfg, rngs=nnx.Rngs(3)))


_ORDER = np.random.default_rng(0).permutation(256)
CHAIN = np.empty(256, int)  # the copier's successor of each token: one cycle through the whole vocabulary
CHAIN[_ORDER] = np.roll(_ORDER, -1)


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """A tiny model whose next token is mostly CHAIN[this token] (greedy: always; sampled at temperature 1:
    about 4 times in 5), with its positions, attention and MLPs still in play: its text repeats earlier
    text the way a model that copies from its input does, so drafts get accepted. Built from a random
    model: the token's embedding scaled up (it outweighs the rest), and an untied head whose column v is
    the normalised embedding of v's predecessor (logit about 8 for the successor, about 0 for the rest)."""
    cfg = get_config("tiny", use_bias=True, max_len=128, tie_embeddings=False)
    m = Transformer(cfg, rngs=nnx.Rngs(5))
    E = np.asarray(m.embed.embedding[...]) * 5  # [V, D]
    unit = (E - E.mean(1, keepdims=True)) / E.std(1, keepdims=True)  # as the final LayerNorm sees a token
    m.embed.embedding[...] = E
    m.lm_head.kernel[...] = 8 / cfg.d_model * unit[np.argsort(CHAIN)].T  # [D, V]
    return _save_and_load(str(tmp_path_factory.mktemp("copier")), m)


@pytest.fixture(scope="module")
def repeater(tmp_path_factory):
    """A tiny model (tied embeddings, scaled up 8x) whose greedy text repeats its last token: under a strong
    repetition penalty it moves on, and whether a draft is kept turns on the penalty counting the block's
    earlier tokens (lookup drafts a new token repeated)."""
    m = Transformer(get_config("tiny", use_bias=False, max_len=128), rngs=nnx.Rngs(7))
    m.embed.embedding[...] = m.embed.embedding[...] * 8
    return _save_and_load(str(tmp_path_factory.mktemp("repeater")), m)


# Every engine here: pieces of 16 (long prompts go in several), so few prefill programs to compile; one
# slot count and chunk length, so that the chunk programs compile once per model and K.
KW = dict(max_len=128, prefill_chunk=16, slots=4, chunk_steps=3)
SPEC = dict(prompt_lookup=4, lookup_threshold=0)  # speculate in every chunk (the policy has its own test)


def _chain(start: int, n: int) -> list[int]:
    out = [start]
    while len(out) < n:
        out.append(int(CHAIN[out[-1]]))
    return out


def _solo(model, r: Request):
    sampling = SamplingParams.make(
        1, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, repetition_penalty=r.repetition_penalty
    )
    out = generate(
        model,
        [list(r.prompt)],
        max_new_tokens=r.max_new_tokens,
        sampling=sampling,
        seed=r.seed,
        eos_ids=list(r.eos_ids),
    )
    return [int(t) for t in out.tokens[0, : out.lengths[0]]], [float(x) for x in out.logprobs[0, : out.lengths[0]]]


def _run(engine, requests, *, waves=1):
    """Submit ``requests`` in ``waves`` (stepping between them), run to the end: per request its tokens,
    log-probabilities, finish reason and top alternatives."""
    got = {i: ([], [], [], []) for i in range(len(requests))}

    def collect(i):
        def on_update(u):
            got[i][0].extend(u.tokens)
            got[i][1].extend(u.logprobs)
            got[i][2].append(u.finish_reason)
            got[i][3].extend(u.top_logprobs or [])

        return on_update

    per = -(-len(requests) // waves)
    for w in range(waves):
        for i in range(w * per, min(len(requests), (w + 1) * per)):
            engine.submit(requests[i], collect(i))
        engine.step()
    engine.run_until_done()
    return {i: (tokens, lps, reasons[-1], top) for i, (tokens, lps, reasons, top) in got.items()}


def _check_equal(model, reqs, spec, plain, *, solo=()):
    """Tokens and finish reasons equal, and log-probabilities where asked (a request that did not ask gets
    them only when it shares a chunk with one that did)."""
    for i, r in enumerate(reqs):
        assert spec[i][0] == plain[i][0], (i, r)
        assert spec[i][2] == plain[i][2], i
        if r.logprobs:
            np.testing.assert_allclose(spec[i][1], plain[i][1], rtol=1e-5, atol=1e-5)
        assert [[t for t, _ in top] for top in spec[i][3]] == [[t for t, _ in top] for top in plain[i][3]], i
        np.testing.assert_allclose(
            [[lp for _, lp in top] for top in spec[i][3]] or [[]],
            [[lp for _, lp in top] for top in plain[i][3]] or [[]],
            rtol=1e-5,
            atol=1e-5,
        )
        if i in solo:
            tokens, lps = _solo(model, r)
            assert spec[i][0] == tokens, (i, r)
            if r.logprobs:
                np.testing.assert_allclose(spec[i][1], lps, rtol=1e-5, atol=1e-5)


def _requests(rng, prompts):
    """One request per prompt, cycling through greedy and seeded sampling settings; every third asks for
    log-probabilities and two alternatives per token."""
    settings = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_k=12),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.7),
    ]
    return [
        Request(
            prompt=p,
            max_new_tokens=int(rng.integers(1, 30)),
            seed=40 + i,
            logprobs=i % 3 == 0,
            top_logprobs=2 if i % 3 == 0 else 0,
            **settings[i % len(settings)],
        )
        for i, p in enumerate(prompts)
    ]


def test_lookup_equals_the_plain_engine_and_solo_generate_and_compiles_nothing_after_warmup(model):
    """Random prompts (drafts rejected) and prompts holding a passage twice, greedy and seeded, arriving
    in waves: tokens, log-probabilities and finish reasons equal the plain engine's (and solo
    ``generate``'s for a greedy and a seeded one); after the warm-up nothing compiles."""
    rng = np.random.default_rng(1)
    passage = [int(t) for t in rng.integers(0, 256, size=20)]
    prompts = [[int(t) for t in rng.integers(0, 256, size=int(n))] for n in (1, 37, 9, 60)]
    prompts += [passage + passage[:6], passage * 2, passage + [7, 7, 7] + passage[:3]]
    reqs = _requests(rng, prompts)
    spec = Engine(model, **SPEC, **KW)
    spec.warmup()
    before = _compiles()
    got = _run(spec, reqs, waves=3)
    assert _compiles() == before
    plain = _run(Engine(model, **KW), reqs, waves=3)
    _check_equal(model, reqs, got, plain, solo=(0, 1))
    assert spec.stats["spec_steps"] + spec.stats["spec_accepted"] == spec.stats["tokens"]
    assert spec.stats["spec_chunks"] == spec.stats["chunks"]


@pytest.mark.parametrize("k, ngram", [(4, 3), (20, 2)])
def test_drafts_are_accepted_on_text_that_repeats_and_every_token_stays_exact(copier, k, ngram):
    """The copier's prompts hold a chain, then its start again: greedy continuations copy it, sampled ones
    mostly; drafts are accepted (counted), and tokens, log-probabilities and finish reasons still equal
    the plain engine's (a stale cache entry would show in the log-probabilities). Prompts go in pieces
    of 16 while others decode: with K = 20 a block is wider than a piece, so what a prefilling slot's
    rows write in a chunk must stay invisible."""
    rng = np.random.default_rng(2)
    prompts = []
    for n in (40, 30, 50, 24):
        c = _chain(int(rng.integers(0, 256)), n)
        prompts.append(c + c[:3])
    prompts += [[int(t) for t in rng.integers(0, 256, size=12)]]
    reqs = [dataclasses.replace(r, max_new_tokens=40, logprobs=True) for r in _requests(rng, prompts)]
    spec = Engine(copier, prompt_lookup=k, lookup_ngram=ngram, lookup_threshold=0, **KW)
    got = _run(spec, reqs, waves=2)
    plain = _run(Engine(copier, **KW), reqs, waves=2)
    _check_equal(copier, reqs, got, plain, solo=(0,) if k == 4 else ())
    tokens, steps, accepted = (spec.stats[key] for key in ("tokens", "spec_steps", "spec_accepted"))
    assert steps + accepted == tokens
    # The greedy copy alone emits k + 1 tokens a step until its chain runs out.
    assert accepted >= 0.3 * tokens * k / (k + 1), (tokens, steps, accepted)


def test_eos_inside_a_block_and_the_budget_are_exact(copier):
    """A greedy copy whose EOS id comes mid-block ends there ('eos'); budgets that are not multiples of
    k + 1 end exactly ('length'); a slot filled to max_len (blocks running past learned positions' end)
    equals solo ``generate``."""
    c = _chain(11, 60)
    prompt = c[:30] + c[:3]
    greedy = dict(temperature=0.0)
    reqs = [
        Request(prompt=prompt, max_new_tokens=40, eos_ids=(c[3 + 9],), **greedy),  # the 10th new token
        Request(prompt=prompt, max_new_tokens=40, eos_ids=(c[50], c[3 + 6]), **greedy),
        *(Request(prompt=prompt, max_new_tokens=n, **greedy) for n in (1, 2, 6, 7, 13)),
        Request(prompt=c[:60] + c[:40] + c[:3], max_new_tokens=25, **greedy),  # 103 + 25 = 128 = max_len
        Request(prompt=c[:60] + c[:40] + c[:3], max_new_tokens=25, temperature=1.0, seed=9),
    ]
    spec = Engine(copier, **SPEC, **KW)
    got = _run(spec, reqs)
    plain = _run(Engine(copier, **KW), reqs)
    _check_equal(copier, reqs, got, plain, solo=(7,))
    assert got[0][0] == c[3:13] and got[0][2] == "eos"
    assert got[1][0] == c[3:10] and got[1][2] == "eos"
    for i, n in enumerate((1, 2, 6, 7, 13), start=2):
        assert got[i][0] == c[3 : 3 + n] and got[i][2] == "length"
    assert spec.stats["spec_accepted"] > 0.5 * spec.stats["tokens"]


def test_the_repetition_penalty_counts_the_drafts_before_each_draw(repeater):
    """The repeater's text repeats its last token (drafts accepted) unless a penalty moves it on (then a new
    token's drafts, itself repeated, are rejected: the draw after it sees it in the penalty set), greedy
    and sampled: tokens equal the plain engine's."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 256, size=20)]
    reqs = [
        Request(prompt=prompt, max_new_tokens=30, repetition_penalty=p, temperature=t, seed=s)
        for t in (0.0, 1.0)
        for p, s in ((1.0, 1), (3.0, 2), (1.5, 3), (0.7, 4))
    ]
    spec = Engine(repeater, **SPEC, **KW)
    got = _run(spec, reqs)
    _check_equal(repeater, reqs, got, _run(Engine(repeater, **KW), reqs), solo=(1,))
    assert len(set(got[1][0])) > 20  # the penalty moved it on
    assert spec.stats["spec_accepted"] > 0


def test_prompts_in_pieces_and_from_the_prefix_store_give_lookup_their_whole_history(copier):
    """A 70-token prompt prefilled in pieces of 16 while another request decodes, then prompts that take
    its first 64 tokens from the prefix store: each slot's history holds its prompt then its output,
    drafts from the stored part are accepted, and the tokens equal the plain engine's."""
    c = _chain(3, 70)
    busy = Request(prompt=_chain(200, 8), max_new_tokens=40, temperature=0.0)  # decodes a token a step
    first = Request(prompt=c, max_new_tokens=10, temperature=0.0)
    reuse = [
        Request(prompt=c[:64] + c[:5], max_new_tokens=30, temperature=0.0),
        Request(prompt=c[:64] + c[10:14], max_new_tokens=20, temperature=0.0),
    ]
    kw = dict(prefix_cache=2, **KW)
    spec = Engine(copier, **SPEC, **kw)
    spec.warmup()
    before = _compiles()

    def history(slot, r, tokens):
        return list(np.asarray(spec._slots.history)[slot, : len(r.prompt) + len(tokens)])

    got = _run(spec, [busy, first], waves=2)  # `first` takes slot 1 and its pieces go between chunks
    assert history(1, first, got[1][0]) == c + got[1][0]
    accepted = spec.stats["spec_accepted"]
    got.update({i + 2: v for i, v in _run(spec, reuse).items()})
    assert _compiles() == before
    assert spec.prefix.hits == 2
    assert spec.stats["spec_accepted"] - accepted > 20  # the copies come from the stored prefix
    for slot, r in enumerate(reuse):  # both took the lowest free slots, 0 and 1
        assert history(slot, r, got[slot + 2][0]) == list(r.prompt) + got[slot + 2][0]
    plain = Engine(copier, **kw)
    want = _run(plain, [busy, first], waves=2)
    want.update({i + 2: v for i, v in _run(plain, reuse).items()})
    _check_equal(copier, [busy, first, *reuse], got, want)


def test_a_rope_gqa_model_with_an_int8_cache_decodes_as_the_plain_engine():
    """Llama-style (RoPE, RMSNorm, SwiGLU, grouped-query attention), its embedding scaled up so that its
    text repeats; an int8 cache writes each block's scales per row: tokens as the plain engine's."""
    cfg = get_config("tiny", pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, use_bias=False, max_len=128)
    m = Transformer(cfg, rngs=nnx.Rngs(1))
    m.embed.embedding[...] = m.embed.embedding[...] * 8
    rng = np.random.default_rng(4)
    reqs = _requests(rng, [[int(t) for t in rng.integers(0, 256, size=int(n))] for n in (5, 40, 17, 70)])
    kw = dict(kv_cache_dtype="int8", **KW)
    spec = Engine(m, **SPEC, **kw)
    _check_equal(m, reqs, _run(spec, reqs, waves=2), _run(Engine(m, **kw), reqs, waves=2))
    assert spec.stats["spec_accepted"] > 0


def test_the_engine_speculates_only_while_drafts_are_accepted(model, copier):
    """With the default threshold (1 accepted draft a step): sampled requests on random text (drafts
    rejected) run plain chunks after their first, with a speculative probe every LOOKUP_PROBE chunks;
    greedy copies speculate in every chunk. Tokens equal the plain engine's either way, and plain
    chunks keep each slot's history (prompt then output) for the chunks that speculate."""
    rng = np.random.default_rng(6)
    sampled = [
        Request(prompt=[int(t) for t in rng.integers(0, 256, size=20)], max_new_tokens=40, temperature=1.0, seed=i)
        for i in range(3)
    ]
    spec = Engine(model, prompt_lookup=4, **KW)
    got = _run(spec, sampled)
    _check_equal(model, sampled, got, _run(Engine(model, **KW), sampled))
    chunks, speculative = spec.stats["chunks"], spec.stats["spec_chunks"]
    assert speculative <= 1 + chunks // LOOKUP_PROBE < chunks, (chunks, speculative)

    c = _chain(5, 30)
    greedy = [Request(prompt=c + c[:3], max_new_tokens=24, temperature=0.0)]
    spec = Engine(copier, prompt_lookup=4, **KW)
    got = _run(spec, greedy)
    _check_equal(copier, greedy, got, _run(Engine(copier, **KW), greedy))
    assert spec.stats["spec_chunks"] == spec.stats["chunks"] and got[0][0] == c[3:27]

    # The highest bar (all 4 drafts accepted every step), sampled text: plain chunks, a probe now and
    # then; the history written by both kinds is whole.
    spec = Engine(model, prompt_lookup=4, lookup_threshold=4, **KW)
    got = _run(spec, sampled[:1])
    assert spec.stats["spec_chunks"] < spec.stats["chunks"]
    assert list(np.asarray(spec._slots.history)[0, : 20 + 40]) == list(sampled[0].prompt) + got[0][0]


def test_bad_lookup_settings_are_one_line_errors_and_the_cli_passes_them(copier):
    for kw, message in (
        (dict(prompt_lookup=-1), r"prompt_lookup=-1 must be an int in 0\.\.64"),
        (dict(prompt_lookup=65), r"prompt_lookup=65 must be an int in 0\.\.64"),
        (dict(prompt_lookup=True), r"prompt_lookup=True must be an int"),
        (dict(prompt_lookup=4, lookup_ngram=0), r"lookup_ngram=0 must be an int in 1\.\.16"),
        (dict(prompt_lookup=4, lookup_threshold=float("nan")), r"lookup_threshold=nan must be a number in 0\.\.4"),
        (dict(prompt_lookup=4, lookup_threshold=-1), r"lookup_threshold=-1 must be a number in 0\.\.4"),
        (dict(prompt_lookup=4, lookup_threshold=5), r"lookup_threshold=5 must be a number in 0\.\.4 .*at most"),
    ):
        with pytest.raises(ValueError, match=message):
            Engine(copier, slots=1, max_len=32, **kw)
    flags = dict(slots=2, chunk_steps=2, max_len=32, kv_cache_dtype=None)
    ns = argparse.Namespace(**flags, prompt_lookup_k=5, lookup_ngram=2, lookup_threshold=0.5)
    engine = engine_from_flags(ns, copier, None, max_queue=0)
    assert (engine.prompt_lookup, engine.lookup_ngram, engine.lookup_threshold, engine.cache_len) == (5, 2, 0.5, 32 + 6)
    # `arjax generate --input` shares engine_from_flags: its namespace has neither (and --prompt-lookup is its switch)
    engine = engine_from_flags(argparse.Namespace(**flags, prompt_lookup=False), copier, None, max_queue=0)
    assert engine.prompt_lookup == 0 and engine.cache_len == 32
    with pytest.raises(UsageError, match=r"--prompt-lookup 99 is out of range; give 0 \(off\) to 64"):
        engine_from_flags(argparse.Namespace(**flags, prompt_lookup_k=99, lookup_ngram=3), copier, None, max_queue=0)
    for extra, flag in ((dict(lookup_ngram=2), "--lookup-ngram"), (dict(lookup_threshold=0.5), "--lookup-threshold")):
        with pytest.raises(UsageError, match=f"{flag} sets prompt lookup; add --prompt-lookup K"):
            engine_from_flags(argparse.Namespace(**flags, prompt_lookup_k=0, **extra), copier, None, max_queue=0)
    with pytest.raises(UsageError, match=r"--lookup-threshold inf is out of range"):
        ns = argparse.Namespace(**flags, prompt_lookup_k=4, lookup_ngram=3, lookup_threshold=float("inf"))
        engine_from_flags(ns, copier, None, max_queue=0)


def test_the_server_speculates_with_the_same_text_and_health_counts_it(copier):
    """Over HTTP with the official client (token-id prompts, greedy): a server with prompt lookup answers
    what a plain one does, and /health reports its speculative chunks and accepted drafts."""
    openai = pytest.importorskip("openai")
    import json
    import urllib.request

    from arjax.decode.server import Server, bind, create_app

    tok = ByteTokenizer()
    prompts = [_chain(s, 30) + _chain(s, 3) for s in (17, 90)]
    answers, health = {}, {}
    for k in (0, 4):
        engine = Engine(copier, tokenizer=tok, prompt_lookup=k, **KW)
        engine.start()
        server = Server(create_app(engine, tok, "copier"), bind("127.0.0.1", 0))
        server.start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.completions.create(model="copier", prompt=prompts, max_tokens=20, temperature=0, logprobs=1)
            answers[k] = [(c.text, c.logprobs.tokens) for c in sorted(r.choices, key=lambda c: c.index)]
            health[k] = json.load(urllib.request.urlopen(server.url + "/health"))["prompt_lookup"]
        finally:
            server.stop()
            engine.stop()
    assert answers[4] == answers[0]
    assert health[0] is None
    assert health[4]["k"] == 4 and health[4]["tokens"] == 40
    assert health[4]["speculative_chunks"] == health[4]["chunks"] > 0 and health[4]["accepted_drafts"] > 20
