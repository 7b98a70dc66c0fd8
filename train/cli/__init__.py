"""The `arjax` command: one module per command group.

    train.py      arjax train, arjax eval
    generate.py   arjax generate (streamed)
    convert.py    arjax convert (Hugging Face in and out), arjax tokenizer train
    study.py      arjax study (exposure-bias studies)
    common.py     UsageError (one line on stderr, exit status 2) and the help formatter

Each module's ``register(subparsers)`` adds its commands; each command sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from arjax.train.cli import convert, generate, study, train
from arjax.train.cli.common import UsageError

__all__ = ["main", "build_parser", "UsageError"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arjax",
        description="arjax: train and sample autoregressive language models in JAX. "
        "Start with `arjax train --config tpu_configs/cpu-demo.yaml --out runs/demo`, then "
        "`arjax generate --ckpt runs/demo --prompt \"The \"`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, generate, convert, study):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warnings (a damaged checkpoint skipped, a schedule that never mixes) as one line each.
    warnings.formatwarning = lambda message, *_, **__: f"arjax {args.command}: warning: {message}\n"
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
