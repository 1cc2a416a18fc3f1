"""Export shards to plain columns other trainers read.

``export_axolotl`` writes the columns axolotl's KD trainer reads: per window ``input_ids``,
``attention_mask``, ``labels`` (HF convention: unshifted, -100 where not trained), and per
input position ``t`` the teacher's ids and logprobs (``teacher_ids``/``teacher_logprobs``: the top-k,
or whatever the shard's label kind stores) for the token ``t + 1`` (the same position the
student's logits at ``t`` predict): ``target_token_ids`` and ``target_logprobs`` (k each), and
``target_mask`` (1 where labelled). Positions without labels hold zeros and mask 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.kinds import POSITIONS, kind_of
from storage.reader import Shard, ShardStream, StreamPosition
from storage.writer import temp_name


def export_axolotl(shards: Sequence[Shard], out_path: str | os.PathLike, rows_per_group: int = 256) -> int:
    """Write every row of ``shards`` (in order) to ``out_path``; returns the number of rows.
    ``generate`` shards export like ``score`` shards (labels on answer tokens only)."""
    for shard in shards:
        if kind_of(shard.meta.kind).layout != POSITIONS:
            raise ValueError(
                f"{shard.path}: {shard.meta.kind} shards hold a distribution over answers, not per-token labels; "
                "nothing to export for axolotl"
            )
        if shard.meta.slots != shards[0].meta.slots:
            raise ValueError(
                f"{shard.path}: {shard.meta.slots} teacher ids per position, {shards[0].path} has "
                f"{shards[0].meta.slots}; export shards of one label kind and size together"
            )
    k = shards[0].meta.slots
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.int32())),
            ("attention_mask", pa.list_(pa.int8())),
            ("labels", pa.list_(pa.int32())),
            ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
            ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
            ("target_mask", pa.list_(pa.list_(pa.int8()))),
        ]
    )
    tmp = temp_name(Path(out_path))
    try:
        written = _write_axolotl(shards, tmp, schema, k, rows_per_group)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _write_axolotl(shards: Sequence[Shard], tmp: Path, schema: pa.Schema, k: int, rows_per_group: int) -> int:
    written = 0
    batch: dict[str, list] = {name: [] for name in schema.names}
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:

        def flush():
            writer.write_table(pa.table(batch, schema=schema))
            for values in batch.values():
                values.clear()

        for row, _ in ShardStream(shards, shuffle=False).rows(StreamPosition(), epochs=1):
            ids = np.asarray(row["input_ids"], np.int64)
            L, s = len(ids), int(row["label_start"])
            n = L - 1 - s
            token_ids = np.zeros((L, k), np.int32)
            logprobs = np.zeros((L, k), np.float32)
            mask = np.zeros((L, k), np.int8)
            token_ids[s : L - 1] = row["teacher_ids"].reshape(n, k)
            logprobs[s : L - 1] = row["teacher_logprobs"].reshape(n, k)
            mask[s : L - 1] = 1
            labels = np.full(L, -100, np.int64)
            labels[s + 1 :] = ids[s + 1 :]
            batch["input_ids"].append(ids.tolist())
            batch["attention_mask"].append([1] * L)
            batch["labels"].append(labels.tolist())
            batch["target_token_ids"].append(token_ids.tolist())
            batch["target_logprobs"].append(logprobs.tolist())
            batch["target_mask"].append(mask.tolist())
            written += 1
            if len(batch["input_ids"]) >= rows_per_group:
                flush()
        if batch["input_ids"]:
            flush()
    return written
