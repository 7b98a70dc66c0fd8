"""int8 weights and int8 KV cache against fp32: val loss, greedy agreement, bytes, decode tokens/s, a matvec.

    python bench/quant.py --ckpt RUN                     # quality + speed on a run trained here
    python bench/quant.py --speed-only --preset gpt2-small --dtype bfloat16 --new-tokens 128   # random weights
    python bench/quant.py --matvec-only                  # the 2048 x 8192 matrix-vector product alone

Quality (needs --ckpt): the run's own validation split (the last val_fraction of its data, read
from the path in its config, relative to the working directory), in windows of the run's context.
- val loss, teacher forced. With the int8 KV cache the windows go through the cache: one prefill
  call per window writes every key and value into an int8 cache and every query attends to the
  dequantized entries, its own included, exactly as in decoding. Each token's int8 entry and
  scale depend on that token alone (per-token-per-head scales), so this is the same computation
  as decoding the window token by token; the script checks that on a few windows (max |logprob
  difference| between the two) rather than assuming it.
- greedy agreement: 8 prompts (16 tokens from 8 windows) continued by 256 greedy tokens each;
  positions where the variant's token equals fp32's, and the mean length of the common prefix
  (after a first difference a row follows its own text, so later positions say little).
Bytes: parameters as stored (int8 values + float32 scales + float norms, biases, positions), and
the KV cache generate allocates for batch 8. Speed: generate's tokens/s at batch 1 and 8 (compile
excluded: a shorter warm-up call in the same bucket compiles the program), best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.decode import generate
from arjax.decode.loop import bucket
from arjax.model import Transformer, get_config, init_cache, int8, quantize

VARIANTS = {  # name: (int8 weights, kv cache dtype)
    "fp": (False, None),
    "int8 weights": (True, None),
    "int8 KV": (False, "int8"),
    "int8 weights + KV": (True, "int8"),
}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def cross_entropy(logits, targets):
    """Mean next-token NLL; logits [B, T, V], targets [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def window_logits(model, x, kv):
    """Teacher-forced logits [B, T, V]: no cache (kv None), or through a fresh cache of dtype kv."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, x):
        m = nnx.merge(graphdef, params)
        if kv is None:
            return m(x)[0]
        B, T = x.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return m(x, positions, init_cache(m.cfg, B, T, kv))[0]

    return run(params, x)


def stepwise_logits(model, x, kv):
    """The same logits, one token at a time through the cache (what decoding computes)."""
    graphdef, params = nnx.split(model)
    B, T = x.shape

    @jax.jit
    def run(params, x):
        m = nnx.merge(graphdef, params)

        def step(cache, t):
            tok = jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
            logits, cache = m(tok, jnp.full((B, 1), t, jnp.int32), cache)
            return cache, logits[:, 0]

        _, out = jax.lax.scan(step, init_cache(m.cfg, B, T, kv), jnp.arange(T))
        return out.swapaxes(0, 1)

    return run(params, x)


def quality(models, windows, *, batch, prompts, new_tokens):
    """Val loss per variant (teacher forced), the stepwise check, and greedy agreement with fp."""
    out = {}
    x, y = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])
    for name, (w8, kv) in VARIANTS.items():
        losses = [
            float(cross_entropy(window_logits(models[w8], x[i : i + batch], kv), y[i : i + batch]))
            for i in range(0, len(x), batch)
        ]
        out[name] = {"val_loss": float(np.mean(losses))}
    base = out["fp"]["val_loss"]
    for name in VARIANTS:
        out[name]["val_loss_rel"] = out[name]["val_loss"] / base - 1
    # Through the cache in one pass == token by token (int8 weights + int8 KV, 4 windows).
    # The fp cache's figure is float rounding alone (other matmul shapes, other summation order);
    # with int8 an entry a rounding apart can also land on the other side of a half step.
    for name in ("fp", "int8 weights + KV"):
        w8, kv = VARIANTS[name]
        one = window_logits(models[w8], x[:4], kv or "float32")
        step = stepwise_logits(models[w8], x[:4], kv or "float32")
        out[name]["stepwise_max_abs_logprob_diff"] = float(
            jnp.abs(jax.nn.log_softmax(one) - jax.nn.log_softmax(step)).max()
        )

    ref = generate(models[False], prompts, max_new_tokens=new_tokens).tokens
    for name, (w8, kv) in VARIANTS.items():
        got = generate(models[w8], prompts, max_new_tokens=new_tokens, kv_cache_dtype=kv).tokens
        same = got == ref
        prefix = [int(np.argmin(r)) if not r.all() else len(r) for r in same]
        out[name].update(
            greedy_agree=float(same.mean()),
            greedy_prefix=float(np.mean(prefix)),
            rows_identical=int(sum(r.all() for r in same)),
        )
    return out


def sizes(models, cfg, batch, cache_len):
    w = {k: nbytes(nnx.state(m)) for k, m in models.items()}
    kv = {}
    for dtype in (None, "int8"):
        c = init_cache(cfg, batch, cache_len, dtype)
        kv[dtype] = nbytes((c.k, c.v, c.k_scale, c.v_scale))
    return {
        "weights_fp": w[False],
        "weights_int8": w[True],
        "cache_fp": kv[None],
        "cache_int8": kv["int8"],
        "cache_batch": batch,
        "cache_len": cache_len,
    }


HOISTED = "int8 weights, hoisted"  # int8 weights with XLA's default: the conversion hoisted out of the loop


def decode_speed(models, *, batches, prompt_len, new_tokens, repeats, variants=(*VARIANTS, HOISTED), on_row=None):
    """tokens/s of generate per (variant, batch); compile excluded. ``on_row(rows)`` after each one."""
    V = models[False].cfg.vocab_size
    rows = []
    variants = {name: VARIANTS.get(name, (True, None)) for name in variants}
    for B in batches:
        rng = np.random.RandomState(B)
        prompts = [list(rng.randint(1, V, prompt_len)) for _ in range(B)]
        for name, (w8, kv) in variants.items():
            int8.CONVERT_EACH_STEP = name != HOISTED
            jax.clear_caches()  # the flag is read when tracing: trace again

            def run(n, model=models[w8], prompts=prompts, kv=kv):
                return generate(model, prompts, max_new_tokens=n, kv_cache_dtype=kv)

            run(bucket(new_tokens) // 2 + 1 if bucket(new_tokens) > 16 else 1)  # compiles: same bucket as new_tokens
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                run(new_tokens)
                best = min(best, time.perf_counter() - t)
            rows.append({"variant": name, "batch": B, "tokens_per_s": B * new_tokens / best})
            print(f"  batch {B:>2}  {name:<22} {B * new_tokens / best:>10,.1f} tokens/s", flush=True)
            if on_row is not None:
                on_row(rows)
    int8.CONVERT_EACH_STEP = True
    jax.clear_caches()
    return rows


def matvec(K=2048, N=8192, steps=32, repeats=10):
    """x [1, K] @ W [K, N]: fp32 vs int8 (convert + scale), alone and inside a fori_loop of `steps`."""
    W = jax.random.normal(jax.random.key(0), (K, N), jnp.float32) * 0.02
    q, s = int8.quantize_int8(W, axis=0)
    x = jax.random.normal(jax.random.key(1), (1, K), jnp.float32)

    def int8_matvec(x, q, s, barrier):
        if barrier:
            x, q = jax.lax.optimization_barrier((x, q))
        return (x @ q.astype(jnp.float32)) * s

    def looped(body):
        return jax.jit(
            lambda x, *w: jax.lax.fori_loop(
                0, steps, lambda i, y: y + body(x + y[:, :K] * 1e-9, *w)[:, :K], jnp.zeros((1, K))
            )
        )

    fns = {
        "fp32, one call": (jax.jit(lambda x, W: x @ W), (x, W), 1),
        "int8, one call": (jax.jit(lambda x, q, s: int8_matvec(x, q, s, False)), (x, q, s), 1),
        "fp32, per step of a loop": (looped(lambda x, W: x @ W), (x, W), steps),
        "int8, per step, convert hoisted": (looped(lambda x, q, s: int8_matvec(x, q, s, False)), (x, q, s), steps),
        "int8, per step, convert each step": (looped(lambda x, q, s: int8_matvec(x, q, s, True)), (x, q, s), steps),
    }
    out = {}
    for name, (fn, args, n) in fns.items():
        jax.block_until_ready(fn(*args))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best = min(best, time.perf_counter() - t)
        out[name] = best / n * 1e3
        print(f"  {name:<36} {out[name]:8.3f} ms", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", metavar="RUN", help="run directory of `arjax train` (quality + speed)")
    p.add_argument("--speed-only", action="store_true", help="decode speed only, on random weights of --preset")
    p.add_argument("--matvec-only", action="store_true", help="the matrix-vector product only")
    p.add_argument("--preset", default="gpt2-small", help="model preset for --speed-only")
    p.add_argument(
        "--dtype", default="float32", help="--speed-only: compute dtype, and the float weights are stored in it"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=INT", help="--speed-only: preset override, e.g. n_layers=16"
    )
    p.add_argument("--windows", type=int, default=256, help="validation windows for the val loss")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per prompt (agreement and speed)")
    p.add_argument(
        "--speed-tokens", type=int, default=None, help="new tokens for the speed runs (default --new-tokens)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        nargs="+",
        default=[*VARIANTS, HOISTED],
        choices=[*VARIANTS, HOISTED],
        metavar="NAME",
        help=f"speed variants (default: all): {', '.join(repr(v) for v in [*VARIANTS, HOISTED])}",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    result = {"device": jax.devices()[0].device_kind}

    def save(rows=None):  # after every speed row too, so a run cut short by a timeout keeps what it measured
        if rows is not None:
            result["speed"] = rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if args.matvec_only:
        result["matvec_ms"] = matvec()
    elif args.speed_only:
        result["dtype"] = args.dtype
        overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        cfg = get_config(args.preset, dtype=args.dtype, **overrides)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        # Float weights stored in the compute dtype: the baseline reads bf16 weights, as a served bf16 model does.
        nnx.update(model, jax.tree.map(lambda x: x.astype(args.dtype), nnx.state(model, nnx.Param)))
        models = {False: model, True: quantize(model)}
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        print(
            f"{args.preset} {overrides or ''} ({n / 1e6:.0f}M params, {args.dtype}), random weights: decode, prompt "
            f"{args.prompt_len}, {args.speed_tokens or args.new_tokens} new tokens",
            flush=True,
        )
        result["bytes"] = sizes(
            models, cfg, max(args.batches), bucket(args.prompt_len) + bucket(args.speed_tokens or args.new_tokens)
        )
        result["speed"] = decode_speed(
            models,
            batches=args.batches,
            prompt_len=args.prompt_len,
            new_tokens=args.speed_tokens or args.new_tokens,
            repeats=args.repeats,
            variants=args.variants,
            on_row=save,
        )
    else:
        if not args.ckpt:
            p.error("pass --ckpt RUN, or --speed-only / --matvec-only")
        from arjax.train import data as data_lib
        from arjax.train.checkpoint import load_model

        model, tokenizer, train_cfg = load_model(args.ckpt)
        cfg = model.cfg
        models = {False: model, True: quantize(model)}
        T = train_cfg.context_len(cfg)
        text = data_lib.read_text(train_cfg.data, train_cfg.data_errors)
        val = data_lib.tokenize_and_split(text, tokenizer, val_fraction=train_cfg.val_fraction).val
        windows = data_lib.eval_windows(val, n_windows=args.windows, seq_len=T)
        prompts = [list(w[: args.prompt_len]) for w in windows[:: max(1, len(windows) // 8)][:8]]
        if args.prompt_len + args.new_tokens > cfg.max_len:
            p.error(f"--prompt-len + --new-tokens exceeds the model's max_len {cfg.max_len}")
        print(
            f"{args.ckpt}: {sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))):,} params, context {T}; "
            f"{args.windows} val windows ({args.windows * T:,} tokens)",
            flush=True,
        )
        q = quality(models, windows, batch=16, prompts=prompts, new_tokens=args.new_tokens)
        result["quality"] = q
        for name, r in q.items():
            print(
                f"  {name:<18} val loss {r['val_loss']:.4f} ({r['val_loss_rel']:+.3%})  "
                f"greedy: {r['greedy_agree']:.1%} "
                f"of 8 x {args.new_tokens} tokens equal to fp, common prefix {r['greedy_prefix']:.0f}, "
                f"{r['rows_identical']}/8 rows identical",
                flush=True,
            )
        print(
            f"  through the cache in one pass vs token by token, max |logprob diff|: fp32 cache "
            f"{q['fp']['stepwise_max_abs_logprob_diff']:.2e}, int8 weights + KV "
            f"{q['int8 weights + KV']['stepwise_max_abs_logprob_diff']:.2e}"
        )
        cache_len = bucket(args.prompt_len) + bucket(args.new_tokens)
        result["bytes"] = sizes(models, cfg, 8, min(cache_len, cfg.max_len))
        print("decode speed (generate, compile excluded):", flush=True)
        result["speed"] = decode_speed(
            models,
            batches=args.batches,
            prompt_len=args.prompt_len,
            new_tokens=args.speed_tokens or args.new_tokens,
            repeats=args.repeats,
            variants=args.variants,
            on_row=save,
        )
    if "bytes" in result:
        b = result["bytes"]
        print(
            f"bytes: weights {b['weights_fp'] / 1e6:.2f} MB -> {b['weights_int8'] / 1e6:.2f} MB "
            f"({b['weights_int8'] / b['weights_fp']:.2f}x); "
            f"KV cache (batch {b['cache_batch']}, {b['cache_len']} slots) "
            f"{b['cache_fp'] / 1e6:.2f} MB -> {b['cache_int8'] / 1e6:.2f} MB ({b['cache_int8'] / b['cache_fp']:.2f}x)"
        )
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
