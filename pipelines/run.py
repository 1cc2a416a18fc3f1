"""Materialize the whole asset graph in-process (``make demo``), printing the evaluation.

Runs on the persistent Dagster instance under ``$DAGSTER_HOME`` (default ``data/dagster_home``)
so that ``make ui`` afterwards shows every materialization.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import dagster as dg
import psutil
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from distill.config import load_config
from distill.configbase import ConfigError
from distill.procs import guard_children
from pipelines.definitions import build_definitions
from pipelines.pools import sync_teacher_pool
from pipelines.resources import default_config_path

PID_TAG, START_TAG, HOST_TAG = "distill/pid", "distill/pid_start", "distill/host"


class StageFailed(RuntimeError):
    """A stage's run failed or a blocking check did not pass; the message lists why."""


def process_tags() -> dict[str, str]:
    """Tags naming the process that executes an in-process run, so a later run can tell
    whether it is still alive (Dagster's run monitoring only watches runs it launched)."""
    me = psutil.Process()
    return {PID_TAG: str(me.pid), START_TAG: repr(me.create_time()), HOST_TAG: socket.gethostname()}


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark as failed the in-process runs of this machine whose process is gone (SIGKILL, OOM,
    a crash) and free the concurrency slots they hold, so their pool does not block for ever.

    Returns the run ids it failed. Labelling then resumes where the dead run stopped: committed
    shards are cache hits.
    """
    failed = []
    for run in instance.get_runs(
        filters=dg.RunsFilter(statuses=IN_PROGRESS_RUN_STATUSES, tags={HOST_TAG: socket.gethostname()})
    ):
        pid, started = int(run.tags.get(PID_TAG, "0")), run.tags.get(START_TAG)
        try:
            alive = pid > 0 and repr(psutil.Process(pid).create_time()) == started
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            continue
        instance.report_run_failed(
            run,
            message=f"process {pid} that executed this run is gone (killed or crashed); marked failed by pipelines.run",
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed


def materialize_all(
    defs: dg.Definitions, instance: dg.DagsterInstance, shard_names: list[str]
) -> dg.ExecuteInProcessResult:
    """Three in-process runs: inputs, every teacher shard in one run (one engine start), then
    training and evaluation. Raises ``StageFailed`` (with the failing checks' problems) when
    the first two fail; the last run's result is returned even when the gate fails, because
    the report is still wanted."""
    assets = list(defs.assets)
    resources = defs.resources
    tags = process_tags()

    def run(selection, extra_tags=None):
        return dg.materialize(
            assets,
            selection=selection,
            resources=resources,
            instance=instance,
            tags={**tags, **(extra_tags or {})},
            raise_on_error=False,
        )

    for selection, extra in (
        (["teacher_model", "corpus", "finetuned_teachers"], None),
        (
            ["teacher_logits"],
            {ASSET_PARTITION_RANGE_START_TAG: shard_names[0], ASSET_PARTITION_RANGE_END_TAG: shard_names[-1]},
        ),
    ):
        result = run(selection, extra)
        problems = failed_checks(result)
        if not result.success or problems:
            raise StageFailed(
                "\n".join([f"materializing {', '.join(selection)} failed:", *run_errors(result), *problems])
            )
    return run(["student_model", "baseline_student", "evaluation"])


def materialize_rounds(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult | None:
    """With ``onpolicy.rounds`` > 0: every round in one run (in order), then their evaluation;
    raises ``StageFailed`` when the rounds fail. None without rounds."""
    if not any(key.to_user_string() == "onpolicy_student" for a in defs.assets for key in a.keys):
        return None
    rounds = defs.resolve_assets_def("onpolicy_student").partitions_def.get_partition_keys()
    tags = process_tags()
    result = dg.materialize(
        list(defs.assets),
        selection=["onpolicy_student"],
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
        tags={**tags, ASSET_PARTITION_RANGE_START_TAG: rounds[0], ASSET_PARTITION_RANGE_END_TAG: rounds[-1]},
    )
    if not result.success:
        raise StageFailed("\n".join(["materializing onpolicy_student failed:", *run_errors(result)]))
    return dg.materialize(
        list(defs.assets),
        selection=["onpolicy_evaluation"],
        resources=defs.resources,
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )


def failed_checks(result: dg.ExecuteInProcessResult, severity=dg.AssetCheckSeverity.ERROR) -> list[str]:
    """One line per failed asset check of ``severity``, with its problems or gate text."""
    lines = []
    for check in result.get_asset_check_evaluations():
        if check.passed or check.severity != severity:
            continue
        details = {k: v.value for k, v in check.metadata.items()}
        lines.append(
            f"check {check.asset_key.to_user_string()}:{check.check_name} FAILED: {json.dumps(details, default=str)}"
        )
    return lines


def run_errors(result: dg.ExecuteInProcessResult) -> list[str]:
    """One line per failed step: Dagster's message and the error that caused it."""
    lines = []
    for e in result.all_events:
        error = getattr(e.event_specific_data, "error", None) if e.is_step_failure else None
        if error is None:
            continue
        messages = [error.message.strip()]
        while error.cause is not None:
            error = error.cause
            messages.append(error.message.strip())
        lines.append(f"step {e.step_key}: {' <- '.join(messages)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=default_config_path(), help="run config YAML (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path("data/dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    guard_children()  # a killed run must not leave its teacher engine running
    defs = build_definitions(args.config)
    with dg.DagsterInstance.get() as instance:
        sync_teacher_pool(instance, cfg)
        for run_id in fail_dead_runs(instance):
            print(f"run {run_id}: its process is gone; marked failed and its concurrency slots freed", file=sys.stderr)
        try:
            result = materialize_all(defs, instance, cfg.corpus.shard_names())
            rounds = materialize_rounds(defs, instance) if result.success else None
        except StageFailed as e:
            print(e, file=sys.stderr)
            return 1
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    if "evaluation" not in mats:
        print(
            "\n".join(["the evaluation did not materialize:", *run_errors(result), *failed_checks(result)]),
            file=sys.stderr,
        )
        return 1
    meta = mats["evaluation"].materialization.metadata
    checks = result.get_asset_check_evaluations()
    print()
    print(meta["table"].value)
    for check in checks:
        print(f"gate {'passed' if check.passed else 'FAILED'}: {check.metadata['gate'].value}")
    print(meta["summary"].value)
    if rounds is not None:
        done = {m.asset_key.to_user_string(): m for m in rounds.get_asset_materialization_events()}
        if "onpolicy_evaluation" not in done:
            print("\n".join(["the on-policy evaluation did not materialize:", *run_errors(rounds)]), file=sys.stderr)
            return 1
        print()
        print(done["onpolicy_evaluation"].materialization.metadata["table"].value)
        print(done["onpolicy_evaluation"].materialization.metadata["summary"].value)
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
