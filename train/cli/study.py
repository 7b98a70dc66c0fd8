"""`arjax study CONFIG [--out DIR] [--resume]`: run an exposure-bias study grid and write its report folder."""

from __future__ import annotations

import os
import sys

from arjax.train.cli.common import Help
from arjax.train.exposure.study import load_study, run_study


def cmd_study(args) -> int:
    cfg = load_study(args.config)
    out = args.out or os.path.join("studies", cfg.name)
    run_study(cfg, out, resume=args.resume, quiet=args.quiet or not sys.stdout.isatty())
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="run an exposure-bias study (oracle or text; teacher forcing vs scheduled sampling x seeds x decodings)",
        description="Train every method x seed of the study config through the training loop, measure exposure bias "
        "exactly against the oracle (ExAccErr, KLs, EB-C, repetition) with each decoding strategy, and write "
        "report.md, PNG plots and results.json. Every finished run is kept under OUT/runs/, so a study stopped "
        "midway continues with --resume. Example configs: docs/studies/*.yaml.",
        formatter_class=Help,
    )
    p.add_argument("config", help="study YAML (see docs/studies/)")
    p.add_argument("--out", metavar="DIR", default=None, help="report folder (default: studies/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out: finished runs are read back, an interrupted one continues from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study)
