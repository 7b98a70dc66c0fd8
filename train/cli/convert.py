"""`arjax convert --from-hf/--to-hf` and `arjax tokenizer train` (Hugging Face interop), and the loader behind `generate --hf`."""

from __future__ import annotations

import argparse
import json
import os

from flax import nnx

from arjax.model import hf
from arjax.train import checkpoint as ckpt
from arjax.train.cli.common import Help, UsageError
from arjax.train.tokenizer import ByteTokenizer, HFTokenizer, check_fits, load_hf_tokenizer, load_tokenizer, train_bpe


def load_hf_for_generate(hf_dir: str):
    """``(model, tokenizer)`` straight from a local HF checkpoint directory (config.json, *.safetensors, tokenizer)."""
    model = hf.from_hf_dir(hf_dir)
    tokenizer = load_hf_tokenizer(hf_dir)
    check_fits(tokenizer, model.cfg.vocab_size)
    return model, tokenizer


def _tokenizer_for_convert(hf_dir: str, override: str | None):
    if override == "byte":
        return ByteTokenizer()
    if override:
        return load_tokenizer(override)
    try:
        return load_hf_tokenizer(hf_dir)
    except ValueError as e:
        raise ValueError(
            f"{e}. A converted checkpoint carries its tokenizer so that generate needs only the checkpoint; "
            "pass --tokenizer DIR (a tokenizer directory) or --tokenizer byte"
        ) from None


def convert_from_hf(hf_dir: str, out_dir: str, *, tokenizer: str | None = None) -> str:
    """HF directory -> an arjax run directory (orbax checkpoint at step 0 + tokenizer/) that `generate --ckpt` reads.

    The checkpoint holds weights and the model config only (no optimizer state, no training
    config): ``load_model`` reads it; ``train --resume`` refuses it.
    """
    if os.path.isdir(ckpt.checkpoint_dir(out_dir)) and os.listdir(ckpt.checkpoint_dir(out_dir)):
        raise ValueError(f"{out_dir!r} already holds checkpoints; choose a new --out directory")
    model = hf.from_hf_dir(hf_dir)
    tok = _tokenizer_for_convert(hf_dir, tokenizer)
    check_fits(tok, model.cfg.vocab_size)
    meta = {
        "model_config": model.cfg.to_dict(),
        "tokenizer": getattr(tok, "kind", type(tok).__name__),
        "source": {"hf_dir": os.path.abspath(hf_dir), "hf_config": hf.read_hf_config(hf_dir)},
    }
    manager = ckpt.make_manager(out_dir)
    ckpt.save(manager, 0, params=nnx.state(model, nnx.Param), meta=meta)
    manager.wait_until_finished()
    tok.save(ckpt.tokenizer_dir(out_dir))
    return out_dir


def convert_to_hf(run_dir: str, out_dir: str) -> str:
    """An arjax run directory -> config.json + model.safetensors (+ tokenizer) that transformers loads."""
    model, tok, _ = ckpt.load_model(run_dir)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_id", None) for k in ("eos", "bos", "pad")}
    hf.to_hf_dir(model, out_dir, **ids)
    if isinstance(tok, HFTokenizer):
        tok.save(out_dir)
    else:  # byte/char vocabularies have no transformers tokenizer class; keep ours beside the weights
        tok.save(os.path.join(out_dir, "arjax_tokenizer"))
    return out_dir


def _cmd_convert(args) -> int:
    if bool(args.from_hf) == bool(args.to_hf):
        raise UsageError("pass exactly one of --from-hf DIR (with --out RUN_DIR) or --to-hf OUT_DIR (with --ckpt RUN_DIR)")
    if args.from_hf:
        if not args.out:
            raise UsageError("--from-hf needs --out RUN_DIR (where the arjax checkpoint goes)")
        convert_from_hf(args.from_hf, args.out, tokenizer=args.tokenizer)
        print(f"wrote arjax checkpoint {args.out} from {args.from_hf}; try: arjax generate --ckpt {args.out}")
    else:
        if not args.ckpt:
            raise UsageError("--to-hf needs --ckpt RUN_DIR (the arjax run to export)")
        convert_to_hf(args.ckpt, args.to_hf)
        print(f"wrote Hugging Face checkpoint {args.to_hf} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_tokenizer_train(args) -> int:
    tok = train_bpe(args.data, args.vocab_size, args.out)
    sample = tok.encode("Hello world")
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "hello_world_ids": sample}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert` and `tokenizer` to the main CLI's subparsers; each sets ``func(args) -> int``."""
    p = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and arjax", formatter_class=Help)
    p.add_argument("--from-hf", metavar="DIR", help="HF directory: config.json + *.safetensors (+ tokenizer)")
    p.add_argument("--out", metavar="RUN_DIR", help="arjax run directory to write (with --from-hf)")
    p.add_argument("--to-hf", metavar="OUT_DIR", help="write an HF directory (with --ckpt)")
    p.add_argument("--ckpt", metavar="RUN_DIR", help="arjax run directory to export (with --to-hf)")
    p.add_argument("--tokenizer", help="with --from-hf: tokenizer directory, or 'byte', when DIR has none")
    p.set_defaults(func=_cmd_convert)

    t = subparsers.add_parser("tokenizer", help="tokenizer tools", formatter_class=Help)
    tsub = t.add_subparsers(dest="tokenizer_cmd", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE on a text file (Hugging Face tokenizers)", formatter_class=Help)
    tt.add_argument("--data", required=True, metavar="FILE", help="UTF-8 training text")
    tt.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, >= 257")
    tt.add_argument("--out", default="tokenizer", metavar="DIR", help="where tokenizer.json goes (default: ./tokenizer)")
    tt.set_defaults(func=_cmd_tokenizer_train)
