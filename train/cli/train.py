"""`arjax train` (teacher forcing or scheduled sampling, from a run config), `arjax eval` and `arjax checkpoints`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arjax.model.sharding import PRESET_NAMES, init_distributed, is_main_process, parse_mesh
from arjax.train.checkpoint import read_meta, verify
from arjax.train.cli import common
from arjax.train.cli.common import Help, UsageError, add_mesh_flags
from arjax.train.config import TrainConfig, from_dict, load_yaml
from arjax.train.evaluate import evaluate_run
from arjax.train.loop import train

# CLI flag -> TrainConfig field, for the common overrides.
_TRAIN_FLAGS = {
    "data": "data",
    "data_errors": "data_errors",
    "model": "model",
    "tokenizer": "tokenizer",
    "steps": "steps",
    "batch_size": "batch_size",
    "seq_len": "seq_len",
    "accum_steps": "accum_steps",
    "lr": "lr",
    "warmup_steps": "warmup_steps",
    "min_lr": "min_lr",
    "weight_decay": "weight_decay",
    "seed": "seed",
    "eval_interval": "eval_interval",
    "ckpt_interval": "ckpt_interval",
    "log_interval": "log_interval",
    "sharding": "sharding",
}


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` (value parsed as YAML) -> nested overrides.

    A dotted key sets a nested key: ``scheduled_sampling.feed=argmax``,
    ``scheduled_sampling.schedule.step.c=1e-4``; ``model.KEY`` is short for ``model_overrides.KEY``.
    """
    return common.parse_set(
        items,
        examples="--set weight_decay=0.05 or --set model.dropout=0.1",
        nested_example="--set scheduled_sampling.feed=argmax",
        aliases={"model": "model_overrides"},
    )


def train_config_from_args(args) -> TrainConfig:
    """The run config: the file (or, resuming without one, the run's own saved config, else the
    defaults), then the flags, then ``--set``; merged as mappings and checked once, so a flag can
    fix what the file alone would not allow."""
    overrides = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.mesh is not None:
        overrides["mesh"] = parse_mesh(args.mesh)
    if args.config:
        base = load_yaml(args.config, "config file", "tpu_configs/")
    elif args.resume:
        # Resuming without --config: continue with the run's own saved config, not the defaults.
        meta = read_meta(args.out)[1]
        if "train_config" not in meta:
            raise UsageError(
                f"{args.out!r} holds converted weights (no run config, no optimizer state); it cannot be resumed"
            )
        base = meta["train_config"]
    else:
        base = {}
    merged = common.merge({**base, **overrides}, parse_set(args.set or []))
    where = f"{args.config}: " if args.config else ""
    try:
        return from_dict(merged)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}{e}") from None


def cmd_train(args) -> int:
    # Before anything touches a device: one process of several joins the others.
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = train_config_from_args(args)
    result = train(cfg, args.out, resume=args.resume, quiet=args.quiet)
    val = result["val_losses"][-1][1] if result["val_losses"] else float("nan")
    loss = result["losses"][-1] if result["losses"] else float("nan")
    ss = ""
    if cfg.scheduled_sampling is not None and result["history"].get("mix_rate"):
        ss = f", mixing rate {result['history']['mix_rate'][-1]:.3f}"
    if is_main_process():  # one summary for a run of several processes
        print(
            f"trained to step {result['final_step']}: train loss {loss:.4f}{ss}, val loss {val:.4f}, "
            f"{result['tokens_per_s']:,.0f} tokens/s; checkpoint in {args.out}"
        )
    return 0


def cmd_eval(args) -> int:
    r = evaluate_run(args.ckpt, args.data, batch_size=args.batch_size, iters=args.iters)
    where = args.data or "the run's validation split"
    print(f"{where}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} over {r['tokens']:,} tokens")
    return 0


