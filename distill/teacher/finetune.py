"""A teacher adapted to the run's training split by a short causal-LM fine-tune.

This gives an ensemble a second, different teacher without another download: the bundled
teacher after ``steps`` optimizer steps of next-token cross-entropy on the training windows
(the same windows the labels cover, so the held-out split stays unseen). The result is an
ordinary safetensors checkpoint folder with the base model's tokenizer files, under
``<root>/models/finetuned-<key>``; the key covers the base weights, the training windows'
fingerprints, these settings and this module's source, so it is built once and reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from distill.teacher.checkpoint import MODEL_CONFIG_FILES, TOKENIZER_FILES
from distill.teacher.config import FinetuneConfig

FINETUNE_INFO = "finetune.json"


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    warmup = max(1, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(windows: Sequence[tuple[list[int], int]], cfg: FinetuneConfig):
    """``cfg.steps`` batches of (input_ids, label_start) windows, reshuffled each pass."""
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    for _ in range(cfg.steps):
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:
                order = list(rng.permutation(len(windows)))
            batch.append(windows[order.pop()])
        yield batch


def finetune(
    base_dir: Path, windows: Sequence[tuple[list[int], int]], cfg: FinetuneConfig, out: Path, progress: bool = True
) -> dict:
    """Fine-tune the checkpoint in ``base_dir`` on ``windows`` ((token ids, label start) pairs:
    the loss covers the tokens after ``label_start``) and save it to ``out`` atomically (a
    temporary folder renamed into place). Returns the run's summary (also in ``out/finetune.json``)."""
    if not windows:
        raise ValueError(f"{base_dir}: no training windows to fine-tune the teacher on")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    t0 = time.perf_counter()
    tokens = 0
    for step, batch in enumerate(
        tqdm(_batches(windows, cfg), total=cfg.steps, desc=f"fine-tune {base_dir.name}", disable=not progress)
    ):
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), T, dtype=torch.long)
        attention = torch.zeros(len(batch), T, dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        for b, (ids, start) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.as_tensor(ids)
            attention[b, : len(ids)] = 1
            labels[b, start + 1 : len(ids)] = torch.as_tensor(ids[start + 1 :])  # predicted after label_start
        tokens += int((labels != -100).sum())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"fine-tuning {base_dir}: loss is {losses[-1]} at step {step}; lower finetune.lr")
    summary = {
        "base": str(base_dir),
        "settings": dataclasses.asdict(cfg),
        "windows": len(windows),
        "tokens": tokens,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "seconds": time.perf_counter() - t0,
        "device": device.type,
    }
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        for name in (*TOKENIZER_FILES, *[f for f in MODEL_CONFIG_FILES if not (tmp / f).exists()]):
            if (base_dir / name).exists():
                shutil.copyfile(base_dir / name, tmp / name)
        (tmp / FINETUNE_INFO).write_text(json.dumps(summary, indent=1))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
