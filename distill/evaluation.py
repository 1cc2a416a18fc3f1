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
    mc_file: str | None = None
    """Bring-your-own multiple-choice benchmark: a JSONL file of {question, choices, answer (index)}, scored by log-likelihood."""
    mc_length_normalize: bool = False
    """Score MC choices by mean instead of summed token logprob."""
    generation_throughput: bool = False
    """Also measure teacher and student generation tokens/s under vLLM (starts two engines)."""

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.max_windows is None or self.max_windows >= 1, "max_windows", self.max_windows, "None or >= 1")


ECE_BINS = 15
POSITION_BUCKETS = 12  # position t falls in bucket floor(log2(t + 1)): 0, 1-2, 3-6, 7-14, ...


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
    positions = torch.arange(logits.shape[1], device=logits.device).expand_as(mask)
    pos_bucket = torch.clamp(torch.floor(torch.log2(positions[mask].double() + 1)).long(), max=POSITION_BUCKETS - 1)
    return {
        "pos_count": torch.bincount(pos_bucket, minlength=POSITION_BUCKETS).double(),
        "pos_kl": torch.bincount(pos_bucket, weights=kl[mask].double(), minlength=POSITION_BUCKETS),
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
    count = sums["bin_count"]
    calibration = [
        {"bin": i, "count": int(count[i]), "confidence": float(sums["bin_confidence"][i] / count[i]),
         "accuracy": float(sums["bin_correct"][i] / count[i])}
        for i in range(len(count)) if count[i] > 0
    ]
    kl_by_position = [
        {"positions": f"{2**b - 1}-{2**(b + 1) - 2}", "count": int(sums["pos_count"][b]), "kl": float(sums["pos_kl"][b] / sums["pos_count"][b])}
        for b in range(len(sums["pos_count"])) if sums["pos_count"][b] > 0
    ]
    return {
        "ppl": math.exp(float(sums["nll"]) / n),
        "kl": float(sums["kl"]) / n,
        "top1": float(sums["top1"]) / n,
        "ece": float(gap) / n,
        "positions": int(n),
        "calibration": calibration,
        "kl_by_position": kl_by_position,
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


def load_mc(path: str | Path) -> list[dict]:
    """Questions of a multiple-choice JSONL file, validated with errors naming the line."""
    import json

    items = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        for field in ("question", "choices", "answer"):
            if field not in item:
                raise ValueError(f"{path}:{i}: missing field {field!r} (need question, choices, answer)")
        if not isinstance(item["choices"], list) or len(item["choices"]) < 2:
            raise ValueError(f"{path}:{i}: choices must be a list of at least two strings")
        if not isinstance(item["answer"], int) or not 0 <= item["answer"] < len(item["choices"]):
            raise ValueError(f"{path}:{i}: answer must be an index into choices")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


@torch.no_grad()
def choice_scores(model, tokenizer, prompt: str, choices: Sequence[str], length_normalize: bool = False) -> torch.Tensor:
    """Log-likelihood of each choice continuing ``prompt`` (summed, or mean, over its tokens)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    scores = []
    for choice in choices:
        choice_ids = tokenizer(prompt + choice)["input_ids"][len(prompt_ids):]
        if not choice_ids:
            raise ValueError(f"choice {choice!r} adds no tokens to the prompt")
        ids = torch.tensor([prompt_ids + choice_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, len(prompt_ids):]
        token_lp = logprobs[len(prompt_ids) - 1:].gather(-1, targets[:, None])[:, 0]
        scores.append(token_lp.mean() if length_normalize else token_lp.sum())
    return torch.stack(scores)


def mc_accuracy(model, tokenizer, items: Sequence[dict], length_normalize: bool = False) -> dict:
    model.eval()
    correct = 0
    for item in items:
        scores = choice_scores(model, tokenizer, f"Question: {item['question']}\nAnswer:", [" " + c for c in item["choices"]], length_normalize)
        correct += int(scores.argmax()) == item["answer"]
    return {"mc_accuracy": correct / len(items), "mc_questions": len(items)}


def checkpoint_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def evaluate(models: Mapping[str, str | Path], shards: Sequence[Shard], cfg: EvalConfig) -> dict[str, dict]:
    """Metrics for each named checkpoint folder (loaded from safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = load_mc(cfg.mc_file) if cfg.mc_file else None
    results = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        results[name] = {**evaluate_model(model, shards, cfg), "checkpoint_bytes": checkpoint_bytes(path)}
        if items:
            results[name].update(mc_accuracy(model, AutoTokenizer.from_pretrained(path), items, cfg.mc_length_normalize))
        del model
    return results


def write_plots(results: Mapping[str, dict], histories: Mapping[str, list[dict]], out_dir: str | Path) -> dict[str, Path]:
    """Training curves, KL by position bucket and a calibration diagram as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, history in histories.items():
        ax.plot([h["step"] for h in history], [h["ce"] for h in history], label=f"{name} CE")
    ax.set_xlabel("step"), ax.set_ylabel("train cross-entropy"), ax.legend(), fig.tight_layout()
    paths["training_curves"] = out_dir / "training_curves.png"
    fig.savefig(paths["training_curves"], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, m in results.items():
        if name != "teacher":
            ax.plot([b["positions"] for b in m["kl_by_position"]], [b["kl"] for b in m["kl_by_position"]], marker="o", label=name)
    ax.set_xlabel("position in window"), ax.set_ylabel("KL(teacher‖model)"), ax.legend(), fig.tight_layout()
    ax.tick_params(axis="x", labelrotation=45)
    paths["kl_by_position"] = out_dir / "kl_by_position.png"
    fig.savefig(paths["kl_by_position"], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for name, m in results.items():
        ax.plot([c["confidence"] for c in m["calibration"]], [c["accuracy"] for c in m["calibration"]], marker="o", label=f"{name} (ECE {m['ece']:.3f})")
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.legend(fontsize=8), fig.tight_layout()
    paths["calibration"] = out_dir / "calibration.png"
    fig.savefig(paths["calibration"], dpi=100)
    plt.close(fig)
    return paths


def markdown_table(results: Mapping[str, dict]) -> str:
    extra = [c for c in ("mc_accuracy", "generation_tokens_per_s") if any(c in m for m in results.values())]
    titles = {"mc_accuracy": "MC accuracy", "generation_tokens_per_s": "vLLM gen tok/s"}
    lines = [
        "| model | params (M) | checkpoint (MB) | held-out ppl | KL(teacher‖model) | top-1 agreement | ECE |"
        + "".join(f" {titles[c]} |" for c in extra),
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for name, m in results.items():
        size = f"{m['checkpoint_bytes'] / 1e6:.0f}" if "checkpoint_bytes" in m else "–"
        cells = "".join(f" {m[c]:.3f} |" if c in m else " – |" for c in extra)
        lines.append(f"| {name} | {m['parameters'] / 1e6:.1f} | {size} | {m['ppl']:.2f} | {m['kl']:.4f} | {m['top1']:.4f} | {m['ece']:.4f} |{cells}")
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
