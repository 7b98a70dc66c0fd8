"""`arjax generate`: sample from a trained run (--ckpt) or a Hugging Face directory (--hf), streamed as it is produced."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

from flax import nnx
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from arjax.decode import DraftModel, PromptLookup, SamplingParams, stream_text
from arjax.train.checkpoint import fingerprints, load_model
from arjax.model import quantize
from arjax.model.sharding import parse_mesh
from arjax.train.cli.common import Help, UsageError, add_mesh_flags
from arjax.train.cli.convert import load_hf_for_generate


def _load_for_generate(args):
    if bool(args.ckpt) == bool(args.hf):
        raise UsageError("pass exactly one of --ckpt DIR (an arjax run) or --hf DIR (a Hugging Face checkpoint)")
    if args.hf:
        if args.mesh:
            raise UsageError("--mesh works with --ckpt; convert the Hugging Face checkpoint first (arjax convert --from-hf)")
        return load_hf_for_generate(args.hf)
    # Tensor-parallel weights when a mesh is given; the KV cache follows them (rows and KV heads split).
    model, tokenizer, _ = load_model(args.ckpt, mesh=parse_mesh(args.mesh) if args.mesh else None, preset="tp")
    return model, tokenizer


def _live_panels(texts, rows):
    """On a terminal, a batch streams as one rich panel per prompt, each growing in place (``rows``: the
    texts so far, a list the caller appends to)."""
    def render():
        return Group(*(
            Panel(Text(texts[i], style="bold") + Text(shown), title=f"[{i + 1}]", title_align="left")
            for i, shown in enumerate(rows)
        ))

    live = Live(render(), auto_refresh=False)
    live.start()
    return live, render


def _unescape(text: str) -> str:
    """``--stop`` text with ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` read as escapes (a shell passes them literally)."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: escapes[m.group(1)], text)


def _draft_for(args, model, tokenizer):
    """The speculative drafter the flags ask for, checked against the target (None: plain decoding)."""
    if args.draft_ckpt and args.prompt_lookup:
        raise UsageError("pass one of --draft-ckpt DIR (a draft model) or --prompt-lookup, not both")
    if args.draft_ckpt:
        draft_model, draft_tok, _ = load_model(args.draft_ckpt)
        if digest_of(draft_tok) != digest_of(tokenizer):
            raise UsageError(f"the draft in {args.draft_ckpt!r} uses another tokenizer than the target; a draft must "
                             "share the target's tokenizer and vocabulary")
        return DraftModel(draft_model, k=args.draft_k)
    if args.prompt_lookup:
        return PromptLookup(ngram=args.ngram, k=args.draft_k)
    if args.draft_k != 4 or args.ngram != 3:
        raise UsageError("--draft-k and --ngram set speculative decoding; add --draft-ckpt DIR or --prompt-lookup")
    return None


def digest_of(tokenizer) -> tuple:
    """What identifies a tokenizer here: its kind, size and every token's text."""
    size = tokenizer.vocab_size
    return (getattr(tokenizer, "kind", type(tokenizer).__name__), size,
            tuple(tokenizer.decode([i]) for i in range(min(size, 1 << 16))))


def weights_digest(model, tokenizer) -> str:
    """What identifies a model's text (a batch job records it): its config, every weight's fingerprint, its tokenizer."""
    body = {"config": model.cfg.to_dict(), "weights": fingerprints(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
            "tokenizer": digest_of(tokenizer)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cmd_generate(args) -> int:
    model, tokenizer = _load_for_generate(args)
    weights = weights_digest(model, tokenizer) if args.input else None  # as loaded: --quantize is recorded apart
    if args.quantize:
        model = quantize(model, args.quantize)  # int8 weights, per output channel (arjax.model.quant)
    if args.input:
        return _batch_job(args, model, tokenizer, weights)
    if args.output or args.logprobs or args.slots is not None or args.max_len is not None or args.force_settings:
        raise UsageError("--output, --logprobs, --slots, --max-len and --force-settings belong to batch jobs; add "
                         "--input prompts.jsonl")
    texts = args.prompt or ["\n"]
    prompts = [tokenizer.encode(t) for t in texts]
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i + 1} {texts[i]!r} encodes to no tokens; give a non-empty prompt")
    B = len(prompts)
    sampling = SamplingParams.make(
        B, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, vocab_size=model.cfg.vocab_size,
    )
    stops = [_unescape(t) for t in args.stop or []]
    eos, pad = _eos_and_pad(args, tokenizer)
    max_new = args.max_new_tokens
    draft = _draft_for(args, model, tokenizer)
    if max_new is None:  # up to 200, as many as the model's context leaves after the longest prompt
        # Speculative decoding also needs room for the k drafted tokens, within the draft model's context too.
        context = min([model.cfg.max_len] + ([draft.model.cfg.max_len] if isinstance(draft, DraftModel) else []))
        drafted = draft.k if draft is not None else 0
        longest = max(len(p) for p in prompts)
        room = context - longest - drafted
        if room < 1:
            raise UsageError(f"the longest prompt has {longest} tokens{f' (+ {drafted} drafted)' if drafted else ''}, "
                             f"the model's whole context ({context}); shorten it")
        max_new = min(200, room)
    gen = stream_text(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new, sampling=sampling, eos_ids=eos,
                      seed=args.seed, pad_id=pad, chunk_steps=args.chunk_steps, kv_cache_dtype=args.kv_cache_dtype,
                      stop=stops, draft=draft)
    shown = [""] * B  # each row's text so far (stream_text holds back half characters and possible stop strings)
    out = sys.stdout
    live, render = _live_panels(texts, shown) if B > 1 and out.isatty() else (None, None)
    if B == 1:
        out.write(texts[0])
        out.flush()
    while True:
        try:
            chunk = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        for i, delta in enumerate(chunk):
            if not delta:
                continue
            shown[i] += delta
            if B == 1:
                out.write(delta)
            elif live is None:
                # Interleaved rows: one labelled line per chunk, newlines shown as ⏎ to keep lines apart.
                out.write(f"[{i + 1}] {delta.replace(chr(10), '⏎')}\n")
            out.flush()
        if live is not None:
            live.update(render(), refresh=True)
    if live is not None:
        live.stop()
    if B == 1:
        out.write("\n")
    out.write("\n" + "=" * 72 + "\n")
    for i in range(B):
        out.write(f"--- [{i + 1}] prompt {texts[i]!r}: {int(result.lengths[i])} new tokens, stopped on {result.stop_reason[i]}\n")
        if B > 1 and live is None:  # the live panels already show the full texts
            out.write(texts[i] + shown[i] + "\n")
    if draft is not None:
        out.write(f"speculative decoding: {result.acceptance_rate:.0%} of drafts accepted, "
                  f"{result.tokens_per_pass:.2f} tokens per target pass\n")
    out.flush()
    return 0


def _eos_and_pad(args, tokenizer) -> tuple[list[int], int]:
    eos = list(args.eos or [])
    if not eos and tokenizer.eos_id is not None:
        eos = [tokenizer.eos_id]
    return eos, tokenizer.pad_id if tokenizer.pad_id is not None else 0


def _batch_job(args, model, tokenizer, weights: str) -> int:
    """``--input``: every prompt of a JSONL file through the continuous-batching engine (train/cli/batch.py);
    ``weights``: ``weights_digest`` of the model before --quantize."""
    from arjax.train.cli.batch import run_batch
    from arjax.train.cli.serve import build_engine

    if args.prompt:
        raise UsageError("pass prompts with --prompt or in --input FILE, not both")
    if args.draft_ckpt or args.prompt_lookup or args.mesh:
        raise UsageError("--input runs on the serving engine, which has no speculative decoding or --mesh; drop those flags")
    args.slots = 32 if args.slots is None else args.slots
    eos, _ = _eos_and_pad(args, tokenizer)
    if args.max_len is not None and not 2 <= args.max_len <= model.cfg.max_len:
        raise UsageError(f"--max-len {args.max_len} is out of range; give 2 to the model's context ({model.cfg.max_len})")

    def make_engine(max_len):
        args.max_len = max_len
        try:
            return build_engine(args, model, tokenizer, max_queue=0)  # allocates the slots' cache: too big fails here
        except Exception as e:  # noqa: BLE001 (XLA reports memory exhaustion as a runtime error)
            if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
                raise
            raise UsageError(f"{args.slots} slots of {max_len} tokens do not fit in the device's memory; lower --slots "
                             "(or --max-len, or the longest prompt + max_new_tokens)") from None

    source = f"--ckpt {os.path.abspath(args.ckpt)}" if args.ckpt else f"--hf {os.path.abspath(args.hf)}"
    return run_batch(args, make_engine, tokenizer, eos=eos, stops=[_unescape(t) for t in args.stop or []],
                     context=model.cfg.max_len, model={"model": source, "weights": weights, "dtype": model.cfg.dtype})


def add_model_flags(p) -> None:
    """Where the model comes from: `generate` and `serve`."""
    p.add_argument("--ckpt", metavar="DIR", help="run directory written by `arjax train --out DIR`")
    p.add_argument("--hf", metavar="DIR", help="local Hugging Face checkpoint directory (config.json, safetensors, tokenizer)")


def add_quant_flags(p) -> None:
    """int8 weights and the KV cache's dtype: `generate` and `serve`."""
    p.add_argument("--quantize", choices=["int8"], help="decode with int8 weights (a scale per output channel)")
    p.add_argument("--kv-cache-dtype", choices=["int8", "bfloat16", "float32"], metavar="{int8,bfloat16,float32}",
                   help="KV cache dtype; int8 keeps a scale per token and head (default: the model's dtype)")


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run (--ckpt) or a Hugging Face checkpoint (--hf), streamed",
        description="Generate continuations of one or more prompts, printed as they are produced. "
        "Several --prompt flags decode together as one batch.",
        formatter_class=Help,
    )
    add_model_flags(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch (default: a single newline)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (default: 200, or what the model's context leaves after the prompt "
                        "and, when speculative, the drafted tokens)")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, metavar="K", default=0, help="sample only among the k most likely tokens; 0 turns it off")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling mass; 1 turns it off")
    p.add_argument("--min-p", type=float, metavar="P", default=0.0, help="drop tokens below min_p times the top probability; 0 turns it off")
    p.add_argument("--repetition-penalty", type=float, metavar="R", default=1.0, help="penalise tokens already seen; 1 turns it off")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--eos", type=int, action="append", metavar="ID", help="token id that ends a row, repeatable (default: the tokenizer's EOS, if any)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="text that ends a row when it appears (however it was tokenized), e.g. '\\n\\n'; the output ends "
                        "before it; repeatable, combines with --eos")
    p.add_argument("--draft-ckpt", metavar="DIR", help="speculative decoding with this run as the draft model (same tokenizer)")
    p.add_argument("--prompt-lookup", action="store_true", help="speculative decoding with drafts copied from the prompt and output")
    p.add_argument("--draft-k", type=int, metavar="K", default=4, help="tokens drafted per target pass (speculative decoding)")
    p.add_argument("--ngram", type=int, metavar="N", default=3, help="--prompt-lookup: the n-gram matched in the text so far")
    p.add_argument("--chunk-steps", type=int, metavar="N", default=8, help="decode steps per streamed chunk (smaller: smoother output, more overhead)")
    add_quant_flags(p)
    add_mesh_flags(p, default="one device; e.g. model=4 decodes with tensor-parallel weights on 4 devices")
    jobs = p.add_argument_group("batch jobs (a file of prompts through the continuous-batching engine)")
    jobs.add_argument("--input", metavar="FILE", help="JSONL of {\"prompt\": ..., \"id\": ...} lines (per-line "
                      "max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop override the flags)")
    jobs.add_argument("--output", metavar="FILE", help="JSONL written one line per prompt as each finishes; rerunning "
                      "skips the ids already there. FILE.settings.json records the model, sampling flags, seed and "
                      "limits, and a rerun with other ones is refused")
    jobs.add_argument("--force-settings", action="store_true",
                      help="continue an --output written with other settings anyway: the lines still to do use this "
                      "run's, and FILE.settings.json records from which line on (the file is then mixed)")
    jobs.add_argument("--logprobs", action="store_true", help="add each token's log-probability to the output lines")
    jobs.add_argument("--slots", type=int, metavar="N", help="prompts decoded at once (default: 32)")
    jobs.add_argument("--max-len", type=int, metavar="N",
                      help="cache slots per prompt, prompt + new tokens (default: the model's max_len)")
    p.set_defaults(func=cmd_generate)
