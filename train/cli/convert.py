"""`arjax convert --from-hf/--to-hf` and `arjax tokenizer train` (Hugging Face interop), and the loader behind `generate --hf`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from collections.abc import Iterator

from flax import nnx

from arjax.model import hf
from arjax.model.config import INT32_MAX
from arjax.train import checkpoint as ckpt
from arjax.train.cli.common import Help, UsageError
from arjax.train.tokenizer import ByteTokenizer, HFTokenizer, check_fits, load_hf_tokenizer, load_tokenizer, train_bpe

# Files that make a directory hold a tokenizer transformers can read.
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def load_hf_for_generate(hf_dir: str):
    """``(model, tokenizer)`` straight from a local HF checkpoint directory (config.json, *.safetensors, tokenizer)."""
    model = hf.from_hf_dir(hf_dir)
    tokenizer = _hf_dir_tokenizer(hf_dir)
    check_fits(tokenizer, model.cfg.vocab_size, covers=True)
    return model, tokenizer


def _hf_dir_tokenizer(hf_dir: str):
    ours = os.path.join(hf_dir, "arjax_tokenizer")  # what --to-hf writes for byte and char runs
    if os.path.isdir(ours):
        return load_tokenizer(ours)
    if not any(all(os.path.isfile(os.path.join(hf_dir, f)) for f in files) for files in _TOKENIZER_FILES):
        raise ValueError(
            f"{hf_dir!r} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model); a converted "
            "checkpoint carries its tokenizer so that generate needs nothing else: pass --tokenizer DIR (a "
            "tokenizer directory) or --tokenizer byte"
        )
    return load_hf_tokenizer(hf_dir)


def _tokenizer_for_convert(hf_dir: str, override: str | None):
    if override == "byte":
        return ByteTokenizer()
    if override:
        if not os.path.isdir(override):
            raise ValueError(f"--tokenizer {override!r} is not a directory; pass a tokenizer directory or 'byte'")
        return load_tokenizer(override)
    return _hf_dir_tokenizer(hf_dir)


@contextlib.contextmanager
def _fresh_dir(out_dir: str, overwrite: bool, *, sources: tuple[str, ...]) -> Iterator[str]:
    """A new, empty directory to write into, which replaces ``out_dir`` only once everything is written.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then its old contents go away entirely
    (no stale tokenizer.json beside new weights). A failure leaves ``out_dir`` as it was. ``out_dir``
    may never be, or hold, any of the ``sources`` being read (overwriting it would delete them).
    """
    if not out_dir:
        raise UsageError("--out is empty; pass a directory")
    out_dir = os.path.realpath(out_dir)
    for src in map(os.path.realpath, sources):
        if os.path.commonpath([src, out_dir]) == out_dir:
            raise UsageError(f"--out {out_dir!r} is or holds {src!r}, which is being converted; choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out {out_dir!r} is a file; choose a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UsageError(f"--out {out_dir!r} is not empty; pass --overwrite to replace its contents, or choose a new directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.arjax-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.isdir(out_dir):
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.arjax-old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_from_hf(hf_dir: str, out_dir: str, *, tokenizer: str | None = None, overwrite: bool = False) -> str:
    """HF directory -> an arjax run directory (orbax checkpoint at step 0 + tokenizer/) that `generate --ckpt` reads.

    The checkpoint holds weights and the model config only (no optimizer state, no training
    config): ``load_model`` reads it; ``train --resume`` refuses it. The tokenizer must cover the
    model's vocabulary (up to padding), so a byte tokenizer cannot be paired with a GPT-2 model.
    """
    model = hf.from_hf_dir(hf_dir)
    tok = _tokenizer_for_convert(hf_dir, tokenizer)
    check_fits(tok, model.cfg.vocab_size, covers=True)
    meta = {
        "model_config": model.cfg.to_dict(),
        "tokenizer": getattr(tok, "kind", type(tok).__name__),
        "source": {"hf_dir": os.path.abspath(hf_dir), "hf_config": hf.read_hf_config(hf_dir)},
    }
    sources = (hf_dir,) + ((tokenizer,) if tokenizer and tokenizer != "byte" else ())
    with _fresh_dir(out_dir, overwrite, sources=sources) as tmp:
        tok.save(ckpt.tokenizer_dir(tmp))
        manager = ckpt.make_manager(tmp)
        ckpt.save(manager, 0, params=nnx.state(model, nnx.Param), meta={**meta, "tokenizer_sha256": ckpt.tokenizer_digest(tmp)})
        manager.wait_until_finished()
        manager.close()
    return out_dir


def convert_to_hf(run_dir: str, out_dir: str, *, overwrite: bool = False) -> str:
    """An arjax run directory -> config.json + model.safetensors (+ tokenizer) that transformers loads."""
    model, tok, _ = ckpt.load_model(run_dir)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_id", None) for k in ("eos", "bos", "pad")}
    with _fresh_dir(out_dir, overwrite, sources=(run_dir,)) as tmp:
        hf.to_hf_dir(model, tmp, **ids)
        if isinstance(tok, HFTokenizer):
            tok.save(tmp)
        else:  # byte/char vocabularies have no transformers tokenizer class; keep ours beside the weights
            tok.save(os.path.join(tmp, "arjax_tokenizer"))
    return out_dir


def _cmd_convert(args) -> int:
    if bool(args.from_hf) == bool(args.to_hf):
        raise UsageError("pass exactly one of --from-hf HF_DIR or --to-hf RUN_DIR, each with --out DIR")
    if not args.out:
        raise UsageError("convert needs --out DIR: the arjax run (with --from-hf) or the Hugging Face directory (with --to-hf) to write")
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
        "convert", help="convert checkpoints between Hugging Face and arjax", formatter_class=Help,
        description="`--from-hf HF_DIR --out RUN_DIR` turns a local Hugging Face checkpoint (config.json, *.safetensors, "
        "tokenizer) into an arjax run directory; `--to-hf RUN_DIR --out HF_DIR` exports a run for transformers. "
        "--out must be new or empty unless --overwrite.",
    )
    p.add_argument("--from-hf", metavar="HF_DIR", help="HF directory to import: config.json + *.safetensors (+ tokenizer)")
    p.add_argument("--to-hf", metavar="RUN_DIR", help="arjax run directory to export")
    p.add_argument("--out", metavar="DIR", help="where to write: the arjax run (--from-hf) or the HF directory (--to-hf)")
    p.add_argument("--tokenizer", help="with --from-hf: a tokenizer directory, or 'byte', when HF_DIR has none")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out (nothing old is left behind)")
    p.set_defaults(func=_cmd_convert)

    t = subparsers.add_parser("tokenizer", help="tokenizer tools", formatter_class=Help)
    tsub = t.add_subparsers(dest="tokenizer_cmd", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE on a text file (Hugging Face tokenizers)", formatter_class=Help)
    tt.add_argument("--data", required=True, metavar="FILE", help="UTF-8 training text")
    tt.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, >= 257")
    tt.add_argument("--out", default="tokenizer", metavar="DIR", help="where tokenizer.json goes (default: ./tokenizer)")
    tt.set_defaults(func=_cmd_tokenizer_train)
