"""The distilled student and the cross-entropy-only baseline (same data order and steps)."""

import base64
from pathlib import Path

import dagster as dg

from distill import pipeline
from pipelines.resources import DistillSettings


def _result(summary: dict) -> dg.MaterializeResult:
    metadata = {
        "model_dir": dg.MetadataValue.path(str(Path(summary["out_dir"]) / "model")),
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "final_ce": summary["final_ce"],
        "final_kd": summary["final_kd"],
        "parameters": summary["parameters"],
        "reused": summary["reused"],
    }
    plot = Path(summary["out_dir"]) / "loss.png"
    if plot.exists():
        encoded = base64.b64encode(plot.read_bytes()).decode()
        metadata["loss_curve"] = dg.MetadataValue.md(f"![loss](data:image/png;base64,{encoded})")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(Path(summary["out_dir"]).name))


@dg.asset(group_name="student", deps=["teacher_logits"], automation_condition=dg.AutomationCondition.eager(), description="Student trained on the train shards with KD + cross-entropy (save_pretrained, safetensors).")
def student_model(settings: DistillSettings) -> dg.MaterializeResult:
    return _result(pipeline.train_student(settings.load(), baseline=False))


@dg.asset(group_name="student", deps=["teacher_logits"], automation_condition=dg.AutomationCondition.eager(), description="The same student, data order and steps with cross-entropy only.")
def baseline_student(settings: DistillSettings) -> dg.MaterializeResult:
    return _result(pipeline.train_student(settings.load(), baseline=True))
