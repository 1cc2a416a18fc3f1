"""Metric math on tensors: per-batch sums that add up across batches, and the metrics finished
from them. Token data: perplexity, bits per byte, KL(teacher ‖ model) over the teacher's top-k
plus a tail bucket (also by position), top-1 agreement with the teacher and calibration (ECE).
Candidates data: KL over each example's candidates, agreement with the teacher's choice, and
the gold answer's perplexity, accuracy and calibration. No models, no files."""

from __future__ import annotations

import math

import torch

from distill.train.losses import candidate_log_distribution, forward_kl, sparse_log_distributions

ECE_BINS = 15
POSITION_BUCKETS = 12  # position t falls in bucket floor(log2(t + 1)): 0, 1-2, 3-6, 7-14, ...


def byte_sum(byte_lengths: torch.Tensor | None, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bytes of text the labelled targets stand for (for bits per byte), when the model's
    per-id byte lengths are known."""
    if byte_lengths is None:
        return {}
    return {"bytes": byte_lengths.to(targets.device)[targets][mask].double().sum()}


def ece_bins(confidence: torch.Tensor, correct: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per confidence bin (``ECE_BINS`` equal-width bins): the count, the summed confidence and
    the number correct, the sums ``expected_calibration_error`` finishes."""
    bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1)
    return {
        "bin_count": torch.bincount(bins, minlength=ECE_BINS).double(),
        "bin_confidence": torch.bincount(bins, weights=confidence, minlength=ECE_BINS),
        "bin_correct": torch.bincount(bins, weights=correct, minlength=ECE_BINS),
    }


