"""Where a train step's time goes: a jax.profiler trace of a few steps after warm-up, summarised.

    python bench/profile_train.py --config tpu_configs/gpt2-small-gpu.yaml --steps 5     # on the GPU
    python bench/profile_train.py --model tiny --batch-size 4 --seq-len 64 --steps 3     # the plumbing, on CPU

It compiles the train step (the one `fit` runs), runs warm-up steps, then traces ``--steps`` steps
with ``jax.profiler.trace`` (each inside a ``StepTraceAnnotation``) and reads the trace the profiler
itself wrote (``*.trace.json.gz``, Chrome trace-event JSON; the raw ``.xplane.pb`` stays beside it
for TensorBoard's or XProf's profile plugin). Printed: the top kernels/fusions by device time, the
time per class (attention, matmuls, loss, optimizer, other), the device's idle time inside the
traced window (gaps between kernels, host stalls between steps included) and the compiled step's
memory. ``--json FILE`` writes the same numbers.

Classes are read from op names, so they are approximate: XLA fuses across them (a matmul fused
with its bias and activation counts as a matmul).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.model import Transformer, sharding
from arjax.model.rng import seed_key
from arjax.train import step as step_lib
from arjax.train.config import from_dict, load_yaml
from arjax.train.loop import init_train_state
from arjax.train.optim import optimizer_from_config

CLASSES = (  # first match wins; lower-case substrings of the op or kernel name
    ("attention", ("flash", "fmha", "cudnn", "attention", "softmax", "mha")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll")),
    ("optimizer", ("adam", "optax", "scale_by", "clip", "global_norm", "weight_decay")),
    ("matmul", ("gemm", "dot", "matmul", "cublas", "nvjet", "cutlass", "convolution", "einsum", "ynn_fusion")),
)


def classify(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in CLASSES if any(k in low for k in keys)), "other")


def device_events(trace: dict) -> list[dict]:
    """Complete events ('X') on device timelines: the pids whose process name says GPU/TPU/device,
    else (CPU) the XLA executor threads' ops."""
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in trace["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, n in names.items() if any(k in n for k in ("/device:GPU", "/device:TPU", "GPU:", "TPU:"))}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    if device:
        return [e for e in events if e["pid"] in device]
    # CPU: XLA's thunks (op names carry HLO names, e.g. "fusion.12", "dot.3") on the host threads.
    return [e for e in events if e.get("args", {}).get("hlo_op") or e.get("args", {}).get("hlo_module")]


def busy_union(events: list[dict]) -> float:
    """Microseconds covered by at least one event (overlapping kernels count once)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    total, end = 0.0, -float("inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarise(trace_dir: str, steps: int, top: int = 15) -> dict:
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[:1] or [None]
    if path is None:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no trace")
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = device_events(trace)
    if not events:
        raise SystemExit(f"{path}: no device events found")
    by_name = collections.Counter()
    for e in events:
        by_name[e["name"]] += e["dur"]
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    busy = busy_union(events)
    total = sum(by_name.values())
    by_class = collections.Counter()
    for name, us in by_name.items():
        by_class[classify(name)] += us
    return {
        "trace": path,
        "steps": steps,
        "window_ms_per_step": span / 1e3 / steps,
        "busy_ms_per_step": busy / 1e3 / steps,
        "idle_fraction": 1 - busy / span if span else 0.0,
        "classes": {k: v / total for k, v in by_class.most_common()},
        "top": [(name, us / 1e3 / steps, us / total) for name, us in by_name.most_common(top)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="run config YAML (its model, batch and dtype)")
    p.add_argument("--model", help="model preset (overrides the config's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--accum-steps", type=int, help="micro-batches per step (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model.KEY=VALUE overrides")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None, help="trace directory (default: a temporary one)")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--sharded", action="store_true", help="build and compile the step as `fit` does (mesh, shardings, AOT)"
    )
    args = p.parse_args(argv)

    base = load_yaml(args.config, "run config", "tpu_configs/*.yaml") if args.config else {}
    base = {k: v for k, v in base.items() if k not in ("mesh", "data", "tokenizer", "tokenizer_path")}  # random tokens
    given = (("model", args.model), ("batch_size", args.batch_size), ("seq_len", args.seq_len))
    for key, value in (*given, ("accum_steps", args.accum_steps)):
        if value is not None:
            base[key] = value
    overrides = dict(base.get("model_overrides") or {})
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key.removeprefix("model.")] = (
            json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
        )
    base["model_overrides"] = overrides
    cfg = from_dict(base)
    model_cfg = cfg.model_config(vocab_size=None)
    T, A, B = cfg.context_len(model_cfg), cfg.accum_steps, cfg.batch_size
    tx, _ = optimizer_from_config(cfg)
    if not args.sharded:
        graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
        opt_state = tx.init(params)
    key, objective = seed_key(0), step_lib.TeacherForcing()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if args.sharded:  # the step exactly as `fit` builds, places and compiles it (one-device mesh)
        plan = sharding.make_plan({"data": 1}, "dp", model_cfg=model_cfg, batch_size=B)
        graphdef, params, opt_state, shardings = init_train_state(model_cfg, tx, plan, key)
        where = plan.batch_sharding(3, 1)
        compiled = step_lib.compiled_train_step(
            step_lib.sharded_train_step(graphdef, tx, plan, *shardings),
            plan,
            params,
            opt_state,
            jax.ShapeDtypeStruct((A, B, T + 1), np.int32, sharding=where),
            objective,
        )
        key, objective = sharding.replicate((key, objective), plan.replicated)
    else:
        where = None
        step_fn = jax.jit(step_lib._train_step_impl, static_argnums=(0, 1), donate_argnums=(2, 3))
        compiled = step_fn.lower(
            graphdef, tx, params, opt_state, jnp.zeros((A, B, T + 1), jnp.int32), jnp.int32(0), key, objective
        ).compile()

    def batch():
        return jax.device_put(rng.integers(0, model_cfg.vocab_size, (A, B, T + 1), dtype=np.int32), where)

    stats = compiled.memory_analysis()
    memory = (
        None
        if stats is None
        else (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes
        )
    )
    print(
        f"compiled in {time.perf_counter() - t0:.1f} s; step memory "
        f"{'not reported' if memory is None else f'{memory / 2**30:.2f} GiB'}",
        flush=True,
    )
    for i in range(args.warmup):
        params, opt_state, metrics = compiled(params, opt_state, batch(), jnp.int32(i), key, objective)
    jax.block_until_ready(metrics)
    out = args.out or tempfile.mkdtemp(prefix="arjax-profile-")
    with jax.profiler.trace(out):
        nxt = batch()
        t0 = time.perf_counter()  # the profiler's own start and stop (seconds of it) stay out of the wall time
        for i in range(args.steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                params, opt_state, metrics = compiled(params, opt_state, nxt, jnp.int32(i), key, objective)
                nxt = batch()
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / args.steps
    r = summarise(out, args.steps)
    r.update(
        wall_ms_per_step=wall * 1e3,
        step_memory_bytes=memory,
        tokens_per_step=A * B * T,
        tokens_per_s=A * B * T / wall,
        model=cfg.model,
        dtype=model_cfg.dtype,
        attention=model_cfg.attention,
    )
    print(
        f"\n{cfg.model} ({model_cfg.dtype}, attention {model_cfg.attention}), {A} x {B} x {T} tokens: "
        f"{wall * 1e3:.1f} ms/step wall, {r['tokens_per_s']:,.0f} tokens/s"
    )
    print(
        f"device busy {r['busy_ms_per_step']:.1f} ms of a {r['window_ms_per_step']:.1f} ms window per step "
        f"(idle {r['idle_fraction']:.1%}: gaps between kernels and between steps)"
    )
    print("time by class: " + ", ".join(f"{k} {v:.1%}" for k, v in r["classes"].items()))
    print(f"\n{'ms/step':>9} {'share':>6}  top kernels / fusions")
    for name, ms, share in r["top"]:
        print(f"{ms:9.3f} {share:6.1%}  {name[:100]}")
    print(f"\ntrace: {r['trace']} (open the .xplane.pb beside it in TensorBoard's profile plugin)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
