"""Held-out evaluation of teacher, distilled student and baseline, with a blocking gate."""

import base64
from pathlib import Path

import dagster as dg

from distill.run import evaluating
from pipelines.assets.report import report_metadata
from pipelines.resources import DistillSettings, TeacherEngine

# per-model numbers kept as metadata (their history plots in the UI)
EVALUATION_METRICS = (
    "ppl",
    "gold_ppl",
    "bpb",
    "kl",
    "kl_full",
    "top1",
    "ece",
    "accuracy",
    "choice_agreement",
    "greedy_exact_match",
    "greedy_prefix_agreement",
    "mc_accuracy",
    "generation_tokens_per_s",
)


@dg.asset(
    group_name="evaluation",
    deps=["student_model", "baseline_student", "teacher_logits"],
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec(
            "distillation_gate",
            asset="evaluation",
            blocking=True,
            description="The distilled student beats the CE-only baseline (by eval.min_ppl_margin / "
            "min_bpb_margin) and its initialization on held-out perplexity and bits per byte.",
        )
    ],
    description="Perplexity, KL(teacher‖model) and top-1 agreement on held-out shards (the teacher's from its stored "
    "labels).",
)
def evaluation(
    context: dg.AssetExecutionContext, settings: DistillSettings, teacher_engine: TeacherEngine
) -> dg.MaterializeResult:
    # teacher_engine: with eval.teacher_backend "stored" the teacher's greedy answers and
    # multiple-choice scores come from its vLLM engine, shut down when this step ends
    report = evaluating.evaluate_run(settings.load())
    context.log.info("\n" + report["table"] + "\n" + report["summary"])
    metadata = report_metadata(report, EVALUATION_METRICS, prefixes=("lm_eval_",))
    if report["generation_speedup"]:
        metadata["generation_speedup"] = float(report["generation_speedup"])
    plots = {
        f"plot_{name}": dg.MetadataValue.md(
            f"![{name}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"
        )
        for name, path in report["plots"].items()
    }
    return dg.MaterializeResult(
        metadata={**metadata, **plots},
        check_results=[
            dg.AssetCheckResult(
                check_name="distillation_gate", passed=report["gate_passed"], metadata={"gate": report["gate"]}
            )
        ],
    )
