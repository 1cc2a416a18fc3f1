"""Evaluation on held-out shards: perplexity from each model's own forward pass, and agreement
with the teacher's stored labels (KL over the teacher's top-k plus a tail bucket, top-1)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from distill.configbase import check
from distill.losses import forward_kl, sparse_log_distributions
from distill.trainer import collate
from storage.reader import Shard, ShardStream, StreamPosition


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    """Windows per forward pass."""
    max_windows: int | None = None
    """Evaluate at most this many held-out windows (None: all)."""
    min_kl_margin: float = 0.0
    """Gate: the distilled student's held-out KL must be below the baseline's by at least this (nats)."""
    min_ppl_margin: float = 0.0
    """Gate: the distilled student's held-out perplexity must be below the baseline's by at least this."""

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.max_windows is None or self.max_windows >= 1, "max_windows", self.max_windows, "None or >= 1")


ECE_BINS = 15


def batch_sums(student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-batch sums from which every metric is finished by ``finish``.

    ``student_logits`` (B, T, V); ``batch`` as built by ``distill.trainer.collate``. Returns
    sums over labelled positions of: NLL of the realized token, KL(teacher ‖ model) over the
    teacher's top-k plus a tail bucket, top-1 agreement with the teacher, and per confidence
    bin (``ECE_BINS`` equal-width bins of the model's max probability) the count, the summed
    confidence and the number of correct next-token predictions.
    """
    logits = student_logits.float()
    mask = batch["mask"]
    lse = torch.logsumexp(logits, -1, keepdim=True)
    nll = (lse - logits.gather(-1, batch["targets"][..., None]))[..., 0]
    log_p, log_q = sparse_log_distributions(logits, batch["topk_ids"], batch["teacher_logprobs"], "bucket", 1.0, lse)
    kl = forward_kl(log_p, log_q)
    top_logit, top_id = logits.max(-1)
    confidence = torch.exp(top_logit - lse[..., 0])[mask].double()
    correct = (top_id == batch["targets"])[mask].double()
    bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1)
    return {
        "nll": nll[mask].double().sum(),
        "kl": kl[mask].double().sum(),
        "top1": (top_id == batch["topk_ids"][..., 0])[mask].double().sum(),
        "positions": mask.sum().double(),
        "bin_count": torch.bincount(bins, minlength=ECE_BINS).double(),
        "bin_confidence": torch.bincount(bins, weights=confidence, minlength=ECE_BINS),
        "bin_correct": torch.bincount(bins, weights=correct, minlength=ECE_BINS),
    }


def finish(sums: dict[str, torch.Tensor]) -> dict:
    """Metrics from accumulated ``batch_sums``: perplexity, mean KL, top-1 agreement, ECE."""
    n = float(sums["positions"])
    if n == 0:
        raise ValueError("no labelled positions to evaluate")
    gap = (sums["bin_confidence"] - sums["bin_correct"]).abs().sum()
    return {
        "ppl": math.exp(float(sums["nll"]) / n),
        "kl": float(sums["kl"]) / n,
        "top1": float(sums["top1"]) / n,
        "ece": float(gap) / n,
        "positions": int(n),
    }


@torch.no_grad()
def evaluate_model(model, shards: Sequence[Shard], cfg: EvalConfig) -> dict:
    """Held-out metrics of one causal LM against the teacher labels in ``shards``."""
    model.eval()
    device = next(model.parameters()).device
    k = shards[0].meta.k
    totals: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    windows = 0

    def flush():
        batch = {n: t.to(device) for n, t in collate(rows, k).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for name, value in batch_sums(logits, batch).items():
            totals[name] = totals.get(name, 0) + value.cpu()
        rows.clear()

    for row, _ in ShardStream(shards, shuffle=False).rows(StreamPosition(), epochs=1):
        rows.append(row)
        windows += 1
        if len(rows) == cfg.batch_size:
            flush()
        if cfg.max_windows and windows >= cfg.max_windows:
            break
    if rows:
        flush()
    return {**finish(totals), "parameters": sum(p.numel() for p in model.parameters())}


def evaluate(models: Mapping[str, str | Path], shards: Sequence[Shard], cfg: EvalConfig) -> dict[str, dict]:
    """Metrics for each named checkpoint folder (loaded from safetensors)."""
    from transformers import AutoModelForCausalLM

    results = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        results[name] = evaluate_model(model, shards, cfg)
        del model
    return results


def markdown_table(results: Mapping[str, dict]) -> str:
    lines = [
        "| model | params (M) | held-out ppl | KL(teacher‖model) | top-1 agreement | ECE |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results.items():
        lines.append(f"| {name} | {m['parameters'] / 1e6:.1f} | {m['ppl']:.2f} | {m['kl']:.4f} | {m['top1']:.4f} | {m['ece']:.4f} |")
    return "\n".join(lines)


def summary_line(results: Mapping[str, dict]) -> str:
    t, s, b = results["teacher"], results["student"], results["baseline"]
    return (
        f"teacher_ppl={t['ppl']:.2f} student_ppl={s['ppl']:.2f} baseline_ppl={b['ppl']:.2f} "
        f"student_kl={s['kl']:.4f} baseline_kl={b['kl']:.4f} "
        f"student_top1={s['top1']:.4f} baseline_top1={b['top1']:.4f}"
    )


def gate(results: Mapping[str, dict], cfg: EvalConfig) -> tuple[bool, str]:
    """Did distillation beat the CE-only baseline by the configured margins?"""
    s, b = results["student"], results["baseline"]
    kl_ok = s["kl"] < b["kl"] - cfg.min_kl_margin
    ppl_ok = s["ppl"] < b["ppl"] - cfg.min_ppl_margin
    text = (
        f"KL {s['kl']:.4f} vs baseline {b['kl']:.4f} (margin {cfg.min_kl_margin}): {'ok' if kl_ok else 'FAIL'}; "
        f"ppl {s['ppl']:.2f} vs baseline {b['ppl']:.2f} (margin {cfg.min_ppl_margin}): {'ok' if ppl_ok else 'FAIL'}"
    )
    return kl_ok and ppl_ok, text
