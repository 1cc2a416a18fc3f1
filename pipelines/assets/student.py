"""The distilled student and the cross-entropy-only baseline (same data order and steps)."""

import base64
from pathlib import Path

import dagster as dg

from distill.procs import guard_children
from distill.run import training
from pipelines.resources import DistillSettings


def _result(summary: dict, progress: list[dict] | None = None) -> dg.MaterializeResult:
    metadata = {
        "model_dir": dg.MetadataValue.path(str(Path(summary["out_dir"]) / "model")),
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "final_ce": summary["final_ce"],
        "final_kd": summary["final_kd"],
        "parameters": summary["parameters"],
        "reused": summary["reused"],
        "processes": summary.get("world_size", 1),
        "strategy": summary.get("strategy", "single"),
    }
    for key in ("final_grad_norm", "peak_memory_mib"):  # absent from summaries written before they were recorded
        if summary.get(key) is not None:
            metadata[key] = summary[key]
    if summary.get("seconds_this_run"):  # labelled tokens per second, or examples of candidates data
        for unit, rate in (("tokens", "labelled_tok_s"), ("examples", "labelled_examples_s")):
            if f"labelled_{unit}_this_run" in summary:
                metadata[rate] = summary[f"labelled_{unit}_this_run"] / summary["seconds_this_run"]
    if progress:  # what the ranks reported through Pipes while training
        metadata["reported_steps"] = len(progress)
    plot = Path(summary["out_dir"]) / "loss.png"
    if plot.exists():
        encoded = base64.b64encode(plot.read_bytes()).decode()
        metadata["loss_curve"] = dg.MetadataValue.md(f"![loss](data:image/png;base64,{encoded})")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(Path(summary["out_dir"]).name))


def _train(
    context: dg.AssetExecutionContext, settings: DistillSettings, client: dg.PipesSubprocessClient, baseline: bool
) -> dg.MaterializeResult:
    """Train in this process, or (``train.nproc_per_node`` x ``nnodes`` > 1) run ``torchrun``
    through Dagster Pipes: its output goes to the step's logs, rank 0's step reports to the run's
    event log, and a failed rank fails the step (the next materialization resumes from the last
    checkpoint). On Kubernetes, ``dagster_k8s.PipesK8sClient`` runs the same command in a pod
    with the GPUs (deploy/README.md)."""
    progress: list[dict] = []

    def launcher(cmd, env):
        guard_children()  # torchrun and its ranks end with this step's process, even on SIGKILL
        context.log.info(f"starting {' '.join(cmd)}")
        completed = client.run(context=context, command=list(cmd), env=dict(env))
        progress.extend(completed.get_custom_messages())

    summary = training.train_student(settings.load(), baseline=baseline, launcher=launcher, log=context.log.info)
    return _result(summary, progress)


@dg.asset(
    group_name="student",
    deps=["teacher_logits"],
    automation_condition=dg.AutomationCondition.eager(),
    description="Student trained on the train shards with KD + cross-entropy (save_pretrained, safetensors).",
)
def student_model(
    context: dg.AssetExecutionContext, settings: DistillSettings, pipes_subprocess_client: dg.PipesSubprocessClient
) -> dg.MaterializeResult:
    return _train(context, settings, pipes_subprocess_client, baseline=False)


@dg.asset(
    group_name="student",
    deps=["teacher_logits"],
    automation_condition=dg.AutomationCondition.eager(),
    description="The same student, data order and steps with cross-entropy only.",
)
def baseline_student(
    context: dg.AssetExecutionContext, settings: DistillSettings, pipes_subprocess_client: dg.PipesSubprocessClient
) -> dg.MaterializeResult:
    return _train(context, settings, pipes_subprocess_client, baseline=True)