def cmd_checkpoints(args) -> int:
    report = verify(args.run)  # a file or a missing directory: one error naming it
    if not report:
        raise UsageError(f"{args.run!r} holds no checkpoint (looked in {args.run}/checkpoints)")
    for r in report:
        status = "ok     " if r["ok"] else "DAMAGED"
        print(
            f"step {r['step']:>8}  {status}  {'+'.join(r['items']) or '-':<16} "
            f"{r['bytes'] / 1e6:9.2f} MB  {r['detail']}"
        )
    intact = [r["step"] for r in report if r["ok"]]
    weights = [r["step"] for r in report if r["params_ok"]]
    use = f"generate and eval use step {weights[-1]}" if weights else "generate and eval find no intact weights"
    use += f", --resume uses step {intact[-1]}" if intact else ", --resume finds no intact checkpoint"
    print(f"{len(intact)} of {len(report)} checkpoints intact; {use}")
    return 0 if intact and report[-1]["ok"] else 1


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML run config (tpu_configs/*.yaml) or from defaults",
        description="Train a decoder-only transformer with teacher forcing, or with scheduled sampling when the "
        "config has a scheduled_sampling: section. Settings come from --config (a YAML file of TrainConfig keys), "
        "then from the flags below, which override it. Checkpoints, the tokenizer and metrics.jsonl go to --out; "
        "`arjax generate --ckpt OUT` then needs nothing else.",
        formatter_class=Help,
    )
    p.add_argument(
        "--config", metavar="YAML", help="run config file, e.g. tpu_configs/cpu-demo.yaml (default: built-in defaults)"
    )
    p.add_argument(
        "--out", metavar="DIR", default="runs/default", help="run directory for checkpoints, tokenizer and metrics"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (exactly reproducible); "
        "without --config it reuses the run's saved config",
    )
    p.add_argument(
        "--data",
        metavar="FILE|DIR",
        help="UTF-8 text file, or a directory written by `arjax data prepare`, to train on "
        "(default: the config's; none means Python's bundled pydoc topics)",
    )
    p.add_argument(
        "--data-errors",
        choices=("strict", "replace"),
        help="bytes of --data that are not UTF-8: refuse the file (strict) or read them as U+FFFD (replace) "
        "(default: the config's, else strict)",
    )
    p.add_argument(
        "--model",
        metavar="PRESET",
        help="model preset name, e.g. demo, tiny, shakespeare-char, gpt2-small (default: the config's)",
    )
    p.add_argument("--tokenizer", choices=("byte", "char", "hf"), help="tokenizer kind (default: the config's)")
    p.add_argument("--steps", type=int, metavar="N", help="number of optimizer updates (default: the config's)")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per micro-batch (default: the config's)")
    p.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        help="tokens per training window (default: the config's, else the model's max_len)",
    )
    p.add_argument(
        "--accum-steps", type=int, metavar="N", help="micro-batches accumulated per update (default: the config's)"
    )
    p.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default: the config's)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup steps (default: the config's)")
    p.add_argument(
        "--min-lr",
        type=float,
        metavar="LR",
        help="learning rate at the end of the cosine decay (default: the config's)",
    )
    p.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW weight decay (default: the config's)")
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed for init, batch sampling, dropout and scheduled-sampling coins (default: the config's)",
    )
    p.add_argument(
        "--eval-interval", type=int, metavar="N", help="steps between validation evaluations (default: the config's)"
    )
    p.add_argument("--ckpt-interval", type=int, metavar="N", help="steps between checkpoints (default: the config's)")
    p.add_argument(
        "--log-interval", type=int, metavar="N", help="steps between loss fetches/log lines (default: the config's)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other TrainConfig key, repeatable; model.KEY=VALUE overrides the model preset, "
        "dotted keys reach nested ones, e.g. scheduled_sampling.feed=argmax",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_flags(p)
    p.add_argument(
        "--sharding",
        choices=PRESET_NAMES,
        help="how parameters are placed on the mesh (default: the config's, else auto)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-host: address of process 0 (or JAX_COORDINATOR_ADDRESS; TPU pods need none)",
    )
    p.add_argument(
        "--num-processes", type=int, metavar="N", help="multi-host: number of processes (or JAX_NUM_PROCESSES)"
    )
    p.add_argument(
        "--process-id", type=int, metavar="I", help="multi-host: this process's id, 0..N-1 (or JAX_PROCESS_ID)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a trained run",
        description="Evaluate a run's latest checkpoint: mean next-token loss and perplexity (teacher forced).",
        formatter_class=Help,
    )
    p.add_argument("--ckpt", metavar="DIR", required=True, help="run directory written by `arjax train --out DIR`")
    p.add_argument(
        "--data", metavar="FILE", help="text file to evaluate on, all of it (default: the run's own validation split)"
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per batch (default: the run's batch_size)")
    p.add_argument("--iters", type=int, metavar="N", help="number of batches (default: the run's eval_iters)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "checkpoints",
        help="list a run's checkpoints and verify each against its fingerprints",
        description="Read every checkpoint of a run and compare each array with the fingerprint recorded when it was "
        "saved. Exit status 0 when the newest is intact, 1 when it is damaged (loaders then fall back to the newest "
        "intact one).",
        formatter_class=Help,
    )
    p.add_argument("run", metavar="RUN_DIR", help="run directory written by `arjax train --out RUN_DIR`")
    p.set_defaults(func=cmd_checkpoints)
