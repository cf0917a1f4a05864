"""Evaluation: per-case records, summaries, text reports, figures, evaluation runs.

Modules, each depending only on those before it: records (per-case records
and the stopping rule read from a round history), summaries (statistics over
cases, sweeps, comparisons), report (the paper-style text), plots (PNG
figures), spec (EvalSpec: the models' TrainSpec and the inference
settings), runs (a fold's evaluation and the segmentation of files from
trained runs: the one module here that reaches into train and infer). The
metrics themselves are `stnjax.metrics`, which inference uses on device too.
"""
