"""Runs the real trainer on synthetic shards, for the resume and multi-process tests.

    python -m tests.distill.train_worker SHARD_DIR OUT_DIR TEACHER_DIR STEPS CKPT_EVERY [ROW_LOG]
(under ``torchrun`` for several ranks; ``TRAIN_STRATEGY=fsdp`` shards the student)."""

import os
import sys
from pathlib import Path

from distill.train.config import StudentConfig, TrainConfig
from distill.train.trainer import teardown_distributed, train
from storage.reader import open_shard
from storage.writer import ShardWriter
from tests.storage.test_shards import make_meta, make_rows

TINY_STUDENT = StudentConfig(
    init="random", num_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
)


def write_shards(folder: Path, n_shards: int = 2, rows: int = 32) -> None:
    for s in range(n_shards):
        batch = make_rows(rows, 49152, 4, seed=s, length=(10, 33))
        for r in batch:
            r["doc_id"] = f"s{s}-{r['doc_id']}"
        with ShardWriter(folder / f"shard{s}.parquet", make_meta(k=4, shard=f"train-{s:05d}"), row_group_rows=4) as w:
            w.write_many(batch)


if __name__ == "__main__":
    shard_dir, out_dir, teacher_dir, steps, every = sys.argv[1:6]
    row_log = sys.argv[6] if len(sys.argv) > 6 else None
    shards = [open_shard(p) for p in sorted(Path(shard_dir).glob("*.parquet"))]
    cfg = TrainConfig(
        steps=int(steps),
        batch_size=4,
        lr=1e-3,
        checkpoint_every=int(every),
        progress=False,
        keep_checkpoints=10,
        strategy=os.environ.get("TRAIN_STRATEGY", "ddp"),
    )
    summary = train(TINY_STUDENT, cfg, teacher_dir, shards, out_dir, 49152, row_log=row_log)
    teardown_distributed()
    print("finished", summary["steps"], flush=True)
