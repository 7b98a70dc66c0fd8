"""arjax.train: the training core, the command line and the exposure-bias research tools.

The core (this folder):
    config.py       TrainConfig (frozen, strict) and the one YAML loader for every config file
    data.py         the corpus (a text file or the bundled pydoc topics), tokenized and split;
                    batch sources (Windows of a corpus, Rows of fixed sequences), each batch a
                    pure function of (seed, step); batch_feeder / place_eval_windows put them on
                    a run's devices
    prepare.py      `arjax data prepare`: files tokenized in parallel into token shards + a manifest
    shards.py       the prepared format read back: open_prepared(dir) checks a directory and
                    memory-maps its train/val token arrays
    tokenizer.py    byte, char and Hugging Face tokenizers behind one interface; load_tokenizer(dir)
    loss.py         the one next-token cross-entropy
    optim.py        AdamW + warmup/cosine + clipping + weight-decay mask (make_optimizer)
    step.py         the one jitted train step over any objective (TeacherForcing, ...), the eval step
    perf.py         model FLOPs per token, device peak FLOP/s and memory, MFU
    loop.py         the one training loop (fit), and train(cfg, run_dir) for text corpora
    runlog.py       a run's log: metrics.jsonl, TensorBoard, the progress bar (RunLog), and the
                    per-interval reading of step metrics (StepMeter)
    checkpoint.py   orbax checkpoints: the one writer (save), verified restore, load_model(run_dir),
                    and the resume guards (check_resume, check_same_run)
    evaluate.py     a run's checkpoint evaluated: loss and perplexity on its validation split or a file
    load.py         loading a model to decode with (a run or a Hugging Face directory; a draft model)
    convert.py      Hugging Face interop for run directories: an HF checkpoint into a run, a run out

Subpackages:
    cli/            the `arjax` command, one module per command group
    exposure/       research: schedules, the scheduled-sampling objective, oracles, exposure-bias
                    metrics, the study runner and its report
"""
