"""`arjax data prepare` (files -> token shards + manifest, tokenized in parallel) and `arjax data verify`."""

from __future__ import annotations

import time

from arjax.train.cli.common import Help
from arjax.train.prepare import (
    DEFAULT_SHARD_TOKENS,
    default_workers,
    open_prepared,
    prepare,
)


def _cmd_prepare(args) -> int:
    start = time.perf_counter()
    m = prepare(
        args.data,
        args.out,
        tokenizer=args.tokenizer,
        tokenizer_path=args.tokenizer_path,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - start
    (a, b), (_, c) = m["split"]["train"], m["split"]["val"]
    print(
        f"prepared {m['tokens']:,} tokens ({b - a:,} train / {c - b:,} val) from {m['documents']:,} document(s) in "
        f"{len(m['sources'])} file(s): {len(m['shards'])} {m['dtype']} shard(s), {m['tokenizer']['kind']} tokenizer "
        f"({m['vocab_size']:,} tokens), {seconds:.1f} s; "
        f"train with: arjax train --data {args.out} --tokenizer {m['tokenizer']['kind']}"
    )
    return 0


def _cmd_verify(args) -> int:
    p = open_prepared(args.dir, verify=True)
    m = p.manifest
    print(
        f"{args.dir}: intact: {len(m['shards'])} shard(s), {m['tokens']:,} tokens ({len(p.train):,} train / "
        f"{len(p.val):,} val), {m['tokenizer']['kind']} tokenizer; digest {p.digest}"
    )
    return 0


def register(subparsers) -> None:
    """Add `data prepare` and `data verify` to the main CLI's subparsers."""
    d = subparsers.add_parser(
        "data",
        help="prepare training data as token shards (for corpora too big to tokenize at every start)",
        formatter_class=Help,
    )
    dsub = d.add_subparsers(dest="data_cmd", metavar="COMMAND", required=True)
    p = dsub.add_parser(
        "prepare",
        help="tokenize text, JSONL, parquet or Hugging Face dataset files into token shards + a manifest",
        formatter_class=Help,
        description="Tokenize the --data files with several processes into DIR: little-endian uint16 (uint32 for "
        "vocabularies over 65536) token shards, the tokenizer, and manifest.json "
        "(shards with token counts and SHA-256, "
        'the train/val split, the sources). Documents are joined by "\\n\\n" (byte, char) '
        "or the tokenizer's EOS (hf); "
        "the last --val-fraction of the tokens is validation, so one text file gives exactly the batches `arjax train "
        "--data FILE` gives. Train with `arjax train --data DIR`. DIR is written whole or not at all.",
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="UTF-8 text files (one document each), .jsonl files (one document per line), .parquet files, "
        "Hugging Face dataset directories (Dataset.save_to_disk), or directories of such files",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared dataset directory to write")
    p.add_argument("--tokenizer", choices=("byte", "char", "hf"), default="byte", help="tokenizer kind")
    p.add_argument("--tokenizer-path", metavar="DIR", help="with --tokenizer hf: a directory with tokenizer.json")
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="the JSONL field or parquet/Arrow column holding the text"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="the last fraction of the tokens that is validation",
    )
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens per shard file")
    p.add_argument("--workers", type=int, default=default_workers(), metavar="N", help="tokenizing processes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (nothing old is left behind)")
    p.set_defaults(func=_cmd_prepare)

    v = dsub.add_parser(
        "verify", help="check a prepared dataset: manifest, shard sizes and SHA-256, tokenizer", formatter_class=Help
    )
    v.add_argument("dir", metavar="DIR", help="a directory written by `arjax data prepare`")
    v.set_defaults(func=_cmd_verify)
