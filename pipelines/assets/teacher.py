"""Teacher checkpoint and its soft labels, one partition per corpus shard."""

import dagster as dg

from distill.run import labelling
from distill.teacher.vllm_engine import EngineFailure
from pipelines.resources import DistillSettings, TeacherEngine
from storage.cache import content_key

ENGINE_RETRIES = 2  # step retries after a dead or stalled teacher engine (the instance retries crashed runs only)


@dg.asset(
    group_name="teacher",
    description="The teacher checkpoint (safetensors), converted once if bundled; with teacher.vision, the "
    "vision-language teacher built from it once (its held-out accuracy in the metadata).",
)
def teacher_model(settings: DistillSettings) -> dg.MaterializeResult:
    info = labelling.prepare_teacher(settings.load())
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(info["path"]), **{k: v for k, v in info.items() if k != "path"}},
        data_version=dg.DataVersion(info["weights"]),
    )


@dg.asset(
    group_name="teacher",
    deps=["corpus"],
    automation_condition=dg.AutomationCondition.eager(),
    description="Teachers adapted to the training split by a short fine-tune (teacher.models members with finetune "
    "set; none otherwise), cached by base weights, data and settings.",
)
def finetuned_teachers(settings: DistillSettings) -> dg.MaterializeResult:
    done = labelling.prepare_finetuned(settings.load())
    metadata: dict = {"members": len(done)}
    for i, info in enumerate(done):
        metadata.update(
            {
                f"member_{i}_path": dg.MetadataValue.path(info["path"]),
                f"member_{i}_reused": info["reused"],
                f"member_{i}_first_loss": info["first_loss"],
                f"member_{i}_final_loss": info["final_loss"],
                f"member_{i}_seconds": round(info["seconds"], 1),
            }
        )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(content_key([d["path"] for d in done])))


def _labelling_window(results: dict) -> dict:
    """When this run's engine labelled and on which slot (absent when every shard was a hit)."""
    done = [r for r in results.values() if not r["cache_hit"]]
    if not done:
        return {}
    slots = {r["slot"] for r in done if r.get("slot") is not None}
    return {
        "labelled_from": min(r["labelled_from"] for r in done),
        "labelled_until": max(r["labelled_until"] for r in done),
        **({"engine_slot": slots.pop()} if len(slots) == 1 else {}),
    }


def build_teacher_logits(partitions: dg.PartitionsDefinition, max_partitions_per_run: int = 4):
    @dg.asset(
        group_name="teacher",
        deps=["corpus", "teacher_model", "finetuned_teachers"],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run),
        pool="teacher",
        automation_condition=dg.AutomationCondition.eager() | dg.AutomationCondition.on_missing(),
        check_specs=[
            dg.AssetCheckSpec(
                "shard_integrity",
                asset="teacher_logits",
                blocking=True,
                description="Schema, provenance, checksums, row and token counts against the corpus, logprob sanity.",
            ),
            dg.AssetCheckSpec(
                "topk_mass_coverage",
                asset="teacher_logits",
                description="Mean teacher probability inside the stored top-k reaches teacher.min_topk_mass.",
            ),
        ],
        description="Teacher top-k soft labels of one corpus shard (Parquet, content-addressed; a known key is a "
        "cache hit).",
    )
    def teacher_logits(
        context: dg.AssetExecutionContext, settings: DistillSettings, teacher_engine: TeacherEngine
    ) -> dg.MaterializeResult:
        cfg = settings.load()
        names = list(context.partition_keys)
        try:
            results = labelling.label_shards(cfg, names)
        except EngineFailure as exc:
            # the out-of-memory killer or a stopped process is transient: the step runs again on a
            # fresh engine and labels only the shards not yet committed (the rest are cache hits)
            raise dg.RetryRequested(max_retries=ENGINE_RETRIES, seconds_to_wait=10) from exc
        hits = sum(r["cache_hit"] for r in results.values())
        context.log.info(f"labelled {len(names) - hits} shard(s), {hits} cache hit(s)")
        checks = labelling.check_shards(cfg, names)
        keys = {n: r["key"] for n, r in results.items()}
        return dg.MaterializeResult(
            data_version=dg.DataVersion(content_key(keys)),
            check_results=[
                dg.AssetCheckResult(
                    check_name="shard_integrity",
                    passed=not checks["problems"],
                    metadata={"problems": dg.MetadataValue.json(checks["problems"])},
                ),
                dg.AssetCheckResult(
                    check_name="topk_mass_coverage",
                    passed=bool(checks["mean_topk_mass"] >= cfg.teacher.min_topk_mass),
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "mean_topk_mass": float(checks["mean_topk_mass"]),
                        "threshold": cfg.teacher.min_topk_mass,
                    },
                ),
            ],
            metadata={
                "shards": len(names),
                "cache_hits": hits,
                "rows": sum(r["rows"] for r in results.values()),
                "labelled_tokens": sum(r["tokens"] for r in results.values()),
                "teacher_seconds": round(sum(r["teacher_seconds"] for r in results.values()), 3),
                **_labelling_window(results),
                "keys": dg.MetadataValue.json(keys),
            },
        )

    return teacher_logits
