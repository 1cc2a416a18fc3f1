"""Scheduled refresh: re-read the dataset on a cron; declarative automation then labels new or
changed shards (unchanged ones are cache hits), retrains and re-evaluates.

Turn on the schedule and the ``default_automation_condition_sensor`` in the UI (Automation).
"""

from __future__ import annotations

import os

import dagster as dg

REFRESH_CRON_ENV = "DISTILL_REFRESH_CRON"

refresh_corpus_job = dg.define_asset_job(
    "refresh_corpus",
    selection=dg.AssetSelection.assets("teacher_model", "corpus", "finetuned_teachers"),
    description="Re-resolve the teacher, re-read the dataset and adapt the fine-tuned ensemble members to it (a "
    "cache hit when the data did not change); downstream automation follows.",
)

refresh_corpus_schedule = dg.ScheduleDefinition(
    name="refresh_corpus_daily",
    job=refresh_corpus_job,
    cron_schedule=os.environ.get(REFRESH_CRON_ENV, "0 3 * * *"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
)

evaluate_job = dg.define_asset_job(
    "evaluate_students",
    selection=dg.AssetSelection.assets("evaluation"),
    description="Re-run the evaluation (e.g. on newly arrived held-out data); each run adds a point to the metadata "
    "history.",
)

evaluate_schedule = dg.ScheduleDefinition(
    name="evaluate_weekly",
    job=evaluate_job,
    cron_schedule=os.environ.get("DISTILL_EVAL_CRON", "0 4 * * 1"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
