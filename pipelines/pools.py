"""The ``teacher`` concurrency pool follows the engine slot count (``teacher.engine.slots``):
with N slots, N teacher runs may label at once, each on its own slot.

    python -m pipelines.pools [--config configs/demo.yaml]   # sets it on $DAGSTER_HOME's instance

``make ui`` and ``pipelines.run`` set it before anything runs.
"""

from __future__ import annotations

import argparse
import math

import dagster as dg

from distill.config import load_config
from pipelines.resources import default_config_path

TEACHER_POOL = "teacher"
MAX_PARTITIONS_PER_RUN = 4


def teacher_pool_limit(cfg) -> int:
    return max(1, cfg.teacher.engine.slots)


def partitions_per_run(cfg, partitions: int) -> int:
    """Shards per backfill run: up to 4 (one engine start serves them), fewer when that spreads
    a backfill over every slot."""
    return max(1, min(MAX_PARTITIONS_PER_RUN, math.ceil(partitions / teacher_pool_limit(cfg))))


def sync_teacher_pool(instance: dg.DagsterInstance, cfg) -> int:
    limit = teacher_pool_limit(cfg)
    instance.event_log_storage.set_concurrency_slots(TEACHER_POOL, limit)
    return limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=default_config_path())
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        print(f"pool {TEACHER_POOL}: limit {sync_teacher_pool(instance, load_config(args.config))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
