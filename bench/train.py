"""Training benchmark: nanoGPT's shakespeare-char CPU recipe, final val loss, tokens/s (per device) and MFU.

    python bench/train.py                      # the full 2000-step run (a few minutes on 2 cores)
    python bench/train.py --steps 200          # a quick look (val loss will be far from the target)
    python bench/train.py --config tpu_configs/shakespeare-char-cpu.yaml \
                          --config tpu_configs/shakespeare-char-cpu-ss.yaml   # teacher forcing vs scheduled sampling
    python bench/train.py --synthetic --config tpu_configs/gpt2-small-gpu.yaml --steps 40 \
                          --set accum_steps=1 --mesh data=1                    # GPU throughput (bench/gpu_train.sh)

Several --config flags train one after the other in the same process and print one table, so the
objectives are compared on the same machine in the same run. ``--synthetic`` trains on uniformly
random token ids of the model's vocabulary (no corpus, no tokenizer): for throughput only.

Targets (the CPU recipe): val loss <= 1.89 (nanoGPT's README reports ~1.88 for this recipe) and
model FLOPs >= 50% of the machine's matmul peak, measured in the same process with a large jitted
matmul. On an accelerator the peak is its spec sheet's (``arjax.train.perf``); MFU is per device:
tokens/s per device x FLOPs per token / one device's peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from arjax.model.rng import numpy_rng
from arjax.model.sharding import AXES
from arjax.train.cli.common import UsageError
from arjax.train.cli.train import parse_set
from arjax.train.config import from_dict, load_yaml
from arjax.train.loop import fit, train
from arjax.train.perf import device_memory_bytes, device_peak_flops, flops_per_token, matmul_peak_flops, mfu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class RandomTokens:
    """Synthetic training batches: uniform random token ids, a pure function of (seed, step) like every batch source."""

    vocab_size: int
    seq_len: int

    def batch(self, *, batch_size: int, seed: int, step: int, rows=None, **_) -> np.ndarray:
        """[batch_size, seq_len + 1] int32; with ``rows`` (indices into them) only those rows, as a
        host of several reads."""
        windows = numpy_rng(seed, step).integers(
            0, self.vocab_size, size=(batch_size, self.seq_len + 1), dtype=np.int32
        )
        return windows if rows is None else windows[rows]


def parse_mesh(text: str) -> dict[str, int]:
    """``data=4,model=2`` -> {"data": 4, "model": 2}. Syntax only: the run config checks axes and sizes."""
    mesh: dict[str, int] = {}
    for item in text.split(","):
        name, eq, size = (part.strip() for part in item.partition("="))
        try:
            if not eq or name in mesh:
                raise ValueError
            mesh[name] = int(size)
        except ValueError:
            raise UsageError(
                f"--mesh {text!r}: {item!r} is not AXIS=SIZE with a new axis and a whole size; "
                f"e.g. --mesh data=4,model=2 or --mesh data=-1 (axes: {', '.join(AXES)})"
            ) from None
    return mesh


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key (as `arjax train` merges --set)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def mesh_devices(mesh: dict | None) -> int:
    """How many devices one step runs on: the mesh's size when every axis is given, else all of them."""
    if mesh and all(v > 0 for v in mesh.values()):
        return math.prod(mesh.values())
    return jax.device_count()


