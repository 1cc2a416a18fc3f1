"""Evaluation: metric math, model loading for evaluation, multiple choice, greedy answers,
lm-eval, plots, the report table and the gate. A library: imports train and storage, never the
run layer or Dagster."""
