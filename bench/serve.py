"""Serving: `arjax serve` under load (concurrency 1, 8, 32 and Poisson arrivals) next to static-batch generate.

    python bench/serve.py            # shakespeare-char size, 32 prompts, 128 new tokens each
    python bench/serve.py --size gpt2-small
    python bench/serve.py --quick    # fewer tokens and requests (a smoke run, not for the record)

A random-initialised model (nanoGPT's shakespeare-char size, 6 layers x 384, or GPT-2 small's body,
12 x 768; byte vocabulary) with the byte tokenizer is written as a run directory and served by
`arjax serve` in a subprocess (the engine thread and the HTTP server in one process, as a user runs
it); this process is the client: one thread per in-flight request, each streaming its completion
over HTTP (server-sent events). Prompts are slices of tinyshakespeare (../shared/data; 16 to 96
bytes). Every request is greedy with the same max_tokens, so all finish on length and the token
counts are equal everywhere.

Measured per setting: throughput (completion tokens over wall time, first send to last byte), time
to first token (send -> first text) and time per output token ((last - first) / (tokens - 1)), p50
and p99. The reference, in the same run: ``generate`` on all prompts as one static batch (the same
weights, loaded here; best of 3 after a warm-up), with the same cache length as the server's slots,
and the engine alone in this process (``Engine.submit`` for every prompt, ``run_until_done``; no HTTP).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from arjax.decode import SamplingParams, generate
from arjax.model import Transformer, get_config
from arjax.train import checkpoint as ckpt
from arjax.train.tokenizer import ByteTokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


SIZES = {  # byte vocabulary (256), learned positions, 256 of them
    "shakespeare-char": dict(n_layers=6, d_model=384, n_heads=6),  # nanoGPT's recipe size, 10.7M parameters
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12),  # GPT-2 small's body, 85M parameters
}


def write_run(path: str, size: str, seed: int = 0, max_len: int = 256) -> Transformer:
    from flax import nnx

    cfg = get_config("tiny", vocab_size=256, max_len=max_len, dropout=0.0, **SIZES[size])
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    tok = ByteTokenizer()
    tok.save(ckpt.tokenizer_dir(path))
    manager = ckpt.make_manager(path)
    ckpt.save(
        manager,
        0,
        params=nnx.state(model, nnx.Param),
        meta={"model_config": cfg.to_dict(), "tokenizer": "byte", "tokenizer_sha256": ckpt.tokenizer_digest(path)},
    )
    manager.wait_until_finished()
    manager.close()
    return model


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    if os.path.isfile(DATA):
        with open(DATA, encoding="utf-8") as f:
            text = f.read()
    else:  # the shared data is missing: any text will do for timing
        text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(20000))
    out = []
    for _ in range(n):
        k = int(rng.integers(16, 97))
        i = int(rng.integers(0, len(text) - k))
        out.append(text[i : i + k].encode("ascii", "ignore").decode() or "a")
    return out


def start_server(run: str, slots: int, max_len: int, chunk_steps: int, extra: list[str] = ()):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arjax.train.cli",
            "serve",
            "--ckpt",
            run,
            "--port",
            "0",
            "--slots",
            str(slots),
            "--max-len",
            str(max_len),
            "--chunk-steps",
            str(chunk_steps),
            "--max-queue",
            "1024",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise RuntimeError(f"arjax serve did not start: {line}{proc.stderr.read()}")
    print(line.strip(), flush=True)
    url = line.split(" on http://")[1].split(" ")[0]
    host, port = url.rsplit(":", 1)
    return proc, (host, int(port))


def one_request(addr, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; returns send, first-text and end times and the token count."""
    body = json.dumps({"model": "run", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    t_send = time.perf_counter()
    conn = http.client.HTTPConnection(*addr, timeout=600)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    t_first, tokens = None, 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if t_first is None and event["choices"] and event["choices"][0]["text"]:
            t_first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    t_end = time.perf_counter()
    conn.close()
    return {"send": t_send, "first": t_first or t_end, "end": t_end, "tokens": tokens}


def closed_loop(addr, prompts, max_tokens: int, concurrency: int) -> list[dict]:
    """``concurrency`` clients, each sending its next request as soon as the last one finished."""
    results, lock, queue = [], threading.Lock(), list(prompts)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                p = queue.pop(0)
            r = one_request(addr, p, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def poisson(addr, prompts, max_tokens: int, rate: float, seed: int = 0) -> list[dict]:
    """Open loop: requests arrive at exponential gaps of mean 1/rate, whatever is in flight."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))
    results, lock, threads = [], threading.Lock(), []

    def send(p):
        r = one_request(addr, p, max_tokens)
        with lock:
            results.append(r)

    for p, gap in zip(prompts, gaps, strict=True):
        time.sleep(gap)
        t = threading.Thread(target=send, args=(p,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results


def summarize(results: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in results)
    wall = max(r["end"] for r in results) - min(r["send"] for r in results)
    ttft = np.array([r["first"] - r["send"] for r in results]) * 1e3
    tpot = np.array([(r["end"] - r["first"]) / max(r["tokens"] - 1, 1) for r in results]) * 1e3
    return {
        "requests": len(results),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "tpot_p50_ms": float(np.percentile(tpot, 50)),
        "tpot_p99_ms": float(np.percentile(tpot, 99)),
    }


def static_generate(model, prompts, max_tokens: int, max_len: int, repeats: int = 3) -> float:
    tok = ByteTokenizer()
    ids = [tok.encode(p) for p in prompts]
    sampling = SamplingParams.greedy(len(ids))
    generate(model, ids, max_new_tokens=max_tokens, sampling=sampling, max_len=max_len)  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = generate(model, ids, max_new_tokens=max_tokens, sampling=sampling, max_len=max_len)
        best = min(best, time.perf_counter() - t)
    return int(out.lengths.sum()) / best


def engine_alone(model, prompts, max_tokens: int, max_len: int, slots: int, chunk_steps: int) -> float:
    """The engine in this process, no HTTP: submit every prompt, step until done (best of 2 after a warm-up)."""
    from arjax.decode.engine import Engine, Request

    tok = ByteTokenizer()
    engine = Engine(model, slots=slots, max_len=max_len, chunk_steps=chunk_steps, tokenizer=tok, max_queue=len(prompts))
    engine.warmup()
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for p in prompts:
            engine.submit(Request(prompt=tok.encode(p), max_new_tokens=max_tokens, temperature=0.0), lambda u: None)
        engine.run_until_done()
        best = min(best, time.perf_counter() - t)
    return len(prompts) * max_tokens / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, fewer requests (a smoke run)")
    ap.add_argument("--size", choices=sorted(SIZES), default="shakespeare-char", help="model size (random weights)")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--chunk-steps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--settings",
        default="c1,c8,c32,p2,p8,p32",
        help="which loads to run: cN = N concurrent clients, pR = Poisson arrivals at R/s (default: %(default)s)",
    )
    ap.add_argument("--serve-args", default="", help="extra `arjax serve` flags, e.g. '--prefix-cache 0'")
    ap.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="N",
        help="every prompt starts with the same N-byte system prompt (then its own 16-96 bytes)",
    )
    ap.add_argument("--no-static", action="store_true", help="skip static generate and the engine alone")
    ap.add_argument("--no-alone", action="store_true", help="skip the engine alone (static generate still runs)")
    args = ap.parse_args()
    max_tokens = 16 if args.quick else args.max_tokens
    n = 32
    prompts = make_prompts(n)
    if args.shared_prefix:
        system = make_prompts(1, seed=7)[0] * (args.shared_prefix // 16 + 1)
        prompts = [system[: args.shared_prefix] + p for p in prompts]
    # prompts bucket to 128 (or past the shared prefix); what static generate's cache holds too
    max_len = bucket_len(args.shared_prefix + 96) + (16 if args.quick else 128)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        model = write_run(run, args.size, max_len=max(256, max_len))
        static = alone = None
        if not args.no_static:
            static = static_generate(model, prompts, max_tokens, max_len)
            print(
                f"{args.size}: static-batch generate, {n} prompts x {max_tokens} tokens: {static:,.0f} tokens/s",
                flush=True,
            )
            if not args.no_alone:
                alone = engine_alone(model, prompts, max_tokens, max_len, args.slots, args.chunk_steps)
        proc, addr = start_server(run, args.slots, max_len, args.chunk_steps, args.serve_args.split())
        try:
            one_request(addr, prompts[0], 4)  # first-request costs (connection, thread start) out of the way
            rows = {}
            for setting in args.settings.split(","):
                kind, value = setting[0], float(setting[1:])
                if kind == "c":
                    c = int(value)
                    reqs = prompts[:4] if args.quick and c == 1 else prompts
                    rows[f"concurrency {c}"] = summarize(closed_loop(addr, reqs, max_tokens, c))
                else:
                    rows[f"poisson {value:g}/s"] = summarize(poisson(addr, prompts, max_tokens, value))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print("\n| setting | requests | tokens/s | vs static | TTFT p50 / p99 (ms) | per token p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|")
    if static:
        print(f"| static-batch generate | {n} | {static:,.0f} | 1.00 | | |")
        if alone:
            print(f"| engine alone, no HTTP ({n} at once) | {n} | {alone:,.0f} | {alone / static:.2f} | | |")
    for name, r in rows.items():
        ratio = f"{r['tokens_per_s'] / static:.2f}" if static else ""
        print(
            f"| {name} | {r['requests']} | {r['tokens_per_s']:,.0f} | {ratio} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} |"
        )
    if static and "concurrency 32" in rows:
        c32 = rows["concurrency 32"]["tokens_per_s"]
        line = f"\nconcurrency 32: {c32 / static:.0%} of static-batch generate (target >= 85%)"
        if "concurrency 1" in rows:
            line += f", {c32 / rows['concurrency 1']['tokens_per_s']:.1f}x one at a time (target >= 5x)"
        print(line)


def bucket_len(n: int) -> int:
    """The prompt bucket (a power of two, at least 128) holding n tokens."""
    return max(128, 1 << (n - 1).bit_length())


if __name__ == "__main__":
    main()
