"""The teacher's held-out metrics from the labels already stored in the held-out shards, with no
forward pass: the same dict a forward evaluation returns, so the teacher sits in the report
beside the students without a transformers copy of it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distill.eval.config import EvalConfig
from distill.eval.heldout import heldout_batches
from distill.eval.metrics import (
    accumulate,
    answer_sums,
    byte_sum,
    candidate_sums,
    ece_bins,
    finish,
    finish_candidates,
    position_sums,
)
from distill.eval.models import checkpoint_parameters
from distill.train.trainer import collate
from storage.reader import Shard


def collate_teacher(rows: Sequence[dict], k: int) -> dict[str, torch.Tensor]:
    """``distill.train.trainer.collate`` plus ``target_logprobs`` (B, T): the teacher's stored logprob
    of the realized next token at each labelled position (0 elsewhere)."""
    batch = collate(rows, k)
    target = np.zeros(tuple(batch["mask"].shape), np.float32)
    for b, r in enumerate(rows):
        s, n = int(r["label_start"]), len(r["target_logprobs"])
        target[b, s : s + n] = r["target_logprobs"]
    batch["target_logprobs"] = torch.from_numpy(target)
    return batch


def collate_teacher_candidates(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The columns of candidate examples ``candidate_sums`` reads (no token tensors):
    ``candidate_mask``/``teacher_logprobs`` (B, C) and ``answer`` (B,)."""
    B, C = len(rows), max(len(r["teacher_logprobs"]) for r in rows)
    teacher, valid = np.zeros((B, C), np.float32), np.zeros((B, C), bool)
    for b, r in enumerate(rows):
        teacher[b, : len(r["teacher_logprobs"])] = r["teacher_logprobs"]
        valid[b, : len(r["teacher_logprobs"])] = True
    return {
        "candidate_mask": torch.from_numpy(valid),
        "teacher_logprobs": torch.from_numpy(teacher),
        "answer": torch.tensor([int(r["answer"]) for r in rows], dtype=torch.int64),
    }


def teacher_sums(batch: dict[str, torch.Tensor], byte_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``batch_sums`` of the teacher itself, from its stored labels (``collate_teacher``): NLL
    from the stored realized-token logprobs, KL 0 and top-1 agreement 1 by definition, and the
    confidence bins from the stored top-1 probability, correct when the top-1 id is the realized token."""
    mask = batch["mask"]
    confidence = batch["teacher_logprobs"][..., 0][mask].double().exp()
    correct = (batch["teacher_ids"][..., 0] == batch["targets"])[mask].double()
    return {
        **position_sums(mask, torch.zeros(mask.shape, dtype=torch.float64)),
        "nll": -batch["target_logprobs"][mask].double().sum(),
        "kl": torch.zeros((), dtype=torch.float64),
        "top1": mask.sum().double(),
        "positions": mask.sum().double(),
        **ece_bins(confidence, correct),
        **byte_sum(byte_lengths, batch["targets"], mask),
    }


def teacher_metrics(
    shards: Sequence[Shard],
    cfg: EvalConfig,
    checkpoint: str | Path | None = None,
    byte_lengths: torch.Tensor | None = None,
) -> dict:
    """The teacher's held-out metrics from its stored labels: the dict ``evaluate_model``
    returns. Token modes: perplexity from the stored realized-token logprobs (codec steps of
    2^-10 nats: at most 4.9e-4 relative error), KL 0, top-1 1, ECE from the stored top-1.
    ``candidates``: KL 0, choice agreement 1, gold-answer perplexity, accuracy and ECE from the
    stored candidate distribution. ``parameters`` from the safetensors headers of ``checkpoint``
    (None without one)."""
    meta = shards[0].meta
    totals: dict[str, torch.Tensor] = {}
    if meta.mode == "candidates":
        for batch in heldout_batches(shards, cfg, collate_teacher_candidates):
            accumulate(totals, candidate_sums(batch["teacher_logprobs"], batch))
        metrics = finish_candidates(totals)
    else:
        for batch in heldout_batches(shards, cfg, functools.partial(collate_teacher, k=meta.slots)):
            accumulate(totals, teacher_sums(batch, byte_lengths))
            if meta.images:  # answers to image questions: right when the stored top-1 is every answer token
                accumulate(totals, answer_sums(batch["teacher_ids"][..., 0], batch))
        metrics = finish(totals)
    return {**metrics, "parameters": checkpoint_parameters(checkpoint) if checkpoint is not None else None}
