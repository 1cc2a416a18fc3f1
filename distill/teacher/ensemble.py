"""Teacher ensembles: several teachers sharing a tokenizer, each labelled (and cached) on its own,
mixed into one target per position.

The mixture is exact for what the shards hold. Member ``i`` stores its top-k probabilities
``p_i(v)`` for ``v`` in its ids ``S_i`` and its tail mass ``t_i = 1 - sum_{S_i} p_i``. The
ensemble's target over the union ``U`` of the members' ids is

    q(v) = sum_i w_i p_i(v) [v in S_i]        tail = sum_i w_i t_i

with weights ``w`` normalized to 1, so ``sum_U q + tail = 1``. An id member ``i`` did not store
contributes nothing from ``i`` to its own slot: that member's probability of it is part of
``t_i`` (it is at most ``i``'s k-th probability, and where it went is unknown), so it stays in
the tail, which ``train.tail: bucket`` compares as one outcome. The realized token's logprob is
``log sum_i w_i p_i(x)``, exact from each member's stored value.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ENSEMBLE_CODE_VERSION = "ensemble-1"


def mix_labels(members: Sequence[dict], weights: Sequence[float]) -> dict:
    """The weighted mixture of ``members``' labels of the same positions.

    Each member: ``topk_ids``/``topk_logprobs`` (n, k_i) (``-inf`` slots are padding),
    ``target_logprobs`` (n,), ``tail_mass`` (n,). Returns the same keys with width
    ``sum(k_i)``: each position's distinct ids, most probable first (ties by id), then padding
    (the first id again, ``-inf``).
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    n = len(members[0]["tail_mass"])
    ids = np.concatenate([np.asarray(m["topk_ids"], np.int64).reshape(n, -1) for m in members], axis=1)
    probs = np.concatenate(
        [wi * np.exp(np.asarray(m["topk_logprobs"], np.float64).reshape(n, -1)) for wi, m in zip(w, members)], axis=1
    )
    width = ids.shape[1]
    live = probs > 0  # padding slots (-inf) hold no mass and no id
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[live]
    # one entry per (position, id): sum the members' shares of the same id
    base = int(ids.max(initial=0)) + 1
    keys, inverse = np.unique(rows * base + ids[live], return_inverse=True)
    mass = np.bincount(inverse.reshape(-1), weights=probs[live], minlength=len(keys))
    key_rows, key_ids = np.divmod(keys, base)
    order = np.lexsort((key_ids, -mass, key_rows))
    key_rows, key_ids, mass = key_rows[order], key_ids[order], mass[order]
    starts = np.searchsorted(key_rows, np.arange(n))
    slot = np.arange(len(key_rows)) - starts[key_rows]
    out_ids = np.zeros((n, width), np.int64)
    out_lp = np.full((n, width), -np.inf, np.float64)
    out_ids[key_rows, slot] = key_ids
    with np.errstate(divide="ignore"):
        out_lp[key_rows, slot] = np.log(mass)
    out_ids = np.where(np.isneginf(out_lp), out_ids[:, :1], out_ids)
    tail = sum(wi * np.asarray(m["tail_mass"], np.float64) for wi, m in zip(w, members))
    target = np.log(sum(wi * np.exp(np.asarray(m["target_logprobs"], np.float64)) for wi, m in zip(w, members)))
    return {
        "topk_ids": out_ids,
        "topk_logprobs": out_lp.astype(np.float32),
        "tail_mass": np.clip(tail, 0.0, 1.0).astype(np.float32),
        "target_logprobs": target.astype(np.float32),
    }


def _member_rows(shard):
    """Every row of ``shard`` in stored order, decoded (one row group in memory at a time)."""
    from storage.reader import decode_row_group

    pf = shard.parquet()
    for rg in range(pf.metadata.num_row_groups):
        yield from decode_row_group(shard, pf.read_row_group(rg))


def mix_shard(store, key: str, meta, shards: Sequence, weights: Sequence[float], batch_rows: int = 64) -> dict:
    """Write the mixture of the members' ``shards`` (labels of the same corpus shard, in the
    same row order) to ``store`` under ``key`` unless it is committed already. Rows that differ
    between members (another corpus, another tokenization) are an error naming both files."""
    from storage.reader import ShardError

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
    members = []
    for m in range(len(batch[0])):
        members.append(
            {
                "topk_ids": np.concatenate([rows[m]["topk_ids"] for rows in batch]),
                "topk_logprobs": np.concatenate([rows[m]["topk_logprobs"] for rows in batch]),
                "target_logprobs": np.concatenate([rows[m]["target_logprobs"] for rows in batch]),
                "tail_mass": np.concatenate([rows[m]["tail_mass"] for rows in batch]),
            }
        )
    mixed = mix_labels(members, weights)
    out, at = [], 0
    for rows, n in zip(batch, lengths):
        first = rows[0]
        out.append(
            {
                "doc_id": first["doc_id"],
                "window_index": first["window_index"],
                "input_ids": first["input_ids"],
                "label_start": first["label_start"],
                "topk_ids": mixed["topk_ids"][at : at + n].reshape(-1),
                "topk_logprobs": mixed["topk_logprobs"][at : at + n].reshape(-1),
                "target_logprobs": mixed["target_logprobs"][at : at + n],
                "tail_mass": mixed["tail_mass"][at : at + n],
            }
        )
        at += n
    return out
