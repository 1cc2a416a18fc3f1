"""Schedule and declarative automation, with Dagster's own testing APIs, over real
materializations (the tiny config; shards and students are cache hits after the graph test)."""

from __future__ import annotations

import datetime

import dagster as dg

from pipelines.definitions import build_definitions


def test_refresh_schedule_requests_the_corpus_job(tiny_config_path):
    defs = build_definitions(str(tiny_config_path))
    schedule = defs.get_schedule_def("refresh_corpus_daily")
    assert schedule.cron_schedule == "0 3 * * *"
    with dg.build_schedule_context(scheduled_execution_time=datetime.datetime(2026, 11, 29, 3, 0)) as context:
        data = schedule.evaluate_tick(context)
    assert [r.job_name for r in data.run_requests] in ([None], ["refresh_corpus"])
    assert schedule.job_name == "refresh_corpus"
    job = defs.get_job_def("refresh_corpus")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "teacher_model",
        "corpus",
        "finetuned_teachers",
    }


def _requested(result, key):
    key = dg.AssetKey(key)
    if result.get_num_requested(key) == 0:
        return set()
    return result.get_requested_partitions(key)


def test_automation_labels_then_retrains_then_evaluates(tiny_config_path, tiny_config, materialized):
    """The first tick is a baseline (nothing is filled automatically before it); after the
    corpus is (re)materialized, as the schedule does, every shard is requested; after the
    labels, both students and the evaluation; then nothing until something changes."""
    defs = build_definitions(str(tiny_config_path), keep_engine_alive=True)
    instance = dg.DagsterInstance.ephemeral()
    assets, resources = list(defs.assets), defs.resources
    shards = set(tiny_config.corpus.shard_names())

    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert tick.total_requested == 0
    dg.materialize(assets, selection=["teacher_model", "corpus"], resources=resources, instance=instance)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert _requested(tick, "finetuned_teachers"), "the corpus changed: fine-tuned members follow it"
    # what the refresh_corpus job (the schedule) materializes: the inputs and the fine-tuned members
    dg.materialize(assets, selection=["finetuned_teachers"], resources=resources, instance=instance)
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert _requested(tick, "teacher_logits") == shards
    assert not _requested(tick, "student_model"), "students wait for their labels"
    for shard in sorted(shards):  # cache hits: no teacher work
        dg.materialize(
            assets, selection=["teacher_logits"], partition_key=shard, resources=resources, instance=instance
        )
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    # both students, and the evaluation after them in the same request
    assert _requested(tick, "student_model") and _requested(tick, "baseline_student") and _requested(tick, "evaluation")
    assert not _requested(tick, "teacher_logits")
    dg.materialize(
        assets,
        selection=["student_model", "baseline_student", "evaluation"],
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert tick.total_requested == 0, "nothing changed: nothing to do"
