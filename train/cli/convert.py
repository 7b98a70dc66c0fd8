"""`arjax convert --from-hf/--to-hf` (Hugging Face interop, arjax.train.convert) and `arjax tokenizer train`."""

from __future__ import annotations

import argparse
import json

from arjax.model.config import INT32_MAX
from arjax.train.cli.common import Help, UsageError
from arjax.train.convert import convert_from_hf, convert_to_hf
from arjax.train.tokenizer import train_bpe


def _cmd_convert(args) -> int:
    if bool(args.from_hf) == bool(args.to_hf):
        raise UsageError("pass exactly one of --from-hf HF_DIR or --to-hf RUN_DIR, each with --out DIR")
    if not args.out:
        raise UsageError(
            "convert needs --out DIR: the arjax run (with --from-hf) or the Hugging Face directory "
            "(with --to-hf) to write"
        )
    if args.from_hf:
        convert_from_hf(args.from_hf, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote arjax checkpoint {args.out} from {args.from_hf}; try: arjax generate --ckpt {args.out}")
    else:
        if args.tokenizer:
            raise UsageError("--tokenizer applies to --from-hf only; --to-hf exports the run's own tokenizer")
        convert_to_hf(args.to_hf, args.out, overwrite=args.overwrite)
        print(f"wrote Hugging Face checkpoint {args.out} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_tokenizer_train(args) -> int:
    if not 1 <= args.vocab_size <= INT32_MAX:
        raise UsageError(f"--vocab-size {args.vocab_size} must be a positive integer below 2**31")
    tok = train_bpe(args.data, args.vocab_size, args.out)
    sample = tok.encode("Hello world")
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "hello_world_ids": sample}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert` and `tokenizer` to the main CLI's subparsers; each sets ``func(args) -> int``."""
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and arjax",
        formatter_class=Help,
        description="`--from-hf HF_DIR --out RUN_DIR` turns a local Hugging Face checkpoint "
        "(config.json, *.safetensors, "
        "tokenizer) into an arjax run directory; `--to-hf RUN_DIR --out HF_DIR` exports a run for transformers. "
        "--out must be new or empty unless --overwrite.",
    )
    p.add_argument(
        "--from-hf", metavar="HF_DIR", help="HF directory to import: config.json + *.safetensors (+ tokenizer)"
    )
    p.add_argument("--to-hf", metavar="RUN_DIR", help="arjax run directory to export")
    p.add_argument(
        "--out", metavar="DIR", help="where to write: the arjax run (--from-hf) or the HF directory (--to-hf)"
    )
    p.add_argument("--tokenizer", help="with --from-hf: a tokenizer directory, or 'byte', when HF_DIR has none")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the contents of a non-empty --out (nothing old is left behind)",
    )
    p.set_defaults(func=_cmd_convert)

    t = subparsers.add_parser("tokenizer", help="tokenizer tools", formatter_class=Help)
    tsub = t.add_subparsers(dest="tokenizer_cmd", required=True)
    tt = tsub.add_parser(
        "train", help="train a byte-level BPE on a text file (Hugging Face tokenizers)", formatter_class=Help
    )
    tt.add_argument("--data", required=True, metavar="FILE", help="UTF-8 training text")
    tt.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, >= 257")
    tt.add_argument(
        "--out", default="tokenizer", metavar="DIR", help="where tokenizer.json goes (default: ./tokenizer)"
    )
    tt.set_defaults(func=_cmd_tokenizer_train)
