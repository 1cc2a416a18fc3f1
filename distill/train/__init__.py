"""Training: the pure distillation losses, the student builder, cross-tokenizer alignment and the
trainer that streams soft-label shards. A library: imports storage and the shared modules at the
top of ``distill``, never the run layer or Dagster."""
