"""`arjax study CONFIG [--out DIR]`: run an exposure-bias study grid and write its report folder."""

from __future__ import annotations

import os


def cmd_study(args) -> int:
    from arjax.train.study import load_study, run_study

    cfg = load_study(args.config)
    out = args.out or os.path.join("studies", cfg.name)
    run_study(cfg, out)
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="run an exposure-bias study (oracle or text; teacher forcing vs scheduled sampling x seeds x decodings)",
        description="Train every method x seed of the study config, measure exposure bias exactly against the "
        "oracle (ExAccErr, KLs, EB-C, repetition) with each decoding strategy, and write report.md, PNG plots "
        "and results.json. Example configs: docs/studies/*.yaml.",
    )
    p.add_argument("config", help="study YAML (see docs/studies/)")
    p.add_argument("--out", metavar="DIR", default=None, help="report folder (default: studies/<name>)")
    p.set_defaults(func=cmd_study)
