"""Speculative decoding vs plain greedy generate, batch 1 (issue 11's speed targets): prompt lookup
on a copy task, a small draft model on text.

    python bench/speculative.py                    # trains target + draft into runs/bench-spec (kept), then measures
    python bench/speculative.py                    # again: reuses the runs in runs/bench-spec, measures only
    python bench/speculative.py --target-run DIR --draft-run DIR    # measure other runs of this script
    python bench/speculative.py --quick            # a plumbing check (tiny models, seconds; not for the record)

One process: training (if the runs are not there yet) and every measurement.

Models. A char-level TARGET (6 layers x 256, RoPE) and a smaller DRAFT (1 layer x 128) are trained
here on the same rows, built from ``--data`` (tinyshakespeare) with the same character tokenizer.
Each row is an aligned copy example: a passage of ``--passage`` characters starting at a line start,
a separator line ``---``, then the same passage again. The first half is ordinary text (language
modelling); the second half teaches the model to copy its input. Rows are aligned (every row starts
at position 0) because with random windows over the same text (``arjax train``) a model of this size
did not learn to copy within a CPU budget: 900 steps (2.3M tokens) of a 4 x 128 model gave 9% copy
accuracy; aligned rows give a fixed copy offset, which a RoPE model learns in ~100 steps. Training
uses ``arjax.train.loop.fit`` with ``TrainConfig`` (``train`` itself only samples random windows).
Val rows come from the last 10% of the text.

1. Prompt lookup on input-grounded text: prompt = val passage + "\\n---\\n" + its first 8 characters;
   the target's greedy continuation copies the passage. Plain greedy ``generate`` vs
   ``generate(..., draft=PromptLookup(ngram, k))``, identical tokens asserted. Target: >= 2x tokens/s.
2. Draft model on text: prompt = the first 32 characters of a val passage; greedy and temperature
   0.8, k in ``--ks``. Reported: acceptance rate a (``GenerateOutput.acceptance_rate``), the step-cost
   ratio c (plain greedy ``generate`` of the draft alone vs the target alone, same prompts and
   length), the wall speedup (speculative tokens/s over plain tokens/s, same sampling settings),
   and the ideal (1 - a^(k+1)) / ((1 - a)(k c + 1)). Target: speedup >= 80% of the ideal. That ideal
   counts the target's pass over k+1 tokens as one plain step; the table also gives v, the measured
   cost of that pass over a one-token pass (jitted loops of target forward passes, alone), and
   ideal_v = (1 - a^(k+1)) / ((1 - a)(v + k c)), so what the loop itself adds is told apart from
   what the hardware charges for verifying k+1 tokens.

Timing: batch 1, the same prompts for every setting, a warm-up call per setting first (compilation
excluded), then ``--repeats`` rounds in which every setting runs every prompt once (interleaved, so
drift on a shared machine hits all settings alike); the median round counts. Prefill is included
(it is part of every ``generate`` call).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.decode import DraftModel, PromptLookup, SamplingParams, generate
from arjax.model import init_cache
from arjax.model.rng import numpy_rng
from arjax.train import checkpoint as ckpt
from arjax.train.config import TrainConfig
from arjax.train.loop import fit
from arjax.train.tokenizer import CharTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = "\n---\n"  # characters of tinyshakespeare's own vocabulary
COPY_HEAD = 8  # characters of the copy given in the lookup prompt
TEXT_PROMPT = 32  # characters of a passage given as a text prompt


@dataclasses.dataclass(frozen=True)
class CopyRows:
    """Training batches [B, 2L + len(sep)]: passage, separator, the passage again; passages start at line starts."""

    ids: np.ndarray
    starts: np.ndarray
    passage: int
    sep: np.ndarray

    @property
    def seq_len(self) -> int:
        return 2 * self.passage + len(self.sep) - 1

    def row(self, s: int) -> np.ndarray:
        p = self.ids[s : s + self.passage]
        return np.concatenate([p, self.sep, p]).astype(np.int32)

    def batch(self, *, batch_size: int, seed: int, step: int, rows=None) -> np.ndarray:
        idx = numpy_rng(seed, step).integers(0, len(self.starts), size=batch_size)
        idx = idx if rows is None else idx[rows]
        return np.stack([self.row(int(self.starts[i])) for i in idx])


def line_starts(text: str, lo: int, hi: int, length: int) -> np.ndarray:
    """Offsets in [lo, hi - length] where a line begins."""
    return np.array([i for i in range(lo, hi - length + 1) if i == 0 or text[i - 1] == "\n"], np.int64)


def resolve_data(path: str) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO, path)  # relative to the repo root, as the docs write it


def get_run(
    name: str,
    run_dir: str,
    *,
    data: str,
    steps: int,
    layers: int,
    width: int,
    text: str,
    tok,
    rows: CopyRows,
    val_rows: np.ndarray,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[nnx.Module, dict]:
    """The model of ``run_dir``, trained there first when it holds no checkpoint."""
    info = {"name": name, "run": run_dir, "trained": False}
    if not ckpt.all_steps(run_dir):
        cfg = TrainConfig(
            model="shakespeare-char",
            model_overrides={
                "vocab_size": tok.vocab_size,
                "n_layers": layers,
                "d_model": width,
                "n_heads": max(1, width // 32),
                "dropout": 0.0,
                "max_len": 1024,
                "pos": "rope",
            },
            data=data,
            tokenizer="char",
            batch_size=batch_size,
            seq_len=rows.seq_len,
            steps=steps,
            lr=lr,
            warmup_steps=min(30, steps // 4),
            min_lr=lr / 10,
            beta2=0.99,
            seed=seed,
            eval_interval=steps,
            eval_iters=val_rows.shape[0] // batch_size,
            log_interval=10,
            ckpt_interval=steps,
            max_to_keep=1,
        )
        if os.path.isdir(run_dir):  # an interrupted run of this script: nothing to keep
            shutil.rmtree(run_dir)
        os.makedirs(run_dir)
        tok.save(ckpt.tokenizer_dir(run_dir))
        meta = {
            "tokenizer": "char",
            "tokenizer_sha256": ckpt.tokenizer_digest(run_dir),
            "data_sha256": ckpt.text_digest(text),
            "bench_speculative": {"passage": rows.passage, "sep": SEP},
        }
        t = time.perf_counter()
        n_val = (val_rows.shape[0] // batch_size) * batch_size
        r = fit(
            cfg,
            run_dir,
            model_cfg=cfg.model_config(vocab_size=tok.vocab_size),
            source=rows,
            val_windows=val_rows[:n_val].reshape(-1, batch_size, val_rows.shape[1]),
            meta=meta,
            quiet=True,
        )
        info.update(trained=True, wall_s=time.perf_counter() - t, steps=steps, tokens_per_s=r["tokens_per_s"])
    model, run_tok, _ = ckpt.load_model(run_dir)
    saved = ckpt.read_meta(run_dir)[1]
    spec = saved.get("bench_speculative")
    if spec != {"passage": rows.passage, "sep": SEP}:
        raise SystemExit(f"{run_dir} was not trained by this script with --passage {rows.passage} (its record: {spec})")
    if getattr(run_tok, "chars", None) != tok.chars:
        raise SystemExit(f"{run_dir}'s tokenizer is not the character vocabulary of --data")
    info.update(step=saved["step"], layers=model.cfg.n_layers, width=model.cfg.d_model)
    return model, info


def split_losses(model, rows: np.ndarray, passage: int, sep_len: int) -> tuple[float, float]:
    """Teacher-forced NLL (nats/char) on the text half and on the copied half of ``rows``."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def nll(params, x):
        logits, _ = nnx.merge(graphdef, params)(x[:, :-1])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), x[:, 1:, None], -1)[..., 0]

    out = np.asarray(nll(params, jnp.asarray(rows)))  # [N, T]: column t predicts token t + 1
    target = np.arange(out.shape[1]) + 1
    return float(out[:, target < passage].mean()), float(out[:, target >= passage + sep_len].mean())


