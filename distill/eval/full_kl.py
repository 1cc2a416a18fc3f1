"""KL to the teacher's full distribution on a sample of held-out windows, and whether the
teacher fits the device to compute it. Unlike the stored-label KL (top-k plus one bucket, what
``tail: bucket`` KD minimizes), it sees how each model spreads the mass outside the teacher's top-k."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from distill.eval.config import EvalConfig
from distill.eval.heldout import heldout_batches
from distill.eval.models import autocast, checkpoint_parameters, device_of, free_memory
from distill.train.trainer import collate_for
from storage.reader import Shard


def full_kl_skip_reason(teacher_path: str | Path, device: torch.device, bf16: bool) -> str | None:
    """Why the teacher's full distribution cannot be computed here (None: it can): its weights
    in the evaluation's dtype (bf16 or fp32), plus a quarter for activations, must fit the
    device's free memory."""
    need = checkpoint_parameters(teacher_path) * (2 if bf16 else 4) * 1.25
    free = free_memory(device)
    if need > free:
        return f"the teacher needs about {need / 2**30:.1f} GiB on {device.type} and {free / 2**30:.1f} GiB are free"
    return None


def _log_probs(model, inputs: dict[str, torch.Tensor], mask: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One window's full log-probabilities (P, V) at its labelled positions ``mask`` (T,)."""
    with autocast(device_of(model), bf16):
        return torch.log_softmax(model(**inputs).logits[0].float(), -1)[mask]


@torch.no_grad()
def full_distribution_kl(
    teacher,
    models: Mapping[str, object],
    shards: Sequence[Shard],
    cfg: EvalConfig,
    bf16: bool = False,
    on_window: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Mean KL(teacher's full softmax || model) over the labelled positions of the first
    ``cfg.full_kl_windows`` held-out windows, for every model in ``models`` (causal LMs sharing
    the teacher's tokenizer, on the teacher's device): one teacher forward per window, shared by
    every model. ``on_window(name, log_probs, targets)``, if given, sees each window's full
    log-probabilities at its labelled positions (``name`` ``"teacher"`` or a model's) and the
    realized targets there. Returns ``{name: kl, "windows": n, "positions": m}``."""
    device = device_of(teacher)
    teacher.eval()
    for model in models.values():
        model.eval()
    windows = cfg.full_kl_windows if not cfg.max_windows else min(cfg.full_kl_windows, cfg.max_windows)
    sample = dataclasses.replace(cfg, max_windows=windows)
    sums, positions, rows = {name: 0.0 for name in models}, 0, 0
    for batch in heldout_batches(shards, sample, collate_for(shards[0])):
        batch = {n: t.to(device) for n, t in batch.items()}
        for b in range(len(batch["mask"])):  # a window at a time: (T, V) log-probs per model, not (B, T, V)
            mask = batch["mask"][b]
            inputs = {"input_ids": batch["input_ids"][b : b + 1], "attention_mask": batch["attention_mask"][b : b + 1]}
            targets = batch["targets"][b][mask]
            t = _log_probs(teacher, inputs, mask, bf16)
            if on_window is not None:
                on_window("teacher", t, targets)
            for name, model in models.items():
                q = _log_probs(model, inputs, mask, bf16)
                sums[name] += float((t.exp() * (t - q)).sum(-1).double().sum())
                if on_window is not None:
                    on_window(name, q, targets)
            positions += int(mask.sum())
            rows += 1
    if not positions:
        raise ValueError(f"{shards[0].path}: no labelled position in the first {windows} held-out windows")
    return {**{name: total / positions for name, total in sums.items()}, "windows": rows, "positions": positions}
