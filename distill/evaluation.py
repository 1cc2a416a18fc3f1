"""Evaluation on held-out shards: perplexity from each model's own forward pass, and agreement
with the teacher's stored labels (KL over the teacher's top-k plus a tail bucket, top-1)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from distill.configbase import check
from distill.losses import candidate_log_distribution, candidate_scores, forward_kl, sparse_log_distributions
from distill.trainer import collate_for
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
    agreement_prompts: int = 32
    """``generate`` data: held-out prompts on which each model's greedy answer is compared with the teacher's."""
    agreement_max_tokens: int = 64
    """``generate`` data: longest greedy answer compared, in tokens."""

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.max_windows is None or self.max_windows >= 1, "max_windows", self.max_windows, "None or >= 1")
        check(self.agreement_prompts >= 0, "agreement_prompts", self.agreement_prompts, "an integer >= 0")
        check(self.agreement_max_tokens >= 1, "agreement_max_tokens", self.agreement_max_tokens, "an integer >= 1")


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
    positions = torch.arange(logits.shape[1], device=logits.device).expand_as(mask)
    pos_bucket = torch.clamp(torch.floor(torch.log2(positions[mask].double() + 1)).long(), max=POSITION_BUCKETS - 1)
    return {
        "pos_count": torch.bincount(pos_bucket, minlength=POSITION_BUCKETS).double(),
        "pos_kl": torch.bincount(pos_bucket, weights=kl[mask].double(), minlength=POSITION_BUCKETS),
        "nll": nll[mask].double().sum(),
        "kl": kl[mask].double().sum(),
        "top1": (top_id == batch["topk_ids"][..., 0])[mask].double().sum(),
        "positions": mask.sum().double(),
        **_ece_bins(confidence, correct),
    }


def finish(sums: dict[str, torch.Tensor]) -> dict:
    """Metrics from accumulated ``batch_sums``: perplexity, mean KL, top-1 agreement, ECE."""
    n = float(sums["positions"])
    if n == 0:
        raise ValueError("no labelled positions to evaluate")
    gap = (sums["bin_confidence"] - sums["bin_correct"]).abs().sum()
    calibration = _calibration(sums)
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


def _ece_bins(confidence: torch.Tensor, correct: torch.Tensor) -> dict[str, torch.Tensor]:
    bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1)
    return {
        "bin_count": torch.bincount(bins, minlength=ECE_BINS).double(),
        "bin_confidence": torch.bincount(bins, weights=confidence, minlength=ECE_BINS),
        "bin_correct": torch.bincount(bins, weights=correct, minlength=ECE_BINS),
    }


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
        **_ece_bins(confidence, correct),
    }


def finish_candidates(sums: dict[str, torch.Tensor]) -> dict:
    """Metrics from accumulated ``candidate_sums``. ``ppl`` is the perplexity of the gold
    answer among the candidates (exp of its mean NLL; NaN without gold answers), ``top1`` the
    agreement with the teacher's choice, ``accuracy`` the accuracy against gold."""
    n, g = float(sums["examples"]), float(sums["gold"])
    if n == 0:
        raise ValueError("no candidate examples to evaluate")
    return {
        "ppl": math.exp(float(sums["gold_nll"]) / g) if g else float("nan"),
        "kl": float(sums["kl"]) / n,
        "top1": float(sums["agree"]) / n,
        "teacher_agreement": float(sums["agree"]) / n,
        "accuracy": float(sums["gold_correct"]) / g if g else float("nan"),
        "ece": float((sums["bin_confidence"] - sums["bin_correct"]).abs().sum()) / g if g else float("nan"),
        "positions": int(n),
        "gold_examples": int(g),
        "calibration": _calibration(sums),
        "kl_by_position": [],
    }


def _calibration(sums: dict[str, torch.Tensor]) -> list[dict]:
    count = sums["bin_count"]
    return [
        {"bin": i, "count": int(count[i]), "confidence": float(sums["bin_confidence"][i] / count[i]),
         "accuracy": float(sums["bin_correct"][i] / count[i])}
        for i in range(len(count)) if count[i] > 0
    ]