def pass_cost(model, widths: list[int], *, cache_len: int, start: int, passes: int, repeats: int) -> dict[int, float]:
    """Seconds per target forward pass over K tokens (K in ``widths``) at batch 1, each K a jitted loop of
    ``passes`` cached passes at the same slots; the K alternate within each of ``repeats`` rounds (median)."""
    graphdef, params = nnx.split(model)

    def make(K):
        @jax.jit
        def run(params):
            m = nnx.merge(graphdef, params)
            _, cache = m(jnp.ones((1, start), jnp.int32), jnp.arange(start)[None], init_cache(m.cfg, 1, cache_len))

            def body(i, carry):
                cache, tok = carry
                logits, cache = m(jnp.broadcast_to(tok, (1, K)), (start + jnp.arange(K))[None], cache)
                return cache.replace(index=jnp.full_like(cache.index, start)), jnp.argmax(logits[0, -1]).astype(
                    jnp.int32
                )

            return jax.lax.fori_loop(0, passes, body, (cache, jnp.zeros((), jnp.int32)))[1]

        run(params).block_until_ready()  # compile
        return run

    runs = {K: make(K) for K in widths}
    times = {K: [] for K in widths}
    for _ in range(repeats):
        for K, run in runs.items():
            t = time.perf_counter()
            run(params).block_until_ready()
            times[K].append(time.perf_counter() - t)
    return {K: statistics.median(v) / passes for K, v in times.items()}


