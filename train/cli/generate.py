"""`arjax generate`: sample from a trained run (--ckpt) or a Hugging Face directory (--hf), streamed as it is produced."""

from __future__ import annotations

import re
import sys

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from arjax.decode import SamplingParams, stream
from arjax.train.checkpoint import load_model
from arjax.model import quantize
from arjax.model.sharding import parse_mesh
from arjax.train.cli.common import Help, UsageError, add_mesh_flags
from arjax.train.cli.convert import load_hf_for_generate


class _RowText:
    """Turns a row's growing token list into printable text increments.

    Decoding the whole list each time (not each chunk alone) keeps multi-byte characters that
    straddle a chunk boundary intact; a trailing replacement character is held back until the
    next chunk completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def add(self, new_ids, final: bool = False) -> str:
        self.ids.extend(int(i) for i in new_ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        delta, self.shown = text[self.shown:end], max(self.shown, end)
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


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
    """On a terminal, a batch streams as one rich panel per prompt, each growing in place."""
    def render():
        return Group(*(
            Panel(Text(texts[i], style="bold") + Text(row.text), title=f"[{i + 1}]", title_align="left")
            for i, row in enumerate(rows)
        ))

    live = Live(render(), auto_refresh=False)
    live.start()
    return live, render


def _stop_token(tokenizer, text: str) -> int:
    """The one token id that ``--stop TEXT`` names; ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` are read as escapes."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    unescaped = re.sub(r"\\([ntr\\])", lambda m: escapes[m.group(1)], text)
    ids = tokenizer.encode(unescaped)
    if len(ids) != 1:
        raise UsageError(
            f"--stop {text!r} encodes to {len(ids)} tokens {ids}; a row stops on one token: give text that is "
            "a single token of this tokenizer, or its id with --eos ID"
        )
    return ids[0]


def cmd_generate(args) -> int:
    model, tokenizer = _load_for_generate(args)
    if args.quantize:
        model = quantize(model, args.quantize)  # int8 weights, per output channel (arjax.model.quant)
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
    eos = list(args.eos or []) + [_stop_token(tokenizer, t) for t in args.stop or []]
    if not eos and tokenizer.eos_id is not None:
        eos = [tokenizer.eos_id]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    max_new = args.max_new_tokens
    if max_new is None:  # up to 200, as many as the model's context leaves after the longest prompt
        room = model.cfg.max_len - max(len(p) for p in prompts)
        if room < 1:
            raise UsageError(f"the longest prompt has {max(len(p) for p in prompts)} tokens, the model's whole context "
                             f"({model.cfg.max_len}); shorten it")
        max_new = min(200, room)
    gen = stream(model, prompts, max_new_tokens=max_new, sampling=sampling, eos_ids=eos,
                 seed=args.seed, pad_id=pad, chunk_steps=args.chunk_steps, kv_cache_dtype=args.kv_cache_dtype)
    rows = [_RowText(tokenizer) for _ in range(B)]
    out = sys.stdout
    live, render = _live_panels(texts, rows) if B > 1 and out.isatty() else (None, None)
    if B == 1:
        out.write(texts[0])
        out.flush()
    while True:
        try:
            chunk = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        for i, new in enumerate(chunk):
            if len(new) == 0:
                continue
            delta = rows[i].add(new)
            if B == 1:
                out.write(delta)
            elif delta and live is None:
                # Interleaved rows: one labelled line per chunk, newlines shown as ⏎ to keep lines apart.
                out.write(f"[{i + 1}] {delta.replace(chr(10), '⏎')}\n")
            out.flush()
        if live is not None:
            live.update(render(), refresh=True)
    if live is not None:
        live.stop()
    if B == 1:
        out.write(rows[0].add([], final=True) + "\n")
    reasons = result.stop_reason if result is not None else ["?"] * B
    lengths = result.lengths if result is not None else [len(r.ids) for r in rows]
    out.write("\n" + "=" * 72 + "\n")
    for i in range(B):
        out.write(f"--- [{i + 1}] prompt {texts[i]!r}: {int(lengths[i])} new tokens, stopped on {reasons[i]}\n")
        if B > 1 and live is None:  # the live panels already show the full texts
            out.write(texts[i] + rows[i].text + "\n")
    out.flush()
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run (--ckpt) or a Hugging Face checkpoint (--hf), streamed",
        description="Generate continuations of one or more prompts, printed as they are produced. "
        "Several --prompt flags decode together as one batch.",
        formatter_class=Help,
    )
    p.add_argument("--ckpt", metavar="DIR", help="run directory written by `arjax train --out DIR`")
    p.add_argument("--hf", metavar="DIR", help="local Hugging Face checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch (default: a single newline)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (default: 200, or what the model's context leaves after the prompt)")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, metavar="K", default=0, help="sample only among the k most likely tokens; 0 turns it off")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling mass; 1 turns it off")
    p.add_argument("--min-p", type=float, metavar="P", default=0.0, help="drop tokens below min_p times the top probability; 0 turns it off")
    p.add_argument("--repetition-penalty", type=float, metavar="R", default=1.0, help="penalise tokens already seen; 1 turns it off")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--eos", type=int, action="append", metavar="ID", help="token id that ends a row, repeatable (default: the tokenizer's EOS, if any)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="text of one token that ends a row, e.g. '\\n'; repeatable, combines with --eos")
    p.add_argument("--chunk-steps", type=int, metavar="N", default=8, help="decode steps per streamed chunk (smaller: smoother output, more overhead)")
    p.add_argument("--quantize", choices=["int8"], help="decode with int8 weights (a scale per output channel)")
    p.add_argument("--kv-cache-dtype", choices=["int8", "bfloat16", "float32"], metavar="{int8,bfloat16,float32}",
                   help="KV cache dtype; int8 keeps a scale per token and head (default: the model's dtype)")
    add_mesh_flags(p, default="one device; e.g. model=4 decodes with tensor-parallel weights on 4 devices")
    p.set_defaults(func=cmd_generate)
