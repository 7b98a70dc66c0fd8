"""`arjax study CONFIG [--out DIR] [--resume] [--set KEY=VALUE]`: run an exposure-bias study grid
and write its report folder."""

from __future__ import annotations

import os
import sys

from arjax.train.cli.common import Help, UsageError, merge, parse_set


def cmd_study(args) -> int:
    # Imported here, not at the top: the study's metrics pull in scipy, which every other command would pay for.
    from arjax.train.config import load_yaml
    from arjax.train.exposure.study import run_study, study_from_dict

    base = load_yaml(args.config, "study config", "docs/studies/")
    sets = parse_set(
        args.set or [], examples="--set train.steps=100 or --set seeds=[0]", nested_example="--set train.steps=100"
    )
    try:
        cfg = study_from_dict(merge(base, sets))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{args.config}: {e}") from None
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in --out: finished runs are read back, "
        "an interrupted one continues from its checkpoint",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the study config, repeatable; a dotted key reaches a nested one, the value "
        "is YAML (--set train.steps=100 --set seeds=[0] --set eval.n_rollouts=64); unknown keys are "
        "errors. --resume needs the same overrides",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study)