def time_settings(settings: dict, prompts: list, repeats: int) -> tuple[dict, dict]:
    """Median seconds per round (every prompt once) of each setting, and each setting's outputs (warm-up call)."""
    outputs = {name: [fn(p) for p in prompts] for name, fn in settings.items()}  # warm-up: compiles, keeps outputs
    rounds = {name: [] for name in settings}
    for _ in range(repeats):
        for name, fn in settings.items():
            t = time.perf_counter()
            for p in prompts:
                fn(p)
            rounds[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in rounds.items()}, outputs


def weighted_acceptance(outs) -> float:
    """Accepted over drafted across prompts (each call's rate weighted by its rounds: k drafts per round)."""
    w = [max(o.num_steps, 1) for o in outs]
    return sum(o.acceptance_rate * x for o, x in zip(outs, w)) / sum(w)


def per_token_alpha(a: float, k: int) -> float:
    """Leviathan et al.'s alpha (each draft accepted with probability alpha, given the ones before it were) from
    ``acceptance_rate`` a = accepted / proposed: a round accepts a k drafts on average, and
    alpha + alpha^2 + ... + alpha^k = a k. (a itself is not alpha: the drafts after a rejection count as proposed.)"""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid**i for i in range(1, k + 1)) < a * k else (lo, mid)
    return (lo + hi) / 2


def ideal(alpha: float, k: int, cost: float) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): expected tokens per round, over the round's cost in target steps."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / cost