def expected_calibration_error(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """ECE from ``ece_bins`` sums of shape (..., ECE_BINS): sum over bins of |confidence -
    correct|, over the positions counted."""
    return (sums["bin_confidence"] - sums["bin_correct"]).abs().sum(-1) / sums["bin_count"].sum(-1)


def position_sums(mask: torch.Tensor, kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position bucket (``POSITION_BUCKETS``) the labelled positions of ``mask`` (B, T) and
    their summed ``kl`` (B, T)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    bucket = torch.clamp(torch.floor(torch.log2(positions[mask].double() + 1)).long(), max=POSITION_BUCKETS - 1)
    return {
        "pos_count": torch.bincount(bucket, minlength=POSITION_BUCKETS).double(),
        "pos_kl": torch.bincount(bucket, weights=kl[mask].double(), minlength=POSITION_BUCKETS),
    }


def _token_sums(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    teacher_lp: torch.Tensor,
    kd_mask: torch.Tensor,
    byte_lengths: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sums both ``batch_sums`` and ``cross_batch_sums`` take: NLL, ECE bins and bytes over
    ``batch["mask"]``; KL over ``teacher_ids``/``teacher_lp`` plus a tail bucket and top-1 agreement
    over ``kd_mask``. Also returns the per-position KL (B, T)."""
    logits = logits.float()
    mask, targets = batch["mask"], batch["targets"]
    lse = torch.logsumexp(logits, -1, keepdim=True)
    nll = (lse - logits.gather(-1, targets[..., None]))[..., 0]
    log_p, log_q = sparse_log_distributions(logits, batch["teacher_ids"], teacher_lp, "bucket", 1.0, lse)
    kl = forward_kl(log_p, log_q)
    top_logit, top_id = logits.max(-1)
    confidence = torch.exp(top_logit - lse[..., 0])[mask].double()
    correct = (top_id == targets)[mask].double()
    agree = (top_id == batch["teacher_ids"][..., 0]) & torch.isfinite(teacher_lp[..., 0])
    return {
        "nll": nll[mask].double().sum(),
        "kl": kl[kd_mask].double().sum(),
        "top1": agree[kd_mask].double().sum(),
        "positions": mask.sum().double(),
        **ece_bins(confidence, correct),
        **byte_sum(byte_lengths, targets, mask),
    }, kl


def batch_sums(
    student_logits: torch.Tensor, batch: dict[str, torch.Tensor], byte_lengths: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-batch sums from which every metric is finished by ``finish``.

    ``student_logits`` (B, T, V); ``batch`` as built by ``distill.train.trainer.collate``. Returns
    sums over labelled positions of: NLL of the realized token, KL(teacher ‖ model) over the
    teacher's top-k plus a tail bucket (also by position bucket), top-1 agreement with the
    teacher, per confidence bin (``ECE_BINS`` equal-width bins of the model's max probability)
    the count, the summed confidence and the number of correct next-token predictions, and
    with ``byte_lengths`` (bytes per token id) the bytes of the labelled text.
    """
    mask = batch["mask"]
    sums, kl = _token_sums(student_logits, batch, batch["teacher_logprobs"], mask, byte_lengths)
    return {**position_sums(mask, kl), **sums}


def cross_batch_sums(
    student_logits: torch.Tensor, batch: dict[str, torch.Tensor], byte_lengths: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``batch_sums`` of a model with its own tokenizer (a ``distill.train.xtok.collate_cross`` batch):
    NLL, ECE and bytes over its own tokens of the labelled span; KL(teacher ‖ model) and top-1
    agreement at the aligned positions, over the teacher's top-k ids the model's vocabulary holds
    exactly (the rest of each distribution as one bucket; top-1 counts a position as agreeing
    when the model's most likely token is the teacher's top-1 token)."""
    sums, _ = _token_sums(student_logits, batch, batch["matched_logprobs"], batch["kd_mask"], byte_lengths)
    return {**sums, "kl_positions": batch["kd_mask"].sum().double()}


def calibration(sums: dict[str, torch.Tensor]) -> list[dict]:
    """The reliability diagram's points: per non-empty ``ece_bins`` bin its count, mean
    confidence and accuracy."""
    count = sums["bin_count"]
    return [
        {
            "bin": i,
            "count": int(count[i]),
            "confidence": float(sums["bin_confidence"][i] / count[i]),
            "accuracy": float(sums["bin_correct"][i] / count[i]),
        }
        for i in range(len(count))
        if count[i] > 0
    ]


def _kl_by_position(sums: dict[str, torch.Tensor]) -> list[dict]:
    counts = sums.get("pos_count", torch.zeros(0))
    return [
        {
            "positions": f"{2**b - 1}-{2 ** (b + 1) - 2}",
            "count": int(counts[b]),
            "kl": float(sums["pos_kl"][b] / counts[b]),
        }
        for b in range(len(counts))
        if counts[b] > 0
    ]


def answer_sums(top_ids: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows answered right: every labelled position's most likely id (``top_ids`` (B, T)) is the
    realized token. On rows whose labelled tokens are an answer and its end-of-turn token, that is
    exactly greedy decoding writing the answer and stopping, with no generation run."""
    mask = batch["mask"]
    right = ((top_ids == batch["targets"]) | ~mask).all(-1) & mask.any(-1)
    return {"answers": mask.any(-1).sum().double(), "answers_right": right.sum().double()}


def finish(sums: dict[str, torch.Tensor]) -> dict:
    """Metrics from accumulated ``batch_sums``: perplexity, mean KL, top-1 agreement, ECE, and
    bits per byte where the bytes were counted."""
    n = float(sums["positions"])
    if n == 0:
        raise ValueError("no labelled positions to evaluate")
    aligned = float(sums.get("kl_positions", n))  # a model with its own tokenizer: aligned positions
    out = {
        "ppl": math.exp(float(sums["nll"]) / n),
        "kl": float(sums["kl"]) / max(aligned, 1.0),
        "top1": float(sums["top1"]) / max(aligned, 1.0),
        "ece": float(expected_calibration_error(sums)),
        "positions": int(n),
        "calibration": calibration(sums),
        "kl_by_position": _kl_by_position(sums),
    }
    if float(sums.get("bytes", 0)) > 0:
        out["bpb"] = float(sums["nll"]) / math.log(2) / float(sums["bytes"])
        out["bytes"] = int(sums["bytes"])
    if "kl_positions" in sums:
        out["aligned_positions"] = int(aligned)
    if float(sums.get("answers", 0)) > 0:
        out["answer_acc"] = float(sums["answers_right"]) / float(sums["answers"])
        out["answers"] = int(sums["answers"])
    return out


def candidate_sums(student_scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-batch sums over candidate examples (``batch`` from ``collate_candidates``):
    KL(teacher ‖ model) over the candidates, agreement of the model's top choice with the
    teacher's, and on examples with a gold answer its NLL, accuracy and confidence bins."""
    valid = batch["candidate_mask"]
    log_q = candidate_log_distribution(student_scores, valid)
    log_p = candidate_log_distribution(batch["teacher_logprobs"], valid)
    kl = torch.where(valid, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    choice = log_q.argmax(-1)
    gold = batch["answer"] >= 0
    answer = batch["answer"].clamp(min=0)
    confidence = log_q.max(-1).values.exp()[gold].double()
    correct = (choice == answer)[gold].double()
    return {
        "examples": torch.tensor(float(len(kl)), dtype=torch.float64),
        "kl": kl.double().sum(),
        "agree": (choice == log_p.argmax(-1)).double().sum(),
        "gold": gold.double().sum(),
        "gold_nll": (-log_q.gather(-1, answer[:, None])[:, 0])[gold].double().sum(),
        "gold_correct": correct.sum(),
        **ece_bins(confidence, correct),
    }


def finish_candidates(sums: dict[str, torch.Tensor]) -> dict:
    """Metrics from accumulated ``candidate_sums``: ``gold_ppl`` the perplexity of the gold
    answer among the candidates (exp of its mean NLL), ``kl`` over the candidates,
    ``choice_agreement`` the share of examples where the model's choice is the teacher's,
    ``accuracy`` against gold, ``ece`` of the model's choice on gold examples; the gold
    metrics are NaN without gold answers."""
    n, g = float(sums["examples"]), float(sums["gold"])
    if n == 0:
        raise ValueError("no candidate examples to evaluate")
    return {
        "gold_ppl": math.exp(float(sums["gold_nll"]) / g) if g else float("nan"),
        "kl": float(sums["kl"]) / n,
        "choice_agreement": float(sums["agree"]) / n,
        "accuracy": float(sums["gold_correct"]) / g if g else float("nan"),
        "ece": float(expected_calibration_error(sums)) if g else float("nan"),
        "examples": int(n),
        "gold_examples": int(g),
        "calibration": calibration(sums),
    }


def accumulate(totals: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    """Add one batch's ``sums`` into ``totals`` (on the CPU)."""
    for name, value in sums.items():
        totals[name] = totals.get(name, 0) + value.cpu()
