"""arjax.train: the training core, the command line and the exposure-bias research tools.

The core (this folder):
    config.py       TrainConfig (frozen, strict) and the one YAML loader for every config file
    data.py         the corpus (a text file or the bundled pydoc topics), tokenized and split;
                    batch sources (Windows of a corpus, Rows of fixed sequences), each batch a
                    pure function of (seed, step)
    prepare.py      `arjax data prepare`: files tokenized in parallel into token shards + a
                    manifest; open_prepared(dir) memory-maps them back (train/val token arrays)
    tokenizer.py    byte, char and Hugging Face tokenizers behind one interface; load_tokenizer(dir)
    loss.py         the one next-token cross-entropy
    optim.py        AdamW + warmup/cosine + clipping + weight-decay mask (make_optimizer)
    step.py         the one jitted train step over any objective (TeacherForcing, ...), the eval step
    loop.py         the one training loop (fit), and train(cfg, run_dir) for text corpora
    checkpoint.py   orbax checkpoints: the one writer (save), restore, load_model(run_dir)

Subpackages:
    cli/            the `arjax` command, one module per command group
    exposure/       research: schedules, the scheduled-sampling objective, oracles, exposure-bias
                    metrics, the study runner and its report
"""
