"""On-policy (GKD) rounds, one partition per round, and their evaluation (only when
``onpolicy.rounds`` > 0)."""

import dagster as dg

from distill.run import onpolicy
from pipelines.assets.report import report_metadata
from pipelines.resources import DistillSettings, TeacherEngine

# per-model numbers kept as metadata (their history plots in the UI)
ROUND_METRICS = (
    "ppl",
    "kl",
    "top1",
    "self_kl",
    "self_top1",
    "greedy_exact_match",
    "greedy_prefix_agreement",
    "answer_tokens",
    "self_len",
    "self_eos",
    "self_distinct2",
    "self_teacher_ll",
)


def build_onpolicy_assets(partitions: dg.PartitionsDefinition) -> list:
    @dg.asset(
        group_name="student",
        deps=["student_model", "teacher_logits"],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),  # rounds run in order, in one run
        pool="teacher",
        description="One on-policy round: the previous round's student answers the training prompts under vLLM, the "
        "teacher labels the answers, the student trains on its own answers mixed with the teacher's (GKD lambda). "
        "A round runs any earlier round still missing; finished rounds are reused.",
    )
    def onpolicy_student(
        context: dg.AssetExecutionContext, settings: DistillSettings, teacher_engine: TeacherEngine
    ) -> dg.MaterializeResult:
        cfg = settings.load()
        upto = max(int(key.split("-")[1]) for key in context.partition_keys)
        done = onpolicy.run_rounds(cfg, upto)
        for info in done:
            context.log.info(
                f"{onpolicy.round_name(info['round'])}: {'reused' if info['reused'] else 'trained'} "
                f"({info['answers']} answers, {info['answer_tokens']} labelled tokens, final loss "
                f"{info['final_loss']:.4f})"
            )
        last = done[-1]
        return dg.MaterializeResult(
            metadata={
                "model_dir": dg.MetadataValue.path(last["out_dir"] + "/model"),
                "round": last["round"],
                "reused": last["reused"],
                "generator": last["generator"],
                "lmbda": last["lmbda"],
                "answers": last["answers"],
                "answer_tokens": last["answer_tokens"],
                "final_loss": last["final_loss"],
                "final_kd": last["final_kd"],
            },
            data_version=dg.DataVersion(last["out_dir"].rsplit("/", 1)[-1]),
        )

    @dg.asset(
        group_name="evaluation",
        deps=["onpolicy_student", "student_model", "teacher_logits"],
        description="The last on-policy round's student against the distilled (off-policy) student: KL to the "
        "teacher on the teacher's held-out answers and on each student's own sampled answers, and greedy agreement; "
        "beside the own-answer KL, those answers' length, share ended by EOS, distinct-2 and teacher log-likelihood "
        "per token (a low KL won by short or repetitive answers shows there).",
    )
    def onpolicy_evaluation(
        context: dg.AssetExecutionContext, settings: DistillSettings, teacher_engine: TeacherEngine
    ) -> dg.MaterializeResult:
        report = onpolicy.evaluate_rounds(settings.load())
        context.log.info("\n" + report["table"] + "\n" + report["summary"])
        return dg.MaterializeResult(metadata=report_metadata(report, ROUND_METRICS))

    return [onpolicy_student, onpolicy_evaluation]
