"""The serving engine with and without prompt lookup: tokens/s on input-grounded requests, one at a time.

    python bench/engine_spec.py                  # shakespeare-char size, both models, K in 4,8, 160 new tokens
    python bench/engine_spec.py --quick          # a plumbing check (tiny model, few tokens; not for the record)

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
tokens/s, speedup, tokens per model pass (``spec_steps``/``spec_accepted`` stats), and the same for
sampled requests (temperature 1: drafts mostly rejected on ``random``, the cost of verifying K + 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
            per_pass = 1.0 if name == "plain" else e.stats["tokens"] / max(e.stats["spec_steps"], 1)
            print(f"{name:>14} {tps:8.1f} {tps / base:7.2f}x {per_pass:9.2f} {str(same):>10}")
            if not same:
                raise SystemExit(f"{name}: tokens differ from the plain engine's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, 32 new tokens, 1 round (a smoke run)")
    ap.add_argument("--models", default="random,copier", help="random, copier or both (default: %(default)s)")
    ap.add_argument("--ks", default="4,8", help="drafts per step to try (default: %(default)s)")
    ap.add_argument("--doc", type=int, default=600, help="document bytes (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.quick:
        args.max_tokens, args.repeats, args.requests, args.doc = 32, 1, 2, 200
    for kind in args.models.split(","):
        measure(kind, args)


if __name__ == "__main__":
    main()
