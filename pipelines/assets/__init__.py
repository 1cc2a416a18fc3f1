"""The asset graph: teacher_model -> corpus -> finetuned_teachers -> teacher_logits (per shard) -> student_model,
baseline_student -> evaluation; with on-policy rounds, student_model -> onpolicy_student (per round) ->
onpolicy_evaluation."""
