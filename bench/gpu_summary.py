"""The summary table of bench/gpu_session.sh: reads what its parts left in $OUT and prints one table.

    OUT=/tmp/out BATCH=16 BLOCK=1024 N_LAYER=12 python bench/gpu_summary.py

Every figure is optional: a part that was skipped or failed shows as "no result". MFU is against the
spec-sheet peak in ``arjax.train.perf``; the decode roofline is the bytes one step reads (the weights
plus the whole static KV cache, which the cached attention reads every step) over the copy bandwidth
measured in the same session (machine.txt).
"""

from __future__ import annotations

import json
import os
import re
import statistics

OUT = os.environ.get("OUT", "/tmp/out")
B, T, L = (int(os.environ.get(k, d)) for k, d in (("BATCH", 16), ("BLOCK", 1024), ("N_LAYER", 12)))
SKIP = min(
    10, int(os.environ.get("STEPS", 30)) // 3
)  # nanoGPT iterations left out of its mean (compile and warm-up), as arjax leaves out its first interval


def read(name):
    try:
        with open(os.path.join(OUT, name)) as f:
            return f.read()
    except OSError:
        return None


def first_record(name):
    text = read(name)
    try:
        return json.loads(text)[0] if text else None
    except (ValueError, IndexError):
        return None


def machine():
    text = read("machine.txt") or ""
    bw = re.search(r"copy_bw ([\d.]+) TB/s", text)
    mm = re.search(r"matmul (\d+) TFLOP/s", text)
    return (float(bw.group(1)) * 1e12 if bw else None), (float(mm.group(1)) * 1e12 if mm else None)


def nanogpt(fpt, peak):
    text = read("nanogpt.log")
    if not text:
        return None
    ms = {int(i): float(t) for i, t in re.findall(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", text, re.M)}
    kept = [t for i, t in sorted(ms.items()) if i >= SKIP]
    if not kept:
        return None
    tps = B * T / (statistics.mean(kept) / 1e3)
    return {"tokens_per_s": tps, "mfu": tps * fpt / peak if peak else None, "iters": len(kept)}


def fmt_train(label, r, base=None):
    if r is None:
        return f"{label:<34} no result"
    tps = r.get("tokens_per_s_per_device", r.get("tokens_per_s"))
    m = r.get("mfu")
    extra = f"   {tps / base:.2f}x nanoGPT" if base else ""
    mem = r.get("peak_bytes_in_use")
    mem = f"   peak {mem / 2**30:.1f} GiB" if mem else ""
    shape = f"   ({r['batch_size']} x {r['seq_len']})" if "batch_size" in r else ""
    return f"{label:<34} {tps:>10,.0f} tok/s   MFU " + (f"{m:5.1%}" if m is not None else "  n/a") + extra + mem + shape


def show_profile(name):
    prof = read(name)
    if not prof:
        print(f"\n{name}: no result")
        return
    p = json.loads(prof)
    print(
        f"\n{name}: {p['wall_ms_per_step']:.1f} ms/step wall, device busy {p['busy_ms_per_step']:.1f} ms, "
        f"idle {p['idle_fraction']:.1%}; step memory "
        + (f"{p['step_memory_bytes'] / 2**30:.2f} GiB" if p.get("step_memory_bytes") else "n/a")
    )
    print("  by class: " + ", ".join(f"{k} {v:.1%}" for k, v in p["classes"].items()))
    for kernel, ms, share in p["top"][:12]:
        print(f"  {ms:8.3f} ms {share:6.1%}  {kernel[:90]}")


def main():
    from arjax.model import get_config
    from arjax.train.perf import flops_per_token

    bw, mm_peak = machine()
    arjax = first_record("arjax.json")
    peak = arjax["peak_flops"] if arjax else None
    fpt = flops_per_token(get_config("gpt2-small", vocab_size=50304, n_layers=L), T)
    nano = nanogpt(fpt, peak)
    base = nano["tokens_per_s"] if nano else None
    print(
        f"GPU session summary: GPT-2 small ({L} layers, vocab 50304), bf16; "
        f"{fpt / 1e9:.3f} GFLOP/token; peak {peak / 1e12:.0f} TFLOP/s (spec)"
        if peak
        else "GPU session summary (no arjax result: peak unknown)"
    )
    if bw or mm_peak:
        print(
            "measured ceilings: copy "
            + (f"{bw / 1e12:.2f} TB/s" if bw else "n/a")
            + ", bf16 matmul "
            + (f"{mm_peak / 1e12:.0f} TFLOP/s" if mm_peak else "n/a")
        )
    print("\ntraining (tokens/s per device, synthetic tokens, first logged interval left out)")
    print(fmt_train(f"nanoGPT train.py, compile, {B} x {T}", nano and {**nano, "batch_size": B, "seq_len": T}))
    print(fmt_train("arjax now", arjax, base))
    print(fmt_train("arjax before the issue (0e42d1e)", first_record("old.json"), base))
    print(fmt_train("try: attention=xla", first_record("xla_attn.json"), base))
    print(fmt_train("try: XLA flags (no triton gemm, LHS)", first_record("flags.json"), base))
    print(fmt_train("long context", first_record("long.json")))
    print(fmt_train("long context, remat=dots", first_record("long_dots.json")))

    for name in ("profile.json", "profile_sharded.json"):
        show_profile(name)

    dec = read("decode.json")
    if dec:
        d = json.loads(dec)
        b = d.get("bytes", {})
        print(
            f"\ndecode ({d.get('dtype')}, generate, {os.environ.get('TOKENS', '?')} new tokens), "
            "roofline = step bytes / copy bw"
        )
        for x in d.get("speed", []):
            weights = b.get("weights_int8" if "int8" in x["variant"] else "weights_fp", 0)
            cache = b.get("cache_fp", 0) * x["batch"] / max(b.get("cache_batch", 1), 1)
            step_bytes = weights + cache
            roof = x["batch"] * bw / step_bytes if bw and step_bytes else None
            print(
                f"  {x['variant']:<14} batch {x['batch']}: {x['tokens_per_s']:>9,.0f} tok/s   "
                f"{x['batch'] / x['tokens_per_s'] * 1e3:6.3f} ms/step   step reads {step_bytes / 1e6:6.1f} MB"
                + (f"   roofline {roof:,.0f} tok/s: {x['tokens_per_s'] / roof:.0%}" if roof else "")
            )
    else:
        print("\ndecode: no result")
    skipped = read("skipped.txt")
    if skipped:
        print("\n" + skipped.strip())


if __name__ == "__main__":
    main()
