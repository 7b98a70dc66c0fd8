"""Evaluating a run: mean next-token loss and perplexity of its checkpoint, on its own validation split or a file."""

from __future__ import annotations

import math
import os

import numpy as np
from flax import nnx

from arjax.model import memory
from arjax.train import data as data_lib
from arjax.train.checkpoint import check_data, check_text, load_model, read_meta
from arjax.train.shards import open_prepared
from arjax.train.step import make_eval_step


def evaluate_run(
    run_dir: str, data: str | None = None, *, batch_size: int | None = None, iters: int | None = None
) -> dict[str, float]:
    """Mean NLL and perplexity of a run's latest checkpoint.

    Without ``data``: the run's own validation split and windows, so the number matches the
    val loss the training log reported. With ``data``: evenly spaced windows over the whole file.
    Converted weights (no training run) need ``data``.
    """
    for name, value in (("batch_size", batch_size), ("iters", iters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1):
            raise ValueError(
                f"--{name.replace('_', '-')} {value} must be an integer in [1, 2**31 - 1] (omit it for "
                "the run's own value)"
            )
    model, tokenizer, cfg = load_model(run_dir)
    if cfg is None and data is None:
        raise ValueError(f"{run_dir!r} holds converted weights with no training data of its own; pass --data FILE")
    T = model.cfg.max_len if cfg is None else cfg.context_len(model.cfg)
    B = batch_size if batch_size is not None else (8 if cfg is None else cfg.batch_size)
    E = iters if iters is not None else (8 if cfg is None else cfg.eval_iters)
    if data is None and cfg.data is not None and os.path.isdir(cfg.data):  # a prepared dataset
        prepared = open_prepared(cfg.data)
        check_data(
            run_dir,
            read_meta(run_dir)[1],
            prepared.digest,
            found=f"the prepared data in {cfg.data!r}",
            expected="the data",
            fix=f"{cfg.data!r} is the run's data path, read from {os.getcwd()!r}: run eval from where you "
            "trained, or pass --data FILE to evaluate on a file of your choice",
        )
        ids = prepared.val
    elif data is None:
        text = data_lib.read_text(cfg.data, cfg.data_errors)
        check_text(
            run_dir,
            read_meta(run_dir)[1],
            text,
            fix=f"{cfg.data!r} is the run's data path, read from {os.getcwd()!r}: run eval from where you "
            "trained, or pass --data FILE to evaluate on a file of your choice",
        )
        ids = data_lib.tokenize_and_split(text, tokenizer, val_fraction=cfg.val_fraction).val
    else:
        ids = np.asarray(tokenizer.encode(data_lib.read_text(data)), dtype=np.int32)
    tokens = E * B * (T + 1)
    memory.check_needs(
        [  # before the windows are built: a huge --batch-size is one line, not an allocation failure
            *memory.loaded_needs(nnx.state(model)),
            memory.Need(
                f"the evaluation windows on the host (--iters {E} x --batch-size {B} x {T + 1} tokens)",
                4 * tokens,
                "lower --batch-size or --iters",
                per_device=False,
            ),
            memory.Need(
                f"the evaluation windows on the device (--iters {E} x --batch-size {B} x {T + 1} tokens)",
                4 * tokens,
                "lower --batch-size or --iters",
            ),
            memory.Need(
                f"one batch's activations (--batch-size {B} x {T} tokens x d_model={model.cfg.d_model})",
                memory.activation_bytes(model.cfg, B, T, layers=1),
                "lower --batch-size",
            ),
        ]
    )
    windows = data_lib.eval_windows(ids, n_windows=E * B, seq_len=T).reshape(E, B, T + 1)
    graphdef, params = nnx.split(model)
    loss = float(make_eval_step(graphdef, pad_id=tokenizer.pad_id)(params, windows))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(E * B * T)}