@torch.no_grad()
def evaluate_model(model, shards: Sequence[Shard], cfg: EvalConfig) -> dict:
    """Held-out metrics of one causal LM against the teacher labels in ``shards``."""
    model.eval()
    device = next(model.parameters()).device
    meta = shards[0].meta
    normalize = bool(meta.settings.get("length_normalize"))
    collate_rows = collate_for(shards[0])
    totals: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    windows = 0

    def flush():
        batch = {n: t.to(device) for n, t in collate_rows(rows).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if meta.mode == "candidates":
            scores = candidate_scores(logits, batch["targets"], batch["mask"], batch["index"], normalize)
            sums = candidate_sums(scores, batch)
        else:
            sums = batch_sums(logits, batch)
        for name, value in sums.items():
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
    metrics = finish_candidates(totals) if meta.mode == "candidates" else finish(totals)
    return {**metrics, "parameters": sum(p.numel() for p in model.parameters())}


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


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    """Each prompt's greedy continuation (up to and excluding EOS)."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=eos_token_id if eos_token_id is not None else 0)
        answer = out[0, ids.shape[1]:].tolist()
        if eos_token_id is not None and eos_token_id in answer:
            answer = answer[: answer.index(eos_token_id)]
        answers.append(answer)
    return answers


def answer_agreement(answers: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict:
    """Exact-match rate of greedy answers with the reference (teacher) answers, and the mean
    share of each reference answer that the answer reproduces before diverging."""
    if not reference or len(answers) != len(reference):
        raise ValueError(f"need one answer per reference answer ({len(answers)} vs {len(reference)})")
    exact, prefix = 0, 0.0
    for a, r in zip(answers, reference):
        exact += list(a) == list(r)
        common = 0
        for x, y in zip(a, r):
            if x != y:
                break
            common += 1
        prefix += common / len(r) if r else float(not a)
    return {"greedy_exact_match": exact / len(reference), "greedy_prefix_agreement": prefix / len(reference)}


def load_mc(path: str | Path) -> list[dict]:
    """Questions of a multiple-choice JSONL file (``eval.mc_file``), validated with errors naming
    the file and the 1-based line (blank lines count, as in an editor)."""
    from distill.data import text_lines

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: multiple-choice file not found (eval.mc_file; relative paths are relative to the working directory)")
    items = []
    for i, item in text_lines(path, ValueError, jsonl=True):
        where = f"{path}:{i}"
        for field in ("question", "choices", "answer"):
            if field not in item:
                raise ValueError(f"{where}: missing field {field!r} (need question, choices, answer)")
        if not isinstance(item["question"], str):
            raise ValueError(f"{where}: question must be a string, got {item['question']!r}")
        choices = item["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: choices must be a list of at least two strings, got {choices!r}")
        answer = item["answer"]
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer must be an index into choices (0..{len(choices) - 1}), got {answer!r}")
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
    """Metrics for each named checkpoint folder (loaded from safetensors). On ``generate`` data
    the first model (the teacher) sets the reference greedy answers the others are compared with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = load_mc(cfg.mc_file) if cfg.mc_file else None
    prompts = heldout_prompts(shards, cfg.agreement_prompts) if shards[0].meta.mode == "generate" and cfg.agreement_prompts else []
    reference = None
    results = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(path) if items or prompts else None
        results[name] = {**evaluate_model(model, shards, cfg), "checkpoint_bytes": checkpoint_bytes(path)}
        if items:
            results[name].update(mc_accuracy(model, tok, items, cfg.mc_length_normalize))
        if prompts:
            answers = greedy_answers(model, prompts, cfg.agreement_max_tokens, tok.eos_token_id)
            reference = reference if reference is not None else answers
            results[name].update(answer_agreement(answers, reference))
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


MODE_NOTES = {
    "score": "Held-out text: perplexity of each model on the held-out windows; KL and top-1 against the teacher's stored labels.",
    "generate": "Held-out prompts: perplexity, KL and top-1 over the teacher's answer tokens; greedy answers compared with the teacher's greedy answers.",
    "candidates": "Held-out examples: KL over each example's candidates; top-1 = the model's choice agrees with the teacher's; "
                  "ppl = perplexity of the gold answer among the candidates; gold accuracy where the data has gold answers.",
}


def markdown_table(results: Mapping[str, dict]) -> str:
    titles = {
        "accuracy": "gold accuracy", "teacher_agreement": "agrees with teacher's choice",
        "greedy_exact_match": "greedy = teacher's", "greedy_prefix_agreement": "greedy prefix agreement",
        "mc_accuracy": "MC accuracy", "generation_tokens_per_s": "vLLM gen tok/s",
    }
    extra = [c for c in titles if any(c in m for m in results.values())]
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
