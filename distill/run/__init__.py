"""The run layer: turns a ``RunConfig`` into cached artifacts (labels, students, reports,
on-policy rounds) by calling the teacher, train and eval libraries. The Dagster assets in
``pipelines/`` are thin shells over these functions."""
