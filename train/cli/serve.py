"""`arjax serve`: an OpenAI-compatible completions server over the continuous-batching engine."""

from __future__ import annotations

import os
import signal
import sys
import time

from arjax.decode.engine import Engine
from arjax.model import quantize
from arjax.model.memory import kv_cache_bytes
from arjax.train.cli.common import Help, UsageError
from arjax.train.cli.generate import _load_for_generate, add_model_flags, add_quant_flags


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def engine_args(p, *, slots_default: int) -> None:
    """The engine's flags, shared by `arjax serve` and `arjax generate --input`."""
    p.add_argument("--slots", type=int, metavar="N", default=slots_default,
                   help="requests decoded at once (the static batch); more wait in a queue")
    p.add_argument("--max-len", type=int, metavar="N",
                   help="cache slots per request, prompt + new tokens (default: the model's max_len)")
    p.add_argument("--chunk-steps", type=int, metavar="N", default=8,
                   help="decode steps between admitting requests and handing out text (smaller: lower latency, "
                        "more overhead)")


def build_engine(args, model, tokenizer, *, max_queue: int) -> Engine:
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0
    for flag, value in (("--slots", args.slots), ("--chunk-steps", args.chunk_steps)):
        if not 1 <= value <= 65536:
            raise UsageError(f"{flag} {value} is out of range; give 1 to 65536")
    if args.max_len is not None and not 2 <= args.max_len < 2**31:
        raise UsageError(f"--max-len {args.max_len} is out of range; give at least 2 (prompt + new tokens per request)")
    return Engine(model, slots=args.slots, max_len=args.max_len, chunk_steps=args.chunk_steps, tokenizer=tokenizer,
                  pad_id=pad, max_queue=max_queue, kv_cache_dtype=args.kv_cache_dtype)


def cmd_serve(args) -> int:
    try:
        from arjax.decode.server import Server, bind, create_app
    except ImportError as e:
        raise UsageError(f"arjax serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'arjax[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is out of range; give 0 to 65535 (0: any free port)")
    if not 0 <= args.max_queue < 2**31:
        raise UsageError(f"--max-queue {args.max_queue} is out of range; give 0 or more")
    sock = bind(args.host, args.port)  # before loading: a taken port fails fast
    model, tokenizer = _load_for_generate(args)
    if args.max_len is not None and args.max_len > model.cfg.max_len:
        raise UsageError(f"--max-len {args.max_len} exceeds the model's context ({model.cfg.max_len} tokens); give at "
                         f"most {model.cfg.max_len}")
    if args.quantize:
        model = quantize(model, args.quantize)  # int8 weights, per output channel (arjax.model.quant)
    model_id = args.model_name or os.path.basename(os.path.abspath(args.ckpt or args.hf))
    try:
        engine = build_engine(args, model, tokenizer, max_queue=args.max_queue)
        seconds = engine.warmup()
    except Exception as e:  # noqa: BLE001 (XLA reports memory exhaustion as a runtime error)
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        cfg = model.cfg
        max_len = args.max_len or cfg.max_len
        need = kv_cache_bytes(cfg, args.slots, max_len, args.kv_cache_dtype)
        raise UsageError(f"{args.slots} slots of {max_len} tokens do not fit in the device's memory (the KV cache "
                         f"alone is {need / 2**30:.2f} GiB); lower --slots or --max-len") from None
    server = Server(create_app(engine, tokenizer, model_id), sock, on_exit=engine.close)
    engine.start()
    print(f"arjax serve: {model_id!r} on {server.url} (OpenAI-compatible: {server.url}/v1/completions); "
          f"{engine.num_slots} slots of {engine.max_len} tokens (KV cache {engine.cache_bytes / 2**20:,.1f} MiB), "
          f"compiled in {seconds:.1f} s", flush=True)
    t0 = time.perf_counter()
    # uvicorn stops on SIGINT and SIGTERM, then raises the signal again under the handler it found:
    # this one, so that SIGTERM also ends here (engine stopped, summary printed, exit 0).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
        print(f"arjax serve: stopped after {time.perf_counter() - t0:.0f} s, {engine.stats['finished']} requests, "
              f"{engine.stats['tokens']} tokens", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with OpenAI's completions API (continuous batching)",
        description="An OpenAI-compatible server: POST /v1/completions (streaming too), GET /v1/models, "
        "GET /health. Requests share a fixed set of slots; new ones join between chunks of decode steps.",
        formatter_class=Help,
    )
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one, printed at startup)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients pass (default: the directory's name)")
    p.add_argument("--max-queue", type=int, metavar="N", default=256,
                   help="requests waiting for a slot before new ones get HTTP 429")
    engine_args(p, slots_default=16)
    add_quant_flags(p)
    p.set_defaults(func=cmd_serve, mesh=None)
