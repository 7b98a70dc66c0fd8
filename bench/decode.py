"""Decode throughput: arjax generate vs Hugging Face transformers generate on the same weights,
against the memory roofline.

    python bench/decode.py            # gpt2-small and shakespeare-char sizes, batch 1 and 8
    python bench/decode.py --quick    # fewer tokens and repeats (a smoke run, not for the record)

For each model a random-initialised transformers model is built from a config and converted
(arjax.model.hf), so both sides hold identical weights. Before timing, the same run checks that
both produce the same greedy tokens. Times exclude compilation (a warm-up call first) and are the
best of ``--repeats`` runs. The roofline: one decode step must read every weight and the KV cache
it attends over, so tokens/s <= batch * bandwidth / (weight bytes + KV bytes), with the bandwidth
measured on the spot by a jitted reduction over a large array.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from arjax.decode import generate
from arjax.decode.loop import bucket
from arjax.model import hf

MODELS = {
    # GPT-2 small (124M): transformers' GPT2Config defaults.
    "gpt2-small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # nanoGPT's shakespeare_char model size (with GPT-2's biases, as transformers builds it).
    "shakespeare-char": dict(vocab_size=65, n_positions=256, n_embd=384, n_layer=6, n_head=6),
}


def measure_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s over an n_bytes float32 array, far larger than any cache.

    Two read-only kernels, a full reduction and a matrix-vector product (the shape of a decode
    step's weight reads); the best time of either counts, so the roofline is not set by a slow kernel.
    """
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    ones = jnp.ones((1024,), jnp.float32)
    kernels = [jax.jit(jnp.sum), jax.jit(lambda x: x.reshape(-1, 1024) @ ones)]
    best = float("inf")
    for kernel in kernels:
        kernel(x).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            kernel(x).block_until_ready()
            best = min(best, time.perf_counter() - t)
    return n_bytes / best


def build(name: str, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**MODELS[name], bos_token_id=None, eos_token_id=None)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    return ref, hf.from_hf_model(ref)


def hf_generate(ref, prompts, new_tokens):
    import torch

    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = ref.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return out[:, P:].numpy()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def roofline_bytes(model, batch: int, cache_len: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step reads."""
    from flax import nnx

    cfg = model.cfg
    params = nnx.state(model, nnx.Param)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if cfg.pos == "learned":  # a step reads one row of the position table, not all of it
        weight_bytes -= cfg.max_len * cfg.d_model * 4
    kv_bytes = (
        2 * cfg.n_layers * batch * cache_len * cfg.num_kv_heads * cfg.dim_per_head * jnp.dtype(cfg.dtype).itemsize
    )
    return weight_bytes, kv_bytes


def run(
    name: str,
    batch: int,
    *,
    prompt_len: int,
    new_tokens: int,
    check_tokens: int,
    repeats: int,
    bandwidths: list,
    models: dict,
) -> dict:
    if name not in models:
        models[name] = build(name)
    ref, ours = models[name]
    V = ours.cfg.vocab_size
    rng = np.random.RandomState(batch)
    # Prompts of different lengths (left-padded on both sides), as a server would see them.
    prompts = [list(rng.randint(1, V, max(1, prompt_len - 3 * i))) for i in range(batch)]

    # 1. Same greedy tokens, in this run, on these weights.
    ours_check = generate(ours, prompts, max_new_tokens=check_tokens).tokens
    hf_check = hf_generate(ref, prompts, check_tokens)
    same = bool((ours_check == hf_check).all())
    agree = float((ours_check == hf_check).mean())

    # 2. Timings: warm-up (compile for arjax), then arjax and HF runs alternate, best of `repeats`
    # each: on a shared machine the load drifts, and alternating exposes both sides to the same drift.
    # The bandwidth is sampled here too; the best sample is the least contended one.
    bandwidths.append(measure_bandwidth(repeats=3))
    generate(ours, prompts, max_new_tokens=new_tokens)
    hf_generate(ref, prompts, new_tokens)
    t_ours = t_hf = float("inf")
    for _ in range(repeats):
        t_ours = min(t_ours, best_time(lambda: generate(ours, prompts, max_new_tokens=new_tokens), 1))
        t_hf = min(t_hf, best_time(lambda: hf_generate(ref, prompts, new_tokens), 1))

    cache_len = min(ours.cfg.max_len, bucket(prompt_len) + bucket(new_tokens))  # what generate allocates
    w_bytes, kv_bytes = roofline_bytes(ours, batch, cache_len)
    ours_tps, hf_tps = batch * new_tokens / t_ours, batch * new_tokens / t_hf
    return dict(
        model=name,
        batch=batch,
        same_greedy=same,
        agree=agree,
        ours_tps=ours_tps,
        hf_tps=hf_tps,
        speedup=ours_tps / hf_tps,
        step_bytes=w_bytes + kv_bytes,
        weight_mb=w_bytes / 1e6,
        kv_mb=kv_bytes / 1e6,
        cache_len=cache_len,
    )


def add_roofline(r: dict, bandwidth: float) -> None:
    r["roof_tps"] = r["batch"] * bandwidth / r["step_bytes"]
    r["roof_frac"] = r["ours_tps"] / r["roof_tps"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat, batch 1 only")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = args.batches or ([1] if args.quick else [1, 8])
    check_tokens = min(32, new_tokens)

    import torch

    bandwidths = [measure_bandwidth()]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; prompt {args.prompt_len}, "
        f"{new_tokens} new tokens, best of {repeats}"
    )
    rows, models = [], {}
    for name in args.models:
        for b in batches:
            r = run(
                name,
                b,
                prompt_len=args.prompt_len,
                new_tokens=new_tokens,
                check_tokens=check_tokens,
                repeats=repeats,
                bandwidths=bandwidths,
                models=models,
            )
            add_roofline(r, max(bandwidths))
            rows.append(r)
            print(
                f"  {name} batch {b}: greedy tokens identical={r['same_greedy']}, arjax {r['ours_tps']:.1f} tok/s, "
                f"HF {r['hf_tps']:.1f} tok/s, roofline {r['roof_tps']:.1f} tok/s",
                flush=True,
            )
        models.pop(name, None)

    bandwidth = max(bandwidths)
    for r in rows:
        add_roofline(r, bandwidth)
    print(
        f"\nread bandwidth: best {bandwidth / 1e9:.1f} GB/s of {len(bandwidths)} samples "
        f"({', '.join(f'{b / 1e9:.1f}' for b in bandwidths)} GB/s); the roofline below uses the best"
    )
    head = (
        f"| {'model':<16} | batch | same greedy ({check_tokens}) | arjax tok/s | HF tok/s | arjax/HF | "
        "roofline tok/s | arjax/roofline | weights MB | KV MB |"
    )
    print()
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        same = "yes" if r["same_greedy"] else f"NO ({r['agree']:.0%} agree)"
        print(
            f"| {r['model']:<16} | {r['batch']:>5} | {same:>17} | {r['ours_tps']:>11.1f} | {r['hf_tps']:>8.1f} | "
            f"{r['speedup']:>7.2f}x | {r['roof_tps']:>14.1f} | {r['roof_frac']:>13.0%} | "
            f"{r['weight_mb']:>10.1f} | {r['kv_mb']:>5.1f} |"
        )
    return 0 if all(r["same_greedy"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
