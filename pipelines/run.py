"""Materialize the whole asset graph in-process (``make demo``), printing the evaluation.

Runs on the persistent Dagster instance under ``$DAGSTER_HOME`` (default ``data/dagster_home``)
so that ``make ui`` afterwards shows every materialization.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from pipelines.definitions import build_definitions
from pipelines.resources import default_config_path


def materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance, shard_names: list[str]) -> dg.ExecuteInProcessResult:
    """Three in-process runs: inputs, every teacher shard in one run (one engine start), then training and evaluation."""
    assets = list(defs.assets)
    resources = defs.resources

    def run(selection, **kwargs):
        return dg.materialize(assets, selection=selection, resources=resources, instance=instance, **kwargs)

    run(["teacher_model", "corpus"])
    run(["teacher_logits"], tags={ASSET_PARTITION_RANGE_START_TAG: shard_names[0], ASSET_PARTITION_RANGE_END_TAG: shard_names[-1]})
    # a failing gate fails the run (it is a blocking check) but the report is still wanted
    return run(["student_model", "baseline_student", "evaluation"], raise_on_error=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=default_config_path(), help="run config YAML (default: %(default)s)")
    args = parser.parse_args(argv)
    from distill.config import load_config

    cfg = load_config(args.config)
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path("data/dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    defs = build_definitions(args.config)
    with dg.DagsterInstance.get() as instance:
        result = materialize_all(defs, instance, cfg.corpus.shard_names())
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    if "evaluation" not in mats:
        print("the evaluation did not materialize; see the errors above", file=sys.stderr)
        return 1
    meta = mats["evaluation"].materialization.metadata
    checks = result.get_asset_check_evaluations()
    print()
    print(meta["table"].value)
    for check in checks:
        print(f"gate {'passed' if check.passed else 'FAILED'}: {check.metadata['gate'].value}")
    print(meta["summary"].value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