def train_synthetic(cfg, run_dir: str, quiet: bool) -> dict[str, Any]:
    """``cfg``'s model trained through the one loop (``fit``) on random tokens of its vocabulary."""
    model_cfg = cfg.model_config(vocab_size=None)
    T = cfg.context_len(model_cfg)
    source = RandomTokens(model_cfg.vocab_size, T)
    # Stream 2**32: no training step draws from it (steps are 32-bit), so val windows are not train windows.
    val = numpy_rng(cfg.seed, 2**32).integers(
        0, model_cfg.vocab_size, size=(cfg.eval_iters, cfg.batch_size, T + 1), dtype=np.int32
    )
    return fit(cfg, run_dir, model_cfg=model_cfg, source=source, val_windows=val, quiet=quiet)


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", action="append", help="run config, repeatable (default: tpu_configs/shakespeare-char-cpu.yaml)"
    )
    p.add_argument(
        "--data",
        default=os.path.join(ROOT, "../shared/data/tinyshakespeare.txt"),
        help="text file (default: %(default)s)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="train on random token ids of the model's vocabulary (no data, no tokenizer)",
    )
    p.add_argument("--steps", type=int, help="override the config's steps (default: the config's)")
    p.add_argument(
        "--mesh",
        help="device mesh for the trainer, e.g. data=4,model=2 or data=-1 "
        f"(axes: {', '.join(AXES)}; -1: the devices left over)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a config key (YAML value), repeatable: --set accum_steps=1 --set model.dtype=float32",
    )
    p.add_argument("--json", metavar="FILE", help="also write each run's figures to FILE (a JSON list), for scripts")
    p.add_argument(
        "--matmul-n",
        type=int,
        default=2048,
        help="side of the square matmul that measures a CPU's peak (default: %(default)s)",
    )
    args = p.parse_args(argv)

    configs = args.config or [os.path.join(ROOT, "tpu_configs/shakespeare-char-cpu.yaml")]
    overrides: dict[str, Any] = {} if args.synthetic else {"data": os.path.abspath(args.data)}
    if args.steps:
        overrides["steps"] = args.steps
    try:
        sets = parse_set(args.set)
        mesh = parse_mesh(args.mesh) if args.mesh else None
    except UsageError as e:
        p.error(str(e))
    cfgs = []
    for path in configs:
        try:
            d = _merged({**load_yaml(path, "config file", "tpu_configs/"), **overrides}, sets)
            if mesh is not None:
                d["mesh"] = mesh  # the flag names the whole mesh; no axis of the file's survives
            cfgs.append(from_dict(d))
        except (TypeError, ValueError) as e:
            p.error(f"{path}: {e}")

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    memory = device_memory_bytes(device)
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPUs visible" + (f", {memory / 2**30:.1f} GiB per device" if memory else "")
    )
    dtypes = [c.model_config(vocab_size=None).dtype for c in cfgs]
    # On CPU the peak is measured, before and after every run: a busy neighbour lowers some samples, not all.
    samples: dict[str, list[float]] = (
        {dt: [matmul_peak_flops(args.matmul_n, dt, budget_s=math.inf)] for dt in dtypes} if on_cpu else {}
    )
    results = []
    for cfg, dt in zip(cfgs, dtypes):
        with tempfile.TemporaryDirectory() as out:
            quiet = not sys.stdout.isatty()
            result = train_synthetic(cfg, out, quiet) if args.synthetic else train(cfg, out, quiet=quiet)
        result.pop("model")  # free the device memory before the next run
        stats = device.memory_stats() or {}
        result["peak_bytes"] = stats.get("peak_bytes_in_use")
        results.append(result)
        if on_cpu:
            samples[dt].append(matmul_peak_flops(args.matmul_n, dt, budget_s=math.inf))

    for dt, xs in samples.items():
        print(
            f"matmul peak     {max(xs) / 1e9:.1f} GFLOP/s {dt} ({args.matmul_n}^2 jitted matmul; samples "
            + ", ".join(f"{x / 1e9:.1f}" for x in xs)
            + ")"
        )
    records = []
    for path, cfg, dt, result in zip(configs, cfgs, dtypes, results):
        T = result["seq_len"]
        fpt = flops_per_token(result["model_config"], T)
        n_dev = mesh_devices(cfg.mesh)
        per_device = result["tokens_per_s"] / n_dev
        achieved = per_device * fpt
        if on_cpu:
            peak, source = max(samples[dt]), f"measured, {args.matmul_n}^2 {dt} jitted matmul"
        else:
            peak, source = device_peak_flops(device, dt) or (None, "")
        val = result["val_losses"][-1][1]
        ms = cfg.accum_steps * cfg.batch_size * T / result["tokens_per_s"] * 1e3
        objective = "teacher forcing" if cfg.scheduled_sampling is None else cfg.scheduled_sampling.describe()
        print(
            f"\nconfig          {os.path.relpath(path, ROOT)} ({result['final_step']} steps, "
            f"{result['n_params'] / 1e6:.2f}M params, "
            f"context {T}, {cfg.batch_size} x {cfg.accum_steps} windows per step, {dt})"
        )
        print(f"objective       {objective}")
        if args.synthetic:
            print(
                f"data            synthetic: uniform random token ids < {result['model_config'].vocab_size} "
                f"(loss floor ln V = {math.log(result['model_config'].vocab_size):.2f})"
            )
        if cfg.mesh is not None:
            print(f"mesh            {cfg.mesh} -> {n_dev} device(s)")
        if "mix_rate" in result["history"]:
            h = result["history"]
            print(
                f"mixing          gold probability {h['gold_prob'][-1]:.3f}, "
                f"realised mixing rate {h['mix_rate'][-1]:.3f}, "
                f"differ rate {h['differ_rate'][-1]:.3f} (last step)"
            )
        if args.synthetic:
            print(f"final val loss  {val:.4f}")
        else:
            print(f"final val loss  {val:.4f}   (target <= 1.89, nanoGPT ~1.88)  {'PASS' if val <= 1.89 else 'MISS'}")
        print(f"train loss      {result['losses'][-1]:.4f}")
        print(
            f"throughput      {result['tokens_per_s']:,.0f} tokens/s, {ms:.1f} ms/step (compile excluded); "
            f"wall {result['wall_s']:.0f} s"
        )
        print(f"per device      {per_device:,.0f} tokens/s ({n_dev} device(s))")
        print(f"model FLOPs     {fpt / 1e6:.2f} MFLOP/token (teacher-forced count) -> {_rate(achieved)} per device")
        if result["peak_bytes"] is not None:
            print(
                f"device memory   {result['peak_bytes'] / 2**30:.1f} GiB peak in use"
                + (f" of {memory / 2**30:.1f} GiB" if memory else "")
            )
        m = None if peak is None else mfu(per_device, fpt, peak)
        records.append(
            {
                "config": os.path.relpath(path, ROOT),
                "device_kind": device.device_kind,
                "platform": device.platform,
                "n_devices": n_dev,
                "mesh": cfg.mesh,
                "dtype": dt,
                "steps": result["final_step"],
                "batch_size": cfg.batch_size,
                "accum_steps": cfg.accum_steps,
                "seq_len": T,
                "n_params": result["n_params"],
                "tokens_per_s": result["tokens_per_s"],
                "tokens_per_s_per_device": per_device,
                "flops_per_token": fpt,
                "peak_flops": peak,
                "peak_source": source,
                "mfu": m,
                "val_loss": val,
                "train_loss": result["losses"][-1],
                "peak_bytes_in_use": result["peak_bytes"],
            }
        )
        if m is None:
            print(f"MFU             unknown: no peak FLOP/s for {device.device_kind!r} in arjax.train.perf")
            continue
        target = f"   (target >= 50%)  {'PASS' if m >= 0.5 else 'MISS'}" if on_cpu and not args.synthetic else ""
        print(f"MFU             {m:.1%} of {_rate(peak)} ({source}){target}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
