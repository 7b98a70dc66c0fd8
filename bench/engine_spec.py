"""The serving engine with and without prompt lookup: tokens/s on input-grounded requests, one at a time.

    python bench/engine_spec.py                  # shakespeare-char size, both models, K in 4,8, 160 new tokens
    python bench/engine_spec.py --quick          # a plumbing check (tiny model, few tokens; not for the record)
    python bench/engine_spec.py --http --ks 4    # the same requests through `arjax serve`, with and without
                                                 # --prompt-lookup 4 (token-id prompts, one at a time)

Models (shakespeare-char size: 6 layers x 384, 6 heads, byte vocabulary, learned positions; 1024 of them
so that a document fits), random weights, in this process (``Engine`` directly, no HTTP):

- ``random``: as initialised. Its greedy text does not copy the document, but at this size it runs into
  long stretches of one repeated byte, which prompt lookup drafts from the text so far.
- ``copier``: the same, with the token embedding scaled up 5x and the head untied and set so that the most
  likely next byte is ``CHAIN[this byte]`` (one fixed cycle through the 256 bytes); attention and MLPs
  are still computed (at this size they keep its probability near 0.35 at temperature 1). Its documents
  are stretches of that cycle, so its greedy answer copies the document, as a model trained to answer
  from its input would.

Requests: a document (a tinyshakespeare passage of ``--doc`` bytes for ``random``; a stretch of the cycle
for ``copier``), then "\\n\\nQuestion: what does it say first?\\nAnswer: " and the document's first 8
bytes; greedy, ``--max-tokens`` new tokens (no EOS: every request ends on length, so token counts are
equal everywhere). Plain engine vs ``prompt_lookup=K`` (``--ks``, ngram 3), one request at a time
(``slots=1``, ``chunk_steps=8``), each engine warmed up first (compilation excluded). ``--repeats``
rounds; in each, every setting decodes every request once (interleaved, so drift on a shared machine
hits all alike); the median round counts. Tokens are asserted identical to the plain engine's. Reported:
tokens/s, speedup, tokens per model pass (``stats["tokens"] / stats["slot_steps"]``, speculative and
plain chunks alike), and the same for sampled requests (temperature 1: drafts mostly rejected on
``random``; the engine then runs plain chunks with a speculative probe every 8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from flax import nnx

from arjax.decode.engine import Engine, Request
from arjax.model import Transformer, get_config

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")
QUESTION = b"\n\nQuestion: what does it say first?\nAnswer: "
_ORDER = np.random.default_rng(0).permutation(256)
CHAIN = np.empty(256, int)  # the copier's next byte after each byte: one cycle through all 256
CHAIN[_ORDER] = np.roll(_ORDER, -1)


def make_model(kind: str, quick: bool) -> Transformer:
    size = dict(n_layers=2, d_model=64, n_heads=4) if quick else dict(n_layers=6, d_model=384, n_heads=6)
    cfg = get_config("tiny", vocab_size=256, max_len=1024, dropout=0.0, tie_embeddings=kind == "random", **size)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    if kind == "copier":
        E = np.asarray(m.embed.embedding[...]) * 5  # [V, D]: the byte outweighs its position and the blocks
        unit = (E - E.mean(1, keepdims=True)) / E.std(1, keepdims=True)  # as the final LayerNorm sees it
        m.embed.embedding[...] = E
        m.lm_head.kernel[...] = 8 / cfg.d_model * unit[np.argsort(CHAIN)].T  # logit ~8 for CHAIN[byte], ~0 else
    return m


def make_requests(kind: str, n: int, doc: int, max_tokens: int, temperature: float) -> list[Request]:
    rng = np.random.default_rng(1)
    if os.path.isfile(DATA):
        with open(DATA, "rb") as f:
            text = f.read()
    else:  # the shared data is missing: any text will do
        text = b"".join(b"line %d: the quick brown fox jumps over the lazy dog.\n" % i for i in range(5000))
    out = []
    for i in range(n):
        if kind == "copier":
            c = [int(rng.integers(0, 256))]
            while len(c) < doc:
                c.append(int(CHAIN[c[-1]]))
            document = c
        else:
            at = int(rng.integers(0, len(text) - doc))
            document = list(text[at : at + doc])
        prompt = document + list(QUESTION) + document[:8]
        out.append(Request(prompt=prompt, max_new_tokens=max_tokens, temperature=temperature, seed=i))
    return out


def decode_one(engine: Engine, request: Request) -> list[int]:
    got: list[int] = []
    engine.submit(request, lambda u: got.extend(u.tokens))
    engine.run_until_done()
    return got


def measure(kind: str, args) -> None:
    model = make_model(kind, args.quick)
    engines = {"plain": Engine(model, slots=1, max_len=1024, chunk_steps=8)}
    for k in args.ks:
        engines[f"lookup K={k}"] = Engine(model, slots=1, max_len=1024, chunk_steps=8, prompt_lookup=k)
    for e in engines.values():
        e.warmup()
    for temperature in (0.0, 1.0):
        reqs = make_requests(kind, args.requests, args.doc, args.max_tokens, temperature)
        for e in engines.values():  # a first run of each request shape (not timed)
            decode_one(e, reqs[0])
            e.stats.clear()
        rounds = {name: [] for name in engines}
        outputs = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, e in engines.items():
                t0 = time.perf_counter()
                outputs[name] = [decode_one(e, r) for r in reqs]
                rounds[name].append(time.perf_counter() - t0)
        tokens = sum(len(o) for o in outputs["plain"])
        base = tokens / statistics.median(rounds["plain"])
        what = "greedy" if temperature == 0 else "sampled (temperature 1)"
        print(f"\n{kind} model, {what}: {len(reqs)} requests x {args.max_tokens} tokens, prompt {len(reqs[0].prompt)}")
        print(f"{'setting':>14} {'tok/s':>8} {'speedup':>8} {'tok/pass':>9} {'identical':>10}")
        for name, e in engines.items():
            tps = tokens / statistics.median(rounds[name])
            same = outputs[name] == outputs["plain"]
            per_pass = e.stats["tokens"] / max(e.stats["slot_steps"], 1)  # speculative and plain chunks
            print(f"{name:>14} {tps:8.1f} {tps / base:7.2f}x {per_pass:9.2f} {str(same):>10}")
            if not same:
                raise SystemExit(f"{name}: tokens differ from the plain engine's")


def measure_http(kind: str, args) -> None:
    """The requests through `arjax serve` (a run directory of the model, a server per setting), one at a
    time as token-id prompts, greedy: tokens/s and whether the text is identical to the plain server's."""
    import http.client
    import json
    import signal
    import tempfile

    from flax import nnx

    from arjax.train import checkpoint as ckpt
    from arjax.train.tokenizer import ByteTokenizer

    sys.path.insert(0, os.path.dirname(__file__))
    from serve import start_server  # bench/serve.py's: `arjax serve` in a subprocess, its address

    model = make_model(kind, args.quick)
    reqs = make_requests(kind, args.requests, args.doc, args.max_tokens, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        ByteTokenizer().save(ckpt.tokenizer_dir(run))
        manager = ckpt.make_manager(run)
        meta = {
            "model_config": model.cfg.to_dict(),
            "tokenizer": "byte",
            "tokenizer_sha256": ckpt.tokenizer_digest(run),
        }
        ckpt.save(manager, 0, params=nnx.state(model, nnx.Param), meta=meta)
        manager.wait_until_finished()
        manager.close()
        results = {}
        for k in [0, *args.ks]:
            extra = ["--prompt-lookup", str(k)] if k else []
            proc, addr = start_server(run, 1, 1024, 8, extra)
            try:

                def complete(r: Request, addr=addr) -> tuple[str, int]:
                    body = {"model": "run", "prompt": list(r.prompt), "max_tokens": r.max_new_tokens, "temperature": 0}
                    conn = http.client.HTTPConnection(*addr, timeout=600)
                    conn.request(
                        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
                    )
                    reply = json.loads(conn.getresponse().read())
                    conn.close()
                    return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]

                complete(reqs[0])  # the first request's costs (connection, thread start) out of the way
                times, texts, tokens = [], [], 0
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    done = [complete(r) for r in reqs]
                    times.append(time.perf_counter() - t0)
                    texts, tokens = [t for t, _ in done], sum(n for _, n in done)
                results[k] = (tokens / statistics.median(times), texts)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    base, plain = results[0]
    print(f"\n{kind} model through arjax serve, greedy: {len(reqs)} requests x {args.max_tokens} tokens, one at a time")
    print(f"{'setting':>18} {'tok/s':>8} {'speedup':>8} {'identical':>10}")
    for k, (tps, texts) in results.items():
        name = f"--prompt-lookup {k}" if k else "plain"
        print(f"{name:>18} {tps:8.1f} {tps / base:7.2f}x {str(texts == plain):>10}")
        if texts != plain:
            raise SystemExit(f"{name}: text differs from the plain server's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, 32 new tokens, 1 round (a smoke run)")
    ap.add_argument("--models", default="random,copier", help="random, copier or both (default: %(default)s)")
    ap.add_argument("--ks", default="4,8", help="drafts per step to try (default: %(default)s)")
    ap.add_argument("--doc", type=int, default=600, help="document bytes (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--http", action="store_true", help="through `arjax serve` (greedy only)")
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.quick:
        args.max_tokens, args.repeats, args.requests, args.doc = 32, 1, 2, 200
    for kind in args.models.split(","):
        (measure_http if args.http else measure)(kind, args)


if __name__ == "__main__":
    main()
