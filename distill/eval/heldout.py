"""Reading held-out shards for evaluation: their rows in collated batches, in shard order, and
the distinct prompts of ``generate`` shards (for greedy answers)."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from distill.eval.config import EvalConfig
from storage.reader import Shard, ShardStream, StreamPosition


def heldout_batches(
    shards: Sequence[Shard], cfg: EvalConfig, collate_rows: Callable[[list[dict]], dict[str, torch.Tensor]]
) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out rows in shard order, ``cfg.batch_size`` at a time (at most ``cfg.max_windows``), collated."""
    rows: list[dict] = []
    windows = 0
    for row, _ in ShardStream(shards, shuffle=False).rows(StreamPosition(), epochs=1):
        rows.append(row)
        windows += 1
        if len(rows) == cfg.batch_size:
            yield collate_rows(rows)
            rows = []
        if cfg.max_windows and windows >= cfg.max_windows:
            break
    if rows:
        yield collate_rows(rows)


def heldout_prompts(shards: Sequence[Shard], limit: int) -> list[list[int]]:
    """The distinct prompts of ``generate`` shards (first answer of each), in shard order."""
    prompts, seen = [], set()
    for row, _ in ShardStream(shards, shuffle=False).rows(StreamPosition(), epochs=1):
        if len(prompts) >= limit:
            break
        if row["doc_id"] not in seen:
            seen.add(row["doc_id"])
            prompts.append([int(t) for t in row["input_ids"][: int(row["label_start"]) + 1]])
    return prompts
