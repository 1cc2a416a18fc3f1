"""Dagster ``Definitions`` for one run config (``DISTILL_CONFIG``, default configs/demo.yaml).

Load with ``dagster dev -m pipelines.definitions`` (``make ui``).
"""

from __future__ import annotations

import dagster as dg

from distill.config import load_config
from distill.run.onpolicy import round_names
from pipelines.assets.corpus import corpus
from pipelines.assets.evaluation import evaluation
from pipelines.assets.onpolicy import build_onpolicy_assets
from pipelines.assets.student import baseline_student, student_model
from pipelines.assets.teacher import build_teacher_logits, finetuned_teachers, teacher_model
from pipelines.pools import partitions_per_run
from pipelines.resources import DistillSettings, TeacherEngine, default_config_path
from pipelines.schedules import evaluate_job, evaluate_schedule, refresh_corpus_job, refresh_corpus_schedule


def build_definitions(config_path: str | None = None, keep_engine_alive: bool = False) -> dg.Definitions:
    config_path = config_path or default_config_path()
    cfg = load_config(config_path)  # fail at load time, naming the field, on a bad config
    partitions = dg.StaticPartitionsDefinition(cfg.corpus.shard_names())
    teacher_logits = build_teacher_logits(partitions, partitions_per_run(cfg, len(partitions.get_partition_keys())))
    assets = [teacher_model, corpus, finetuned_teachers, teacher_logits, student_model, baseline_student, evaluation]
    if cfg.onpolicy.rounds:
        assets += build_onpolicy_assets(dg.StaticPartitionsDefinition(round_names(cfg)))
    return dg.Definitions(
        assets=assets,
        jobs=[refresh_corpus_job, evaluate_job],
        schedules=[refresh_corpus_schedule, evaluate_schedule],
        resources={
            "settings": DistillSettings(config_path=str(config_path)),
            "teacher_engine": TeacherEngine(keep_alive=keep_engine_alive),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),  # torchrun, for multi-process training
        },
    )


defs = build_definitions()
