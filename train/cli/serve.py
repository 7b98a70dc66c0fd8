"""`arjax serve`: an OpenAI-compatible completions and chat server over the continuous-batching engine
(arjax.decode.server)."""

from __future__ import annotations

import os
import sys
import time

from arjax.model import quantize
from arjax.model.memory import kv_cache_bytes
from arjax.train.cli.common import (
    Help,
    UsageError,
    add_model_flags,
    add_quant_flags,
    engine_from_flags,
    load_from_flags,
    out_of_memory,
)


def cmd_serve(args) -> int:
    try:
        from arjax.decode import server
    except ImportError as e:
        raise UsageError(
            f"arjax serve needs FastAPI, uvicorn and jinja2 ({e.name} is missing): pip install 'arjax[serve]'"
        ) from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is out of range; give 0 to 65535 (0: any free port)")
    if not 0 <= args.max_queue < 2**31:
        raise UsageError(f"--max-queue {args.max_queue} is out of range; give 0 or more")
    sock = server.bind(args.host, args.port)  # before loading: a taken port fails fast
    model, tokenizer = load_from_flags(args)
    if args.max_len is not None and args.max_len > model.cfg.max_len:
        raise UsageError(
            f"--max-len {args.max_len} exceeds the model's context ({model.cfg.max_len} tokens); give at "
            f"most {model.cfg.max_len}"
        )
    if args.quantize:
        model = quantize(model, args.quantize)  # int8 weights, per output channel (arjax.model.quant)
    model_id = args.model_name or os.path.basename(os.path.abspath(args.ckpt or args.hf))
    max_len = args.max_len or model.cfg.max_len
    cache = kv_cache_bytes(model.cfg, args.slots, max_len, args.kv_cache_dtype)
    with out_of_memory(
        f"{args.slots} slots of {max_len} tokens",
        "lower --slots or --max-len",
        detail=f" (the KV cache alone is {cache / 2**30:.2f} GiB)",
    ):
        engine = engine_from_flags(args, model, tokenizer, max_queue=args.max_queue)
        seconds = engine.warmup()

    def ready(running) -> None:
        print(
            f"arjax serve: {model_id!r} on {running.url} (OpenAI-compatible: {running.url}/v1/completions, "
            "/v1/chat/completions); "
            f"{engine.num_slots} slots of {engine.max_len} tokens (KV cache {engine.cache_bytes / 2**20:,.1f} MiB), "
            f"compiled in {seconds:.1f} s",
            flush=True,
        )

    t0 = time.perf_counter()
    try:
        server.serve(engine, tokenizer, model_id, sock, on_ready=ready)  # until Ctrl-C or SIGTERM
    finally:
        print(
            f"arjax serve: stopped after {time.perf_counter() - t0:.0f} s, {engine.stats['finished']} requests, "
            f"{engine.stats['tokens']} tokens",
            file=sys.stderr,
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with OpenAI's completions and chat APIs (continuous batching)",
        description="An OpenAI-compatible server: POST /v1/completions (a text or token-id prompt; echo and "
        "logprobs score the prompt), POST /v1/chat/completions (messages written as a prompt by the "
        "tokenizer's chat_template, or for byte, char and template-less tokenizers by the default "
        "'<|role|>\\n{content}<|end|>\\n' per message then '<|assistant|>\\n', whose <|end|> is a stop "
        "string), both streaming too, GET /v1/models, GET /health. Requests share a fixed set of slots; new "
        "ones join between chunks of decode steps. Sampling values come with each request.",
        formatter_class=Help,
    )
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one, printed at startup)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients pass (default: the directory's name)")
    p.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        default=256,
        help="requests waiting for a slot before new ones get HTTP 429",
    )
    p.add_argument(
        "--slots",
        type=int,
        metavar="N",
        default=16,
        help="requests decoded at once (the static batch); more wait in a queue",
    )
    p.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help="cache slots per request, prompt + new tokens (default: the model's max_len)",
    )
    p.add_argument(
        "--chunk-steps",
        type=int,
        metavar="N",
        default=8,
        help="decode steps between admitting requests and handing out text (smaller: lower latency, more overhead)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        default=512,
        help="a prompt longer than this is prefilled in pieces of N tokens between decode steps, so running "
        "streams keep flowing (rounded up to a prompt bucket)",
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        metavar="N",
        default=2048,
        help="prompt tokens prefilled per round at most (waiting prompts go together in one pass)",
    )
    p.add_argument(
        "--prefix-cache",
        type=int,
        metavar="N",
        default=8,
        help="rows of KV cache keeping recent prompts' prefixes: a prompt that starts with a stored one "
        "(a shared system prompt) prefills only the rest; 0 turns it off",
    )
    p.add_argument(
        "--prefix-block",
        type=int,
        metavar="N",
        default=16,
        help="prefixes are reused in whole blocks of N tokens",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        default=0,
        dest="prompt_lookup_k",
        help="speculative decoding: K drafts a step copied from the request's own prompt and output (the same "
        "tokens as without; faster where the output repeats its input); 0 turns it off",
    )
    p.add_argument(
        "--lookup-ngram",
        type=int,
        metavar="N",
        default=None,
        help="--prompt-lookup: the n-gram matched in the text so far (default 3)",
    )
    p.add_argument(
        "--lookup-threshold",
        type=float,
        metavar="A",
        default=None,
        help="--prompt-lookup: speculate while the running requests' recent accepted drafts a step average at "
        "least A, at most K (default 1; below it a plain step is cheaper; new requests are always tried); "
        "0 always speculates",
    )
    add_quant_flags(p)
    p.set_defaults(func=cmd_serve, mesh=None)
