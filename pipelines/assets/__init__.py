"""The asset graph: teacher_model -> corpus -> teacher_logits (per shard) -> student_model,
baseline_student -> evaluation."""
