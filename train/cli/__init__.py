"""The `arjax` command: train, generate (streamed), eval, plus subcommands plugged in by cli_hf and cli_study."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import re
import sys
from typing import Any, Sequence

import yaml

# Modules that add subcommands: each defines register(subparsers). Missing ones are skipped.
PLUGINS = ("arjax.train.cli_hf", "arjax.train.cli_study")


class _Help(argparse.HelpFormatter):
    """Shows a flag's default only when it has a real one (not None/False), so no "(default: None)" noise."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and not any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            text += f" (default: {action.default})"
        return text


class UsageError(ValueError):
    """Bad user input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------- train


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` (value parsed as YAML); ``model.key=value`` goes to model_overrides."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not KEY=VALUE; e.g. --set weight_decay=0.05 or --set model.dropout=0.1")
        key, raw = item.split("=", 1)
        from arjax.train.config import _Loader

        value = yaml.load(raw, Loader=_Loader) if raw else None
        if key.startswith("model."):
            out.setdefault("model_overrides", {})[key[len("model."):]] = value
        else:
            out[key] = value
    return out


# CLI flag -> TrainConfig field, for the common overrides.
_TRAIN_FLAGS = {
    "data": "data", "model": "model", "tokenizer": "tokenizer", "steps": "steps", "batch_size": "batch_size",
    "seq_len": "seq_len", "accum_steps": "accum_steps", "lr": "lr", "warmup_steps": "warmup_steps",
    "min_lr": "min_lr", "weight_decay": "weight_decay", "seed": "seed", "eval_interval": "eval_interval",
    "ckpt_interval": "ckpt_interval", "log_interval": "log_interval",
}


def train_config_from_args(args) -> "TrainConfig":  # noqa: F821
    from arjax.train.config import TrainConfig, from_dict, load_config

    overrides = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    extra = _parse_set(args.set or [])
    if args.config:
        base = load_config(args.config)
    elif args.resume:
        # Resuming without --config: continue with the run's own saved config, not the defaults.
        from arjax.train.checkpoint import read_meta

        base = from_dict(read_meta(args.out)[1]["train_config"])
    else:
        base = TrainConfig()
    merged = {**base.to_dict(), **overrides}
    if "model_overrides" in extra:
        merged["model_overrides"] = {**merged["model_overrides"], **extra.pop("model_overrides")}
    merged.update(extra)
    try:
        return from_dict(merged)
    except TypeError as e:
        raise UsageError(str(e)) from None


def cmd_train(args) -> int:
    from arjax.train.loop import train

    cfg = train_config_from_args(args)
    result = train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    val = result["val_losses"][-1][1] if result["val_losses"] else float("nan")
    print(
        f"trained to step {result['final_step']}: train loss {result['losses'][-1] if result['losses'] else float('nan'):.4f}, "
        f"val loss {val:.4f}, {result['tokens_per_s']:,.0f} tokens/s; checkpoint in {args.out}"
    )
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML run config (tpu_configs/*.yaml) or from defaults",
        description="Train a decoder-only transformer with teacher forcing. Settings come from --config "
        "(a YAML file of TrainConfig keys), then from the flags below, which override it. Checkpoints, the "
        "tokenizer and metrics.jsonl go to --out; `arjax generate --ckpt OUT` then needs nothing else.",
        formatter_class=_Help,
    )
    p.add_argument("--config", metavar="YAML", help="run config file, e.g. tpu_configs/cpu-demo.yaml (default: built-in defaults)")
    p.add_argument("--out", metavar="DIR", default="runs/default", help="run directory for checkpoints, tokenizer and metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint (exactly reproducible); without --config it reuses the run's saved config")
    p.add_argument("--data", metavar="FILE", help="UTF-8 text file to train on (default: the config's; none means Python's bundled pydoc topics)")
    p.add_argument("--model", metavar="PRESET", help="model preset name, e.g. demo, tiny, shakespeare-char, gpt2-small (default: the config's)")
    p.add_argument("--tokenizer", choices=("byte", "char", "hf"), help="tokenizer kind (default: the config's)")
    p.add_argument("--steps", type=int, metavar="N", help="number of optimizer updates (default: the config's)")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per micro-batch (default: the config's)")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per training window (default: the config's, else the model's max_len)")
    p.add_argument("--accum-steps", type=int, metavar="N", help="micro-batches accumulated per update (default: the config's)")
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default: the config's)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup steps (default: the config's)")
    p.add_argument("--min-lr", type=float, metavar="LR", help="learning rate at the end of the cosine decay (default: the config's)")
    p.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW weight decay (default: the config's)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for init, batch sampling and dropout (default: the config's)")
    p.add_argument("--eval-interval", type=int, metavar="N", help="steps between validation evaluations (default: the config's)")
    p.add_argument("--ckpt-interval", type=int, metavar="N", help="steps between checkpoints (default: the config's)")
    p.add_argument("--log-interval", type=int, metavar="N", help="steps between loss fetches/log lines (default: the config's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig key, repeatable; model.KEY=VALUE overrides the model preset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------------------------- generate


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
        try:
            from arjax.train.cli_hf import load_hf_for_generate
        except ImportError as e:
            raise UsageError(f"--hf needs the Hugging Face extra (pip install 'arjax[hf]'): {e}") from None
        return load_hf_for_generate(args.hf)
    from arjax.train.checkpoint import load_model

    model, tokenizer, _ = load_model(args.ckpt)
    return model, tokenizer


def _live_panels(texts, rows):
    """On a terminal, a batch streams as one rich panel per prompt, each growing in place."""
    from rich.console import Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

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
    from arjax.decode import SamplingParams, stream

    model, tokenizer = _load_for_generate(args)
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
    gen = stream(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=eos,
                 seed=args.seed, pad_id=pad, chunk_steps=args.chunk_steps)
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


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run (--ckpt) or a Hugging Face checkpoint (--hf), streamed",
        description="Generate continuations of one or more prompts, printed as they are produced. "
        "Several --prompt flags decode together as one batch.",
        formatter_class=_Help,
    )
    p.add_argument("--ckpt", metavar="DIR", help="run directory written by `arjax train --out DIR`")
    p.add_argument("--hf", metavar="DIR", help="local Hugging Face checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch (default: a single newline)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=200, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, metavar="K", default=0, help="sample only among the k most likely tokens; 0 turns it off")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling mass; 1 turns it off")
    p.add_argument("--min-p", type=float, metavar="P", default=0.0, help="drop tokens below min_p times the top probability; 0 turns it off")
    p.add_argument("--repetition-penalty", type=float, metavar="R", default=1.0, help="penalise tokens already seen; 1 turns it off")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--eos", type=int, action="append", metavar="ID", help="token id that ends a row, repeatable (default: the tokenizer's EOS, if any)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="text of one token that ends a row, e.g. '\\n'; repeatable, combines with --eos")
    p.add_argument("--chunk-steps", type=int, metavar="N", default=8, help="decode steps per streamed chunk (smaller: smoother output, more overhead)")
    p.set_defaults(func=cmd_generate)


# ----------------------------------------------------------------------------------------- eval


def evaluate_run(run_dir: str, data: str | None = None, *, batch_size: int | None = None, iters: int | None = None) -> dict[str, float]:
    """Mean NLL and perplexity of a run's latest checkpoint.

    Without ``data``: the run's own validation split and windows, so the number matches the
    val loss the training log reported. With ``data``: evenly spaced windows over the whole file.
    """
    from flax import nnx

    from arjax.train import data as data_lib
    from arjax.train.checkpoint import load_model
    from arjax.train.step import make_eval_step

    model, tokenizer, cfg = load_model(run_dir)
    T = cfg.context_len(model.cfg)
    B, E = batch_size or cfg.batch_size, iters or cfg.eval_iters
    if data is None:
        ids = data_lib.tokenize_and_split(data_lib.read_text(cfg.data), tokenizer, val_fraction=cfg.val_fraction).val
    else:
        ids = __import__("numpy").asarray(tokenizer.encode(data_lib.read_text(data)), dtype="int32")
    windows = data_lib.eval_windows(ids, n_windows=E * B, seq_len=T).reshape(E, B, T + 1)
    graphdef, params = nnx.split(model)
    loss = float(make_eval_step(graphdef, pad_id=tokenizer.pad_id)(params, windows))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(E * B * T)}


def cmd_eval(args) -> int:
    r = evaluate_run(args.ckpt, args.data, batch_size=args.batch_size, iters=args.iters)
    where = args.data or "the run's validation split"
    print(f"{where}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} over {r['tokens']:,} tokens")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a trained run",
        description="Evaluate a run's latest checkpoint: mean next-token loss and perplexity.",
        formatter_class=_Help,
    )
    p.add_argument("--ckpt", metavar="DIR", required=True, help="run directory written by `arjax train --out DIR`")
    p.add_argument("--data", metavar="FILE", help="text file to evaluate on, all of it (default: the run's own validation split)")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per batch (default: the run's batch_size)")
    p.add_argument("--iters", type=int, metavar="N", help="number of batches (default: the run's eval_iters)")
    p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arjax",
        description="arjax: train and sample autoregressive language models in JAX. "
        "Start with `arjax train --config tpu_configs/cpu-demo.yaml --out runs/demo`, then "
        "`arjax generate --ckpt runs/demo --prompt \"The \"`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    for name in PLUGINS:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            module = importlib.import_module(name)
        except ImportError:
            continue  # an optional extra is not installed; its subcommands are simply absent
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("ARJAX_DEBUG"):
            raise
        # Bad user input: one line, no traceback (ARJAX_DEBUG=1 shows it).
        print(f"arjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
