"""Trains the tiny student with the feature term on shards with stored features, for the
multi-process feature test (under ``torchrun``; ``TRAIN_STRATEGY=fsdp`` shards the student).

    python -m tests.distill.features_worker SHARD_DIR OUT_DIR TEACHER_DIR
"""

import dataclasses
import os
import sys
from pathlib import Path

from distill.train.config import TrainConfig
from distill.train.trainer import teardown_distributed, train
from storage.reader import open_shard
from tests.distill.train_worker import TINY_STUDENT

STUDENT = dataclasses.replace(TINY_STUDENT, feature_layers=((0, 3), (1, 7)))


def config(steps: int = 4) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=4,
        lr=1e-2,
        checkpoint_every=2,
        progress=False,
        feature_weight=0.5,
        strategy=os.environ.get("TRAIN_STRATEGY", "ddp"),
    )


if __name__ == "__main__":
    shard_dir, out_dir, teacher_dir = sys.argv[1:4]
    shards = [open_shard(p) for p in sorted(Path(shard_dir).glob("*.parquet"))]
    summary = train(STUDENT, config(), teacher_dir, shards, out_dir, 49152)
    teardown_distributed()
    print("finished", summary["steps"], flush=True)
