"""Dump the StableHLO of every decode program a fixed scenario compiles, to compare a refactor before/after.

    python bench/hlo.py OUT_DIR            # one file per (program, call): OUT_DIR/<module>.<name>.<n>.mlir
    diff -r BEFORE_DIR AFTER_DIR           # identical files: the refactor left that compiled program alone

The scenario: ``generate`` and ``stream`` (plain, int8 KV cache, prompt lookup and a draft model) and the
serving engine (insert, chunk, release) on two small random models, one with biases and one without.
Each jitted entry point is wrapped so that its first call per argument shapes also writes
``fn.lower(...).as_text()``; locations are not printed, so moving code between files changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import arjax.decode.engine as engine_mod
import arjax.decode.loop as loop_mod
from arjax.decode import DraftModel, PromptLookup, SamplingParams, generate, stream
from arjax.decode.engine import Engine, Request
from arjax.model import Transformer, get_config

PROGRAMS = {
    loop_mod: ("_start", "_resume", "_spec_start", "_spec_resume"),
    engine_mod: ("_insert", "_chunk", "_release"),
}


def _wrap(module, name: str, out: Path, seen: dict) -> None:
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        n = seen.setdefault(name, 0)
        seen[name] = n + 1
        if n < 3:  # the first calls are the distinct shapes of this scenario
            text = fn.lower(*args, **kwargs).as_text()
            (out / f"{module.__name__.rsplit('.', 1)[-1]}.{name}.{n}.mlir").write_text(text)
        return fn(*args, **kwargs)

    setattr(module, name, wrapped)


def scenario(tag: str, *, bias: bool) -> None:
    cfg = get_config("tiny", vocab_size=97, max_len=128, use_bias=bias)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    draft = Transformer(get_config("tiny", vocab_size=97, max_len=128, n_layers=1, use_bias=bias), rngs=nnx.Rngs(1))
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    sampling = SamplingParams.make(
        3, temperature=[0.0, 0.8, 1.0], top_k=[0, 5, 0], top_p=[1.0, 0.9, 1.0], repetition_penalty=[1.0, 1.2, 1.0]
    )
    generate(model, prompts, max_new_tokens=12, sampling=sampling, eos_ids=[3], seed=1)
    for _ in stream(model, prompts, max_new_tokens=12, sampling=sampling, chunk_steps=4, kv_cache_dtype="int8"):
        pass
    generate(model, prompts, max_new_tokens=12, sampling=sampling, draft=PromptLookup(ngram=2, k=3))
    generate(model, prompts, max_new_tokens=12, sampling=sampling, draft=DraftModel(draft, k=3))
    eng = Engine(model, slots=4, max_len=64, chunk_steps=4, buckets=(16, 32, 64))
    outs = []
    for i, p in enumerate(prompts):
        eng.submit(
            Request(prompt=p, max_new_tokens=6, temperature=0.7 * i, top_k=3, seed=i, top_logprobs=2), outs.append
        )
    eng.run_until_done()
    print(f"{tag}: {len(outs)} engine updates")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for bias in (False, True):
        sub = out / ("bias" if bias else "nobias")
        sub.mkdir(exist_ok=True)
        seen: dict = {}
        originals = {(m, n): getattr(m, n) for m, names in PROGRAMS.items() for n in names}
        for m, n in originals:
            _wrap(m, n, sub, seen)
        try:
            scenario(sub.name, bias=bias)
        finally:
            for (m, n), fn in originals.items():
                setattr(m, n, fn)
    files = sorted(out.rglob("*.mlir"))
    print(f"{len(files)} programs written under {out} (jax {jax.__version__}, numpy {np.__version__})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/hlo.py OUT_DIR")
    main(sys.argv[1])
