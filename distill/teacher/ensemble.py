"""Teacher ensembles: several teachers sharing a tokenizer, each labelled (and cached) on its own,
mixed shard by shard into one target per position. The mixture itself, and how it is stored,
is the ``mixture`` label kind's (``storage.kinds.mixture``); this module reads the members'
shards row by row, checks that they label the same windows, and writes the mixed shard.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from storage.kinds.mixture import mix
from storage.reader import ShardError, decode_row_group

ENSEMBLE_CODE_VERSION = "ensemble-1"
LABEL_COLUMNS = ("teacher_ids", "teacher_logprobs", "target_logprobs", "rest_mass")


def _member_rows(shard):
    """Every row of ``shard`` in stored order, decoded (one row group in memory at a time)."""
    pf = shard.parquet()
    for rg in range(pf.metadata.num_row_groups):
        yield from decode_row_group(shard, pf.read_row_group(rg))


def mix_shard(store, key: str, meta, shards: Sequence, weights: Sequence[float], batch_rows: int = 64) -> dict:
    """Write the mixture of the members' ``shards`` (labels of the same corpus shard, in the
    same row order) to ``store`` under ``key`` unless it is committed already. Rows that differ
    between members (another corpus, another tokenization) are an error naming both files.
    ``meta`` is the mixed shard's (kind ``mixture``)."""
    existing = store.lookup(key)
    if existing is not None:
        return {"cache_hit": True, "rows": existing.rows, "tokens": existing.tokens, "path": str(existing.path)}
    if len({s.rows for s in shards}) != 1:
        raise ShardError(
            shards[0].path,
            f"members' shards of {meta.shard} hold different row counts "
            f"({', '.join(f'{s.path}: {s.rows}' for s in shards)}); they must label the same corpus shard",
        )
    iters = [_member_rows(s) for s in shards]
    with store.writer(key, meta) as writer:
        pending = []
        for rows in zip(*iters):
            first = rows[0]
            for shard, row in zip(shards[1:], rows[1:]):
                if (row["doc_id"], row["window_index"], int(row["label_start"])) != (
                    first["doc_id"],
                    first["window_index"],
                    int(first["label_start"]),
                ) or not np.array_equal(row["input_ids"], first["input_ids"]):
                    raise ShardError(
                        shard.path,
                        f"row {row['doc_id']}#{row['window_index']} differs from {shards[0].path}'s "
                        f"{first['doc_id']}#{first['window_index']} (field input_ids or label_start): "
                        "ensemble members must label the same windows with the same tokenizer",
                    )
            pending.append(rows)
            if len(pending) >= batch_rows:
                writer.write_many(_mixed_rows(pending, weights))
                pending = []
        if pending:
            writer.write_many(_mixed_rows(pending, weights))
    if writer.lost_race:  # another run committed this key meanwhile: its shard stands
        return {
            "cache_hit": True,
            "rows": writer.record["rows"],
            "tokens": writer.record["tokens"],
            "path": str(store.path_for(key)),
        }
    return {"cache_hit": False, "rows": writer.rows, "tokens": writer.tokens, "path": str(store.path_for(key))}


def _mixed_rows(batch: Sequence[Sequence[dict]], weights: Sequence[float]) -> list[dict]:
    """Mix a batch of aligned rows in one call (positions concatenated), then split them back."""
    lengths = [len(rows[0]["target_logprobs"]) for rows in batch]
    members = [{c: np.concatenate([rows[m][c] for rows in batch]) for c in LABEL_COLUMNS} for m in range(len(batch[0]))]
    mixed = mix(members, weights)
    out, at = [], 0
    for rows, n in zip(batch, lengths):
        first = rows[0]
        out.append(
            {
                "doc_id": first["doc_id"],
                "window_index": first["window_index"],
                "input_ids": first["input_ids"],
                "label_start": first["label_start"],
                **{c: mixed[c][at : at + n].reshape(-1) for c in LABEL_COLUMNS},
            }
        )
        at += n
    return out
