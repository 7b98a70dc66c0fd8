"""arjax.train: data, tokenizers, the teacher-forced train step, checkpoints and the CLI."""
