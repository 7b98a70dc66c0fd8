"""arjax.train.exposure: exposure-bias research on top of the training core.

schedules.py            gold-token probability schedules over steps and positions (traced pytrees)
scheduled_sampling.py   ScheduledSamplingConfig (a run config's scheduled_sampling: section), the
                        two-pass / K-pass / sequential objectives (ss_loss) and the ScheduledSampling
                        objective of the one train step
oracles.py              sources with exact conditionals: random transformer, HMM, Dyck
metrics.py              exact exposure-bias metrics against an oracle (ExAccErr, KLs, EB-C, repetition)
study.py                StudyConfig and run_study: methods x seeds x decodings, trained through the
                        one loop, every finished run persisted (resumable)
report.py               summaries over seeds, plots and report.md
"""
