"""`arjax generate`: sample from a trained run (--ckpt) or a Hugging Face directory (--hf), streamed
as it is produced."""

from __future__ import annotations

import sys

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from arjax.decode import SAMPLING_FIELDS, DraftModel, PromptLookup, SamplingParams, stream_text
from arjax.model import quantize
from arjax.train.cli.common import (
    Help,
    UsageError,
    add_mesh_flags,
    add_model_flags,
    add_quant_flags,
    add_sampling_flags,
    eos_and_pad,
    load_from_flags,
    sampling_flags,
    stop_strings,
)
from arjax.train.load import load_draft


def _live_panels(texts, rows):
    """On a terminal, a batch streams as one rich panel per prompt, each growing in place (``rows``: the
    texts so far, a list the caller appends to)."""

    def render():
        return Group(
            *(
                Panel(Text(texts[i], style="bold") + Text(shown), title=f"[{i + 1}]", title_align="left")
                for i, shown in enumerate(rows)
            )
        )

    live = Live(render(), auto_refresh=False)
    live.start()
    return live, render


def _draft_for(args, model, tokenizer):
    """The speculative drafter the flags ask for, checked against the target (None: plain decoding)."""
    if args.draft_ckpt and args.prompt_lookup:
        raise UsageError("pass one of --draft-ckpt DIR (a draft model) or --prompt-lookup, not both")
    if args.draft_ckpt:
        return load_draft(args.draft_ckpt, tokenizer, k=args.draft_k)
    if args.prompt_lookup:
        return PromptLookup(ngram=args.ngram, k=args.draft_k)
    if args.draft_k != 4 or args.ngram != 3:
        raise UsageError("--draft-k and --ngram set speculative decoding; add --draft-ckpt DIR or --prompt-lookup")
    return None


def cmd_generate(args) -> int:
    if args.input:  # a file of prompts through the engine: the runner the dispatcher registered (batch.py)
        return args.batch_job(args)
    if args.output or args.logprobs or args.slots is not None or args.max_len is not None or args.force_settings:
        raise UsageError(
            "--output, --logprobs, --slots, --max-len and --force-settings belong to batch jobs; add "
            "--input prompts.jsonl"
        )
    sampling_flags(args)  # refused before anything loads
    model, tokenizer = load_from_flags(args)
    if args.quantize:
        model = quantize(model, args.quantize)  # int8 weights, per output channel (arjax.model.quant)
    texts = args.prompt or ["\n"]
    prompts = [tokenizer.encode(t) for t in texts]
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i + 1} {texts[i]!r} encodes to no tokens; give a non-empty prompt")
    B = len(prompts)
    sampling = SamplingParams.make(B, **sampling_flags(args, vocab_size=model.cfg.vocab_size))
    stops = stop_strings(args)
    eos, pad = eos_and_pad(args, tokenizer)
    max_new = args.max_new_tokens
    draft = _draft_for(args, model, tokenizer)
    if max_new is None:  # up to 200, as many as the model's context leaves after the longest prompt
        # Speculative decoding also needs room for the k drafted tokens, within the draft model's context too.
        context = min([model.cfg.max_len] + ([draft.model.cfg.max_len] if isinstance(draft, DraftModel) else []))
        drafted = draft.k if draft is not None else 0
        longest = max(len(p) for p in prompts)
        room = context - longest - drafted
        if room < 1:
            raise UsageError(
                f"the longest prompt has {longest} tokens{f' (+ {drafted} drafted)' if drafted else ''}, "
                f"the model's whole context ({context}); shorten it"
            )
        max_new = min(200, room)
    gen = stream_text(
        model,
        prompts,
        tokenizer=tokenizer,
        max_new_tokens=max_new,
        sampling=sampling,
        eos_ids=eos,
        seed=args.seed,
        pad_id=pad,
        chunk_steps=args.chunk_steps,
        kv_cache_dtype=args.kv_cache_dtype,
        stop=stops,
        draft=draft,
    )
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
        out.write(
            f"--- [{i + 1}] prompt {texts[i]!r}: {int(result.lengths[i])} new tokens, "
            f"stopped on {result.stop_reason[i]}\n"
        )
        if B > 1 and live is None:  # the live panels already show the full texts
            out.write(texts[i] + shown[i] + "\n")
    if draft is not None:
        out.write(
            f"speculative decoding: {result.acceptance_rate:.0%} of drafts accepted, "
            f"{result.tokens_per_pass:.2f} tokens per target pass\n"
        )
    out.flush()
    return 0


def register(sub, *, batch_job) -> None:
    """Add `generate`; ``batch_job(args) -> int`` runs it with ``--input`` (batch.py's
    ``cmd_batch``, given by the dispatcher)."""
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run (--ckpt) or a Hugging Face checkpoint (--hf), streamed",
        description="Generate continuations of one or more prompts, printed as they are produced. "
        "Several --prompt flags decode together as one batch.",
        formatter_class=Help,
    )
    add_model_flags(p)
    p.add_argument(
        "--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch (default: a single newline)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="tokens to generate per prompt (default: 200, or what the model's context leaves after the prompt "
        "and, when speculative, the drafted tokens)",
    )
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed (same seed, same text)")
    p.add_argument(
        "--eos",
        type=int,
        action="append",
        metavar="ID",
        help="token id that ends a row, repeatable (default: the tokenizer's EOS, if any)",
    )
    p.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="text that ends a row when it appears (however it was tokenized), e.g. '\\n\\n'; the output ends "
        "before it; repeatable, combines with --eos",
    )
    p.add_argument(
        "--draft-ckpt", metavar="DIR", help="speculative decoding with this run as the draft model (same tokenizer)"
    )
    p.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="speculative decoding with drafts copied from the prompt and output",
    )
    p.add_argument(
        "--draft-k", type=int, metavar="K", default=4, help="tokens drafted per target pass (speculative decoding)"
    )
    p.add_argument(
        "--ngram", type=int, metavar="N", default=3, help="--prompt-lookup: the n-gram matched in the text so far"
    )
    p.add_argument(
        "--chunk-steps",
        type=int,
        metavar="N",
        default=8,
        help="decode steps per streamed chunk (smaller: smoother output, more overhead)",
    )
    add_quant_flags(p)
    add_mesh_flags(p, default="one device; e.g. model=4 decodes with tensor-parallel weights on 4 devices")
    jobs = p.add_argument_group("batch jobs (a file of prompts through the continuous-batching engine)")
    jobs.add_argument(
        "--input",
        metavar="FILE",
        help='JSONL of {"prompt": ..., "id": ...} lines (per-line '
        f"max_new_tokens, {', '.join(f.name for f in SAMPLING_FIELDS)}, seed, stop override the flags)",
    )
    jobs.add_argument(
        "--output",
        metavar="FILE",
        help="JSONL written one line per prompt as each finishes; rerunning "
        "skips the ids already there. FILE.settings.json records the model, sampling flags, seed and "
        "limits, and a rerun with other ones is refused",
    )
    jobs.add_argument(
        "--force-settings",
        action="store_true",
        help="continue an --output written with other settings anyway: the lines still to do use this "
        "run's, and FILE.settings.json records from which line on (the file is then mixed)",
    )
    jobs.add_argument("--logprobs", action="store_true", help="add each token's log-probability to the output lines")
    jobs.add_argument("--slots", type=int, metavar="N", help="prompts decoded at once (default: 32)")
    jobs.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help="cache slots per prompt, prompt + new tokens (default: the model's max_len)",
    )
    p.set_defaults(func=cmd_generate, batch_job=batch_job)
