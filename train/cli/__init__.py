"""The `arjax` command: one module per command group. Commands parse their flags and call the library.

    train.py      arjax train, arjax eval (arjax.train.evaluate), arjax checkpoints
    generate.py   arjax generate, streamed (arjax.decode.stream_text)
    batch.py      arjax generate --input/--output: a file of prompts through the engine, resumable
    serve.py      arjax serve (arjax.decode.server over arjax.decode.engine)
    convert.py    arjax convert (arjax.train.convert: Hugging Face in and out), arjax tokenizer train
    study.py      arjax study (exposure-bias studies)
    data.py       arjax data prepare (token shards + manifest), arjax data verify
    common.py     what they share: UsageError (one line on stderr, exit status 2), the help formatter,
                  --set, the flag groups (model, quantization, mesh, sampling from
                  arjax.decode.sampling.SAMPLING_FIELDS), the model and engine those flags give
                  (arjax.train.load), and the one out-of-memory message

Each module's ``register(subparsers)`` adds its commands; each command sets ``func(args) -> int``.
Command modules import only ``common`` and library modules, never each other; this dispatcher hands
`generate` its batch-job runner (``batch.cmd_batch``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Sequence

from arjax.train.checkpoint import CheckpointWarning
from arjax.train.cli import batch, convert, data, generate, serve, study, train
from arjax.train.cli.common import Parser, UsageError, os_error_message, quiet_libraries

__all__ = ["main", "build_parser", "UsageError"]


def build_parser() -> Parser:
    parser = Parser(
        prog="arjax",
        description="arjax: train and sample autoregressive language models in JAX. "
        "Start with `arjax train --config tpu_configs/cpu-demo.yaml --out runs/demo`, then "
        '`arjax generate --ckpt runs/demo --prompt "The "`.',
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.register(sub)
    generate.register(sub, batch_job=batch.cmd_batch)
    for module in (serve, convert, study, data):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        quiet = contextlib.nullcontext() if os.environ.get("ARJAX_DEBUG") else quiet_libraries()
        with warnings.catch_warnings(), quiet:
            # Our warnings (a damaged checkpoint skipped, a schedule that never mixes), every time, one line each.
            warnings.simplefilter("always", CheckpointWarning)
            warnings.showwarning = lambda message, *_, **__: print(
                f"arjax {args.command}: warning: {message}", file=sys.stderr
            )
            return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("ARJAX_DEBUG"):
            raise
        # Bad user input or an OS refusal (disk full, permission): one line, no traceback (ARJAX_DEBUG=1 shows it).
        message = os_error_message(e) if isinstance(e, OSError) else " ".join(str(e).split())
        print(f"arjax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arjax {args.command}: interrupted", file=sys.stderr)
        return 130