def same_tokens(a, b) -> bool:
    return all(np.array_equal(x.tokens, y.tokens) and np.array_equal(x.lengths, y.lengths) for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="../shared/data/tinyshakespeare.txt", help="text file (relative to the repo root)"
    )
    parser.add_argument("--work", default=None, help="where the trained runs are kept (default runs/bench-spec)")
    parser.add_argument(
        "--target-run", default=None, help="run dir of a target trained by this script (default WORK/target)"
    )
    parser.add_argument(
        "--draft-run", default=None, help="run dir of a draft trained by this script (default WORK/draft)"
    )
    parser.add_argument("--target-steps", type=int, default=None)
    parser.add_argument("--draft-steps", type=int, default=None)
    parser.add_argument("--passage", type=int, default=None, help="passage length in characters (a row holds it twice)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per task (batch 1 each)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6], help="draft lengths for the draft model")
    parser.add_argument(
        "--lookup", nargs="+", default=["3:4", "3:8", "3:16", "8:8", "8:16"], help="prompt lookup NGRAM:K settings"
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and few tokens: checks the plumbing in seconds"
    )
    args = parser.parse_args(argv)
    q = args.quick
    work = args.work or ("runs/bench-spec-quick" if q else "runs/bench-spec")
    passage = args.passage or (64 if q else 288)
    new_tokens = args.new_tokens or (32 if q else 256)
    n_prompts = args.prompts or (2 if q else 4)
    repeats = args.repeats or (1 if q else 5)
    target_steps = args.target_steps or (10 if q else 200)
    draft_steps = args.draft_steps or (10 if q else 300)
    sizes = {"target": (2, 64) if q else (6, 256), "draft": (1, 32) if q else (1, 128)}
    lookups = [tuple(int(x) for x in s.split(":")) for s in args.lookup]
    if new_tokens > passage - max(COPY_HEAD, TEXT_PROMPT):
        parser.error(
            f"--new-tokens {new_tokens} must be <= --passage - {max(COPY_HEAD, TEXT_PROMPT)}: both tasks stay "
            "inside one passage (the copy, or the text half of a row)"
        )
    t_start = time.perf_counter()
    load0 = os.getloadavg()

    with open(resolve_data(args.data), encoding="utf-8") as f:
        text = f.read()
    tok = CharTokenizer.fit(text)
    ids = np.asarray(tok.encode(text), np.int32)
    sep = np.asarray(tok.encode(SEP), np.int32)
    cut = int(len(ids) * 0.9)
    rows = CopyRows(ids, line_starts(text, 0, cut, passage), passage, sep)
    val_starts = line_starts(text, cut, len(text), passage)
    val_rows = np.stack([rows.row(int(s)) for s in val_starts[np.linspace(0, len(val_starts) - 1, 32).astype(int)]])
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs (load average "
        f"{load0[0]:.1f}); rows of {rows.seq_len + 1} chars (passage {passage}, separator, passage); "
        f"{new_tokens} new tokens, batch 1, {n_prompts} prompts, median of {repeats} rounds",
        flush=True,
    )

    models, infos = {}, {}
    for name, run_dir, steps, batch_size, lr in (
        ("target", args.target_run, target_steps, 4, 2e-3),
        ("draft", args.draft_run, draft_steps, 4, 3e-3),
    ):
        layers, width = sizes[name]
        run_dir = run_dir or os.path.join(work, name)
        models[name], info = get_run(
            name,
            run_dir,
            data=args.data,
            steps=steps,
            layers=layers,
            width=width,
            text=text,
            tok=tok,
            rows=rows,
            val_rows=val_rows,
            batch_size=batch_size,
            lr=lr,
            seed=1337,
        )
        info["text_loss"], info["copy_loss"] = split_losses(models[name], val_rows, passage, len(sep))
        infos[name] = info
        how = (
            f"trained here: {info['steps']} steps in {info['wall_s']:.0f} s ({info['tokens_per_s']:,.0f} tok/s)"
            if info["trained"]
            else f"reused (step {info['step']})"
        )
        print(
            f"{name}: {info['layers']} x {info['width']} in {info['run']}, {how}; val loss text "
            f"{info['text_loss']:.3f}, copy {info['copy_loss']:.3f} nats/char",
            flush=True,
        )
    target, draft = models["target"], models["draft"]

    # 1. Prompt lookup on the copy task.
    picks = val_starts[np.linspace(0, len(val_starts) - 1, n_prompts + 2).astype(int)[1:-1]]
    passages = [text[s : s + passage] for s in picks]
    copy_prompts = [tok.encode(p + SEP + p[:COPY_HEAD]) for p in passages]
    settings = {"plain": lambda p: generate(target, [p], max_new_tokens=new_tokens)}
    for n, k in lookups:
        settings[f"lookup {n}:{k}"] = lambda p, n=n, k=k: generate(
            target, [p], max_new_tokens=new_tokens, draft=PromptLookup(ngram=n, k=k)
        )
    times, outs = time_settings(settings, copy_prompts, repeats)
    want = [np.array(tok.encode(p[COPY_HEAD : COPY_HEAD + new_tokens])) for p in passages]
    copy_acc = float(np.mean([np.mean(o.tokens[0] == w) for o, w in zip(outs["plain"], want)]))
    total = n_prompts * new_tokens
    lookup_rows = []
    for name in settings:
        o = outs[name]
        same = same_tokens(o, outs["plain"])
        lookup_rows.append(
            {
                "setting": name,
                "tps": total / times[name],
                "speedup": times["plain"] / times[name],
                "same": same,
                "a": None if name == "plain" else weighted_acceptance(o),
                "tpp": None if name == "plain" else float(np.mean([x.tokens_per_pass for x in o])),
            }
        )
    print(
        f"\n1. prompt lookup, copy task: target's greedy output matches the passage for {copy_acc:.1%} of "
        f"{total} characters",
        flush=True,
    )

    # 2. Draft model on text prompts.
    text_prompts = [tok.encode(p[:TEXT_PROMPT]) for p in passages]
    sampled = SamplingParams.make(1, temperature=args.temperature)
    modes = {"greedy": None, f"T={args.temperature:g}": sampled}
    settings = {"draft alone": lambda p: generate(draft, [p], max_new_tokens=new_tokens)}
    for mode, sp in modes.items():
        settings[f"{mode} plain"] = lambda p, sp=sp: generate(target, [p], max_new_tokens=new_tokens, sampling=sp)
        for k in args.ks:
            settings[f"{mode} k={k}"] = lambda p, sp=sp, k=k: generate(
                target, [p], max_new_tokens=new_tokens, sampling=sp, draft=DraftModel(draft, k=k)
            )
    for k in args.ks:  # the same rounds without a draft model: what verifying k drafts costs in the loop
        settings[f"lookup k={k}"] = lambda p, k=k: generate(
            target, [p], max_new_tokens=new_tokens, draft=PromptLookup(ngram=3, k=k)
        )
    times, outs = time_settings(settings, text_prompts, repeats)
    c = times["draft alone"] / times["greedy plain"]
    # v: the target's pass over k+1 tokens against a one-token pass, at the cache length speculative decoding uses.
    cache_len = 32 + new_tokens + max(args.ks)
    costs = pass_cost(
        target,
        sorted({1} | {k + 1 for k in args.ks}),
        cache_len=cache_len,
        start=TEXT_PROMPT + new_tokens // 2,
        passes=128 if not q else 8,
        repeats=2 * repeats + 1,
    )
    draft_rows = []
    for mode in modes:
        plain = times[f"{mode} plain"]
        for k in args.ks:
            name = f"{mode} k={k}"
            o = outs[name]
            a = weighted_acceptance(o)
            alpha = per_token_alpha(a, k)
            v = costs[k + 1] / costs[1]
            speedup = plain / times[name]
            ideal_c, ideal_v = ideal(alpha, k, k * c + 1), ideal(alpha, k, k * c + v)
            draft_rows.append(
                {
                    "mode": mode,
                    "k": k,
                    "a": a,
                    "alpha": alpha,
                    "ideal_with_a": ideal(a, k, k * c + 1),
                    "tpp": float(np.mean([x.tokens_per_pass for x in o])),
                    "plain_tps": total / plain,
                    "tps": total / times[name],
                    "speedup": speedup,
                    "ideal": ideal_c,
                    "frac": speedup / ideal_c,
                    "v": v,
                    "ideal_v": ideal_v,
                    "frac_v": speedup / ideal_v,
                    "same": same_tokens(o, outs["greedy plain"]) if mode == "greedy" else None,
                }
            )
    load1 = os.getloadavg()

    # The tables.
    print("\n| prompt lookup (ngram:k) | tok/s | speedup | identical | acceptance | tok/pass |")
    print("|---|---|---|---|---|---|")
    for r in lookup_rows:
        extra = "" if r["a"] is None else f"{r['a']:.2f} | {r['tpp']:.2f}"
        print(
            f"| {r['setting']:<11} | {r['tps']:7.1f} | {r['speedup']:5.2f}x | {'yes' if r['same'] else 'NO'} | "
            f"{extra or '- | -'} |"
        )
    print(
        f"\n2. draft model, text prompts: c = {c:.3f} (draft alone {total / times['draft alone']:.0f} tok/s, "
        f"target alone {total / times['greedy plain']:.0f} tok/s); v(K) = target pass over K tokens / one-token pass: "
        + ", ".join(f"v({K})={costs[K] / costs[1]:.2f}" for K in sorted(costs) if K > 1)
        + f" ({1e3 * costs[1]:.2f} ms per one-token pass)"
    )

    def per_round(name):  # ms per target pass, prefill counted as one
        return 1e3 * times[name] / sum(o.num_steps + 1 for o in outs[name])

    print(
        f"time per target pass in the loop (greedy, ms; prefill counted as one pass): "
        f"plain {per_round('greedy plain'):.3f}; "
        + "; ".join(
            f"k={k}: lookup {per_round(f'lookup k={k}'):.3f}, draft {per_round(f'greedy k={k}'):.3f}" for k in args.ks
        )
        + f"; draft model alone {per_round('draft alone'):.3f} per step"
    )
    print(
        "\n| sampling | k | a | alpha | tok/pass | plain tok/s | spec tok/s | speedup | ideal | speedup/ideal | "
        "v | ideal_v | speedup/ideal_v | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in draft_rows:
        same = "-" if r["same"] is None else ("yes" if r["same"] else "NO")
        print(
            f"| {r['mode']} | {r['k']} | {r['a']:.2f} | {r['alpha']:.2f} | {r['tpp']:.2f} | "
            f"{r['plain_tps']:.0f} | {r['tps']:.0f} | "
            f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['frac']:.0%} | {r['v']:.2f} | {r['ideal_v']:.2f}x | "
            f"{r['frac_v']:.0%} | {same} |"
        )
    best_lookup = max((r for r in lookup_rows if r["a"] is not None), key=lambda r: r["speedup"])
    met = sum(r["frac"] >= 0.8 for r in draft_rows)
    print(
        f"\nprompt lookup: best {best_lookup['speedup']:.2f}x ({best_lookup['setting']}); target >= 2x: "
        f"{'MET' if best_lookup['speedup'] >= 2 else 'MISSED'}"
    )
    print(
        f"draft model: speedup >= 80% of the ideal in {met} of {len(draft_rows)} settings "
        f"(best {max(r['frac'] for r in draft_rows):.0%}, "
        f"k c + v counted: best {max(r['frac_v'] for r in draft_rows):.0%})"
    )
    print(f"wall {time.perf_counter() - t_start:.0f} s; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end")
    results = os.path.join(work, "results.json")
    os.makedirs(work, exist_ok=True)
    with open(results, "w", encoding="utf-8") as f:
        json.dump(
            {
                "argv": sys.argv,
                "models": infos,
                "copy_accuracy": copy_acc,
                "c": c,
                "pass_cost_s": costs,
                "lookup": lookup_rows,
                "draft": draft_rows,
            },
            f,
            indent=1,
            default=float,
        )
    print(f"figures: {results}")
    identical = all(r["same"] for r in lookup_rows) and all(r["same"] is not False for r in draft_rows)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
