"""Evaluation on held-out shards: perplexity from each model's own forward pass, and agreement
with the teacher's stored labels (KL over the teacher's top-k plus a tail bucket, top-1).

The teacher itself is not run through transformers unless ``eval.teacher_backend`` asks for
it: its held-out metrics come from the labels already stored in the shards (``teacher_metrics``),
and its greedy answers and multiple-choice scores from its vLLM engine. Students run on the
training device (CUDA if present, bf16 where training resolves to bf16; else CPU fp32)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from distill.data import load_mc
from distill.eval.config import EvalConfig
from distill.train.losses import candidate_log_distribution, candidate_scores, forward_kl, sparse_log_distributions
from distill.train.trainer import collate, collate_for
from storage.reader import Shard, ShardStream, StreamPosition

ECE_BINS = 15
POSITION_BUCKETS = 12  # position t falls in bucket floor(log2(t + 1)): 0, 1-2, 3-6, 7-14, ...


def _bytes(byte_lengths: torch.Tensor | None, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bytes of text the labelled targets stand for (for bits per byte), when the model's
    per-id byte lengths are known."""
    if byte_lengths is None:
        return {}
    return {"bytes": byte_lengths.to(targets.device)[targets][mask].double().sum()}


def _token_sums(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    teacher_lp: torch.Tensor,
    kd_mask: torch.Tensor,
    byte_lengths: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sums both ``batch_sums`` and ``cross_batch_sums`` take: NLL, ECE bins and bytes over
    ``batch["mask"]``; KL over ``topk_ids``/``teacher_lp`` plus a tail bucket and top-1 agreement
    over ``kd_mask``. Also returns the per-position KL (B, T)."""
    logits = logits.float()
    mask, targets = batch["mask"], batch["targets"]
    lse = torch.logsumexp(logits, -1, keepdim=True)
    nll = (lse - logits.gather(-1, targets[..., None]))[..., 0]
    log_p, log_q = sparse_log_distributions(logits, batch["topk_ids"], teacher_lp, "bucket", 1.0, lse)
    kl = forward_kl(log_p, log_q)
    top_logit, top_id = logits.max(-1)
    confidence = torch.exp(top_logit - lse[..., 0])[mask].double()
    correct = (top_id == targets)[mask].double()
    agree = (top_id == batch["topk_ids"][..., 0]) & torch.isfinite(teacher_lp[..., 0])
    return {
        "nll": nll[mask].double().sum(),
        "kl": kl[kd_mask].double().sum(),
        "top1": agree[kd_mask].double().sum(),
        "positions": mask.sum().double(),
        **ece_bins(confidence, correct),
        **_bytes(byte_lengths, targets, mask),
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
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    pos_bucket = torch.clamp(torch.floor(torch.log2(positions[mask].double() + 1)).long(), max=POSITION_BUCKETS - 1)
    return {
        "pos_count": torch.bincount(pos_bucket, minlength=POSITION_BUCKETS).double(),
        "pos_kl": torch.bincount(pos_bucket, weights=kl[mask].double(), minlength=POSITION_BUCKETS),
        **sums,
    }


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


def finish(sums: dict[str, torch.Tensor]) -> dict:
    """Metrics from accumulated ``batch_sums``: perplexity, mean KL, top-1 agreement, ECE."""
    n = float(sums["positions"])
    if n == 0:
        raise ValueError("no labelled positions to evaluate")
    calibration = _calibration(sums)
    counts = sums.get("pos_count", torch.zeros(0))
    kl_by_position = [
        {
            "positions": f"{2**b - 1}-{2 ** (b + 1) - 2}",
            "count": int(counts[b]),
            "kl": float(sums["pos_kl"][b] / counts[b]),
        }
        for b in range(len(counts))
        if counts[b] > 0
    ]
    aligned = float(sums.get("kl_positions", n))  # a model with its own tokenizer: aligned positions
    out = {
        "ppl": math.exp(float(sums["nll"]) / n),
        "kl": float(sums["kl"]) / max(aligned, 1.0),
        "top1": float(sums["top1"]) / max(aligned, 1.0),
        "ece": float(expected_calibration_error(sums)),
        "positions": int(n),
        "calibration": calibration,
        "kl_by_position": kl_by_position,
    }
    if float(sums.get("bytes", 0)) > 0:
        out["bpb"] = float(sums["nll"]) / math.log(2) / float(sums["bytes"])
        out["bytes"] = int(sums["bytes"])
    if "kl_positions" in sums:
        out["aligned_positions"] = int(aligned)
    return out


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
        "ece": float(expected_calibration_error(sums)) if g else float("nan"),
        "positions": int(n),
        "gold_examples": int(g),
        "calibration": _calibration(sums),
        "kl_by_position": [],
    }


def _calibration(sums: dict[str, torch.Tensor]) -> list[dict]:
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


def eval_device(precision: str = "auto") -> tuple[torch.device, bool]:
    """Where and in which precision models are evaluated: the training device, CUDA if
    available, with bf16 autocast when ``train.precision`` resolves to bf16 there (``bf16``, or
    ``auto`` on CUDA); otherwise the CPU in fp32. Returns ``(device, bf16)``."""
    if torch.cuda.is_available():
        return torch.device("cuda"), precision in ("auto", "bf16")
    return torch.device("cpu"), False


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def heldout_batches(shards: Sequence[Shard], cfg: EvalConfig, collate_rows) -> Iterator[dict[str, torch.Tensor]]:
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


def _accumulate(totals: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    for name, value in sums.items():
        totals[name] = totals.get(name, 0) + value.cpu()


@torch.no_grad()
def evaluate_model(
    model,
    shards: Sequence[Shard],
    cfg: EvalConfig,
    bf16: bool = False,
    byte_lengths: torch.Tensor | None = None,
    cross=None,
) -> dict:
    """Held-out metrics of one causal LM against the teacher labels in ``shards``, on the
    model's device (``bf16``: under bf16 autocast; metrics are finished in fp32/fp64).
    ``byte_lengths``: bytes per token id of the teacher's tokenizer, for bits per byte.
    ``cross``: a ``distill.train.xtok.CrossTokenizer`` for a model with its own tokenizer."""
    from distill.train.xtok import collate_cross

    model.eval()
    device = _device(model)
    meta = shards[0].meta
    normalize = bool(meta.settings.get("length_normalize"))
    totals: dict[str, torch.Tensor] = {}
    if cross is not None:
        collate_rows = lambda rows: collate_cross(rows, meta.slots, cross)  # noqa: E731
        student_lengths = torch.tensor([len(b) for b in cross.student_bytes])
    else:
        collate_rows = collate_for(shards[0])
    for batch in heldout_batches(shards, cfg, collate_rows):
        batch = {n: t.to(device) for n, t in batch.items()}
        with _autocast(device, bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        if meta.mode == "candidates":
            scores = candidate_scores(logits, batch["targets"], batch["mask"], batch["index"], normalize)
            sums = candidate_sums(scores, batch)
        elif cross is not None:
            sums = cross_batch_sums(logits, batch, student_lengths)
        else:
            sums = batch_sums(logits, batch, byte_lengths)
        _accumulate(totals, sums)
    metrics = finish_candidates(totals) if meta.mode == "candidates" else finish(totals)
    return {**metrics, "parameters": sum(p.numel() for p in model.parameters())}


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the CUDA allocator's view, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def full_kl_skip_reason(teacher_path: str | Path, device: torch.device, bf16: bool) -> str | None:
    """Why the teacher's full distribution cannot be computed here (None: it can): its weights
    in the evaluation's dtype (bf16 or fp32), plus a quarter for activations, must fit the
    device's free memory."""
    need = checkpoint_parameters(teacher_path) * (2 if bf16 else 4) * 1.25
    free = free_memory(device)
    if need > free:
        return f"the teacher needs about {need / 2**30:.1f} GiB on {device.type} and {free / 2**30:.1f} GiB are free"
    return None


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
    the teacher's tokenizer, on the teacher's device): one teacher forward per batch, shared by
    every model. Unlike the stored-label KL (top-k plus one bucket, what ``tail: bucket`` KD
    minimizes), it sees how each model spreads the mass outside the teacher's top-k.
    ``on_window(name, log_probs, targets)``, if given, sees each window's full log-probabilities
    at its labelled positions (``name`` ``"teacher"`` or a model's) and the realized targets there.
    Returns ``{name: kl, "windows": n, "positions": m}``."""
    device = _device(teacher)
    teacher.eval()
    windows = cfg.full_kl_windows if not cfg.max_windows else min(cfg.full_kl_windows, cfg.max_windows)
    sample = dataclasses.replace(cfg, max_windows=windows)
    sums, positions, rows = {name: 0.0 for name in models}, 0, 0
    for batch in heldout_batches(shards, sample, collate_for(shards[0])):
        batch = {n: t.to(device) for n, t in batch.items()}
        for b in range(len(batch["mask"])):  # a window at a time: (T, V) log-probs per model, not (B, T, V)
            mask = batch["mask"][b]
            inputs = {"input_ids": batch["input_ids"][b : b + 1], "attention_mask": batch["attention_mask"][b : b + 1]}
            targets = batch["targets"][b][mask]
            with _autocast(device, bf16):
                t = torch.log_softmax(teacher(**inputs).logits[0].float(), -1)[mask]
            if on_window is not None:
                on_window("teacher", t, targets)
            for name, model in models.items():
                model.eval()
                with _autocast(device, bf16):
                    q = torch.log_softmax(model(**inputs).logits[0].float(), -1)[mask]
                sums[name] += float((t.exp() * (t - q)).sum(-1).double().sum())
                if on_window is not None:
                    on_window(name, q, targets)
            positions += int(mask.sum())
            rows += 1
    if not positions:
        raise ValueError(f"{shards[0].path}: no labelled position in the first {windows} held-out windows")
    return {**{name: total / positions for name, total in sums.items()}, "windows": rows, "positions": positions}


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
    correct = (batch["topk_ids"][..., 0] == batch["targets"])[mask].double()
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    pos_bucket = torch.clamp(torch.floor(torch.log2(positions[mask].double() + 1)).long(), max=POSITION_BUCKETS - 1)
    return {
        "pos_count": torch.bincount(pos_bucket, minlength=POSITION_BUCKETS).double(),
        "pos_kl": torch.zeros(POSITION_BUCKETS, dtype=torch.float64),
        "nll": -batch["target_logprobs"][mask].double().sum(),
        "kl": torch.zeros((), dtype=torch.float64),
        "top1": mask.sum().double(),
        "positions": mask.sum().double(),
        **ece_bins(confidence, correct),
        **_bytes(byte_lengths, batch["targets"], mask),
    }


def checkpoint_parameters(path: str | Path) -> int:
    """Parameter count of a safetensors checkpoint folder, from the tensor shapes in the files'
    headers (no weights read); a tied embedding is stored, and counted, once."""
    import json
    import struct

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files to count parameters in")
    total = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(v["shape"]) for name, v in header.items() if name != "__metadata__")
    return total


def teacher_metrics(
    shards: Sequence[Shard],
    cfg: EvalConfig,
    checkpoint: str | Path | None = None,
    byte_lengths: torch.Tensor | None = None,
) -> dict:
    """The teacher's held-out metrics from its stored labels, with no forward pass: the dict
    ``evaluate_model`` returns. Token modes: perplexity from the stored realized-token logprobs
    (codec steps of 2^-10 nats: at most 4.9e-4 relative error), KL 0, top-1 1, ECE from the
    stored top-1. ``candidates``: KL 0, agreement 1, gold NLL, accuracy and ECE from the stored
    candidate distribution. ``parameters`` from the safetensors headers of ``checkpoint`` (None
    without one)."""
    meta = shards[0].meta
    totals: dict[str, torch.Tensor] = {}
    if meta.mode == "candidates":
        for batch in heldout_batches(shards, cfg, collate_teacher_candidates):
            _accumulate(totals, candidate_sums(batch["teacher_logprobs"], batch))
        metrics = finish_candidates(totals)
    else:
        k = meta.slots
        for batch in heldout_batches(shards, cfg, lambda rows: collate_teacher(rows, k)):
            _accumulate(totals, teacher_sums(batch, byte_lengths))
        metrics = finish(totals)
    return {**metrics, "parameters": checkpoint_parameters(checkpoint) if checkpoint is not None else None}


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


def _cut(answer: list[int], limit: int, eos_token_id: int | None) -> list[int]:
    answer = answer[:limit]
    if eos_token_id is not None and eos_token_id in answer:
        answer = answer[: answer.index(eos_token_id)]
    return answer


@torch.no_grad()
def greedy_answers(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | None,
    batch_size: int = 1,
    bf16: bool = False,
) -> list[list[int]]:
    """Each prompt's greedy continuation (up to and excluding EOS), at most ``max_new_tokens``
    (one number, or one per prompt), generated ``batch_size`` prompts at a time, left-padded."""
    model.eval()
    device = _device(model)
    limits = (
        [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    )
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    pad = eos_token_id if eos_token_id is not None else 0
    answers = []
    for b in range(0, len(prompts), batch_size):
        batch, lims = prompts[b : b + batch_size], limits[b : b + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor([int(t) for t in p])
            attention[i, width - len(p) :] = 1
        ids, attention = ids.to(device), attention.to(device)
        with _autocast(device, bf16):
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max(lims),
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=pad,
            )
        for i, limit in enumerate(lims):
            answers.append(_cut(out[i, width:].tolist(), limit, eos_token_id))
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


def mc_prompt(item: dict) -> tuple[str, list[str]]:
    """The prompt and the choice continuations a multiple-choice question is scored on."""
    return f"Question: {item['question']}\nAnswer:", [" " + c for c in item["choices"]]


def choice_token_ids(tokenizer, prompt: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``prompt`` and of each choice continuing it (the tokens ``prompt + choice``
    adds after the prompt's own tokens)."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    choice_ids = []
    for choice in choices:
        ids = list(tokenizer(prompt + choice)["input_ids"])[len(prompt_ids) :]
        if not ids:
            raise ValueError(f"choice {choice!r} adds no tokens to the prompt")
        choice_ids.append(ids)
    return prompt_ids, choice_ids


@torch.no_grad()
def sequence_logprobs(
    model, sequences: Sequence[Sequence[int]], starts: Sequence[int], batch_size: int, bf16: bool = False
) -> torch.Tensor:
    """Per sequence, the summed logprob of its tokens ``start ..`` and their count, (N, 2)
    float64: right-padded forwards of ``batch_size`` sequences (padding after a sequence does
    not change a causal model's logits on it)."""
    device = _device(model)
    out = []
    for b in range(0, len(sequences), batch_size):
        seqs, sts = sequences[b : b + batch_size], starts[b : b + batch_size]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
        for i, (s, start) in enumerate(zip(seqs, sts)):
            ids[i, : len(s)] = torch.tensor([int(t) for t in s])
            attention[i, : len(s)] = 1
            mask[i, start - 1 : len(s) - 1] = True  # logits at t predict token t + 1
        ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
        with _autocast(device, bf16):
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        sums = torch.where(mask, logprobs, 0.0).double().sum(-1)
        out.append(torch.stack([sums, mask.sum(-1).double()], -1).cpu())
    return torch.cat(out) if out else torch.zeros((0, 2), dtype=torch.float64)


def choice_scores(
    model, tokenizer, prompt: str, choices: Sequence[str], length_normalize: bool = False
) -> torch.Tensor:
    """Log-likelihood of each choice continuing ``prompt`` (summed, or mean, over its tokens),
    every choice in one padded forward."""
    model.eval()
    prompt_ids, choice_ids = choice_token_ids(tokenizer, prompt, choices)
    scored = sequence_logprobs(
        model, [prompt_ids + c for c in choice_ids], [len(prompt_ids)] * len(choice_ids), len(choice_ids)
    )
    return (scored[:, 0] / scored[:, 1] if length_normalize else scored[:, 0]).float()


def _mc_result(items: Sequence[dict], scored, length_normalize: bool) -> dict:
    """Accuracy from (N, 2) summed logprobs and counts of every choice of ``items``, in order."""
    scored = torch.as_tensor(np.asarray(scored, np.float64))
    scores = scored[:, 0] / scored[:, 1] if length_normalize else scored[:, 0]
    correct, at = 0, 0
    for item in items:
        n = len(item["choices"])
        correct += int(scores[at : at + n].argmax()) == item["answer"]
        at += n
    return {"mc_accuracy": correct / len(items), "mc_questions": len(items)}


def mc_sequences(tokenizer, items: Sequence[dict]) -> tuple[list[list[int]], list[int], list[int]]:
    """Every choice of every question as one token sequence: (sequences, start of the choice's
    tokens, index of the question), in question and choice order."""
    seqs, starts, owners = [], [], []
    for q, item in enumerate(items):
        prompt_ids, choice_ids = choice_token_ids(tokenizer, *mc_prompt(item))
        for c in choice_ids:
            seqs.append(prompt_ids + c)
            starts.append(len(prompt_ids))
            owners.append(q)
    return seqs, starts, owners


def mc_accuracy(
    model, tokenizer, items: Sequence[dict], length_normalize: bool = False, batch_size: int = 8, bf16: bool = False
) -> dict:
    """Multiple-choice accuracy by log-likelihood; the choices of ``batch_size`` questions are
    scored in one padded forward."""
    model.eval()
    seqs, starts, owners = mc_sequences(tokenizer, items)
    scored = []
    for b in range(0, len(items), batch_size):
        idx = [i for i, q in enumerate(owners) if b <= q < b + batch_size]
        scored.append(sequence_logprobs(model, [seqs[i] for i in idx], [starts[i] for i in idx], len(idx), bf16))
    return _mc_result(items, torch.cat(scored), length_normalize)


def engine_mc_accuracy(
    engine, tokenizer, items: Sequence[dict], length_normalize: bool = False, source: str | Path = "eval.mc_file"
) -> dict:
    """``mc_accuracy`` of the teacher through its vLLM engine (``VllmTeacher.sequence_logprobs``).
    A question whose prompt + choice exceeds the engine's length raises, naming ``source`` and the question."""
    seqs, starts, owners = mc_sequences(tokenizer, items)
    for seq, q in zip(seqs, owners):
        if len(seq) > engine.max_len:
            raise ValueError(
                f"{source}: question {q + 1} ({items[q]['question'][:60]!r}): prompt + choice is {len(seq)} tokens, "
                f"beyond the teacher engine's max_len {engine.max_len} (corpus.window); shorten the question or raise corpus.window"
            )
    return _mc_result(items, engine.sequence_logprobs(seqs, starts), length_normalize)


def checkpoint_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def evaluate(
    models: Mapping[str, str | Path],
    shards: Sequence[Shard],
    cfg: EvalConfig,
    precision: str = "auto",
    engine_factory: Callable[[], object] | None = None,
    byte_lengths: torch.Tensor | None = None,
    cross: Mapping[str, object] | None = None,
) -> dict[str, dict]:
    """Metrics for each named checkpoint folder. The first model is the teacher: on ``generate``
    data its greedy answers are the reference the others are compared with.

    With ``cfg.teacher_backend`` ``stored`` the teacher's metrics come from the stored labels
    (``teacher_metrics``) and its greedy answers and MC scores from ``engine_factory()`` (a
    ``VllmTeacher``, called only when needed); the other models, and the teacher with
    ``transformers``, are loaded from safetensors onto ``eval_device(precision)``
    (``precision``: the training's ``train.precision``). ``byte_lengths`` (bytes per teacher
    token id) adds bits per byte; ``cross`` maps the names of models with their own tokenizer to
    their ``distill.train.xtok.CrossTokenizer``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cross = cross or {}
    harness = bool(cfg.lm_eval_tasks)
    if harness:
        from distill.eval.harness import engine_lm, flatten, run_tasks, student_lm
    items = load_mc(cfg.mc_file) if cfg.mc_file else None
    prompts = (
        heldout_prompts(shards, cfg.agreement_prompts)
        if shards[0].meta.mode == "generate" and cfg.agreement_prompts
        else []
    )
    device, bf16 = eval_device(precision)
    limits: list[int] | int = cfg.agreement_max_tokens
    reference = None
    results = {}
    for i, (name, path) in enumerate(models.items()):
        tok = AutoTokenizer.from_pretrained(path) if items or prompts or harness else None
        if i == 0 and cfg.teacher_backend == "stored":
            results[name] = {
                **teacher_metrics(shards, cfg, path, byte_lengths),
                "checkpoint_bytes": checkpoint_bytes(path),
            }
            if items or prompts or harness:
                if engine_factory is None:
                    raise ValueError(
                        "eval.teacher_backend='stored' needs the teacher's vLLM engine for greedy answers and "
                        "multiple-choice scores: pass engine_factory (or set eval.teacher_backend: transformers)"
                    )
                engine = engine_factory()
                if items:
                    results[name].update(engine_mc_accuracy(engine, tok, items, cfg.mc_length_normalize, cfg.mc_file))
                if prompts:
                    limits = [min(cfg.agreement_max_tokens, engine.max_len - len(p)) for p in prompts]
                    reference = engine.greedy(prompts, limits, tok.eos_token_id)
                    results[name].update(answer_agreement(reference, reference))
                if harness:
                    scores = run_tasks(
                        engine_lm(engine, tok), cfg.lm_eval_tasks, cfg.lm_eval_include, cfg.lm_eval_limit
                    )
                    results[name].update({"lm_eval": scores, **flatten(scores)})
            continue
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device)
        results[name] = {
            **evaluate_model(model, shards, cfg, bf16, byte_lengths, cross.get(name)),
            "checkpoint_bytes": checkpoint_bytes(path),
        }
        if items:
            results[name].update(mc_accuracy(model, tok, items, cfg.mc_length_normalize, cfg.batch_size, bf16))
        if prompts:
            answers = greedy_answers(model, prompts, limits, tok.eos_token_id, cfg.batch_size, bf16)
            reference = reference if reference is not None else answers
            results[name].update(answer_agreement(answers, reference))
        if harness:
            scores = run_tasks(
                student_lm(model, tok, cfg.batch_size), cfg.lm_eval_tasks, cfg.lm_eval_include, cfg.lm_eval_limit
            )
            results[name].update({"lm_eval": scores, **flatten(scores)})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def write_plots(
    results: Mapping[str, dict], histories: Mapping[str, list[dict]], out_dir: str | Path
) -> dict[str, Path]:
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
            ax.plot(
                [b["positions"] for b in m["kl_by_position"]],
                [b["kl"] for b in m["kl_by_position"]],
                marker="o",
                label=name,
            )
    ax.set_xlabel("position in window"), ax.set_ylabel("KL(teacher‖model)"), ax.legend(), fig.tight_layout()
    ax.tick_params(axis="x", labelrotation=45)
    paths["kl_by_position"] = out_dir / "kl_by_position.png"
    fig.savefig(paths["kl_by_position"], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for name, m in results.items():
        ax.plot(
            [c["confidence"] for c in m["calibration"]],
            [c["accuracy"] for c in m["calibration"]],
            marker="o",
            label=f"{name} (ECE {m['ece']:.3f})",
        )
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
        "accuracy": "gold accuracy",
        "teacher_agreement": "agrees with teacher's choice",
        "greedy_exact_match": "greedy = teacher's",
        "greedy_prefix_agreement": "greedy prefix agreement",
        "mc_accuracy": "MC accuracy",
        "generation_tokens_per_s": "vLLM gen tok/s",
        "kl_full": "KL full (sample)",
    }
    harness = sorted({c for m in results.values() for c in m if c.startswith("lm_eval_")})
    titles = {**titles, **{c: c[len("lm_eval_") :].replace("_acc", " acc") for c in harness}}
    extra = [c for c in titles if any(c in m for m in results.values())]
    lines = [
        "| model | params (M) | checkpoint (MB) | held-out ppl | KL(teacher‖model) | top-1 agreement | ECE |"
        + "".join(f" {titles[c]} |" for c in extra),
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    if any("bpb" in m for m in results.values()):  # models compare across tokenizers by bits per byte
        lines = [lines[0].replace(" held-out ppl |", " held-out ppl | bits/byte |"), lines[1] + "---:|"]
    for name, m in results.items():
        size = f"{m['checkpoint_bytes'] / 1e6:.0f}" if "checkpoint_bytes" in m else "–"
        cells = "".join(f" {m[c]:.3f} |" if c in m else " – |" for c in extra)
        bpb = (f" {m['bpb']:.4f} |" if "bpb" in m else " – |") if "bits/byte" in lines[0] else ""
        lines.append(
            f"| {name} | {m['parameters'] / 1e6:.1f} | {size} | {m['ppl']:.2f} |{bpb} {m['kl']:.4f} | {m['top1']:.4f} | {m['ece']:.4f} |{cells}"
        )
    return "\n".join(lines)


def summary_line(results: Mapping[str, dict]) -> str:
    t, s, b = results["teacher"], results["student"], results["baseline"]
    return (
        f"teacher_ppl={t['ppl']:.2f} student_ppl={s['ppl']:.2f} baseline_ppl={b['ppl']:.2f} "
        f"student_kl={s['kl']:.4f} baseline_kl={b['kl']:.4f} "
        f"student_top1={s['top1']:.4f} baseline_top1={b['top1']:.4f}"
        + (
            f" teacher_bpb={t['bpb']:.4f} student_bpb={s['bpb']:.4f} baseline_bpb={b['bpb']:.4f}"
            if all("bpb" in m for m in (t, s, b))
            else ""
        )
        + (
            f" student_kl_full={s['kl_full']:.4f} baseline_kl_full={b['kl_full']:.4f}"
            if "kl_full" in s and "kl_full" in b
            else ""
        )
    )


def gate(results: Mapping[str, dict], cfg: EvalConfig) -> tuple[bool, str]:
    """Did distillation help? The student must beat the CE-only baseline by the configured
    margins and the student at initialization (``student_init``) outright, in held-out
    perplexity and, where measured for all three, bits per byte. Comparing with the baseline
    alone lets a student no better than its initialization pass whenever the baseline is worse.
    The stored-label KL is not a leg: ``tail: bucket`` KD minimizes exactly that quantity."""
    s, b, init = results["student"], results["baseline"], results["student_init"]
    legs = [("ppl", "{:.2f}", cfg.min_ppl_margin)]
    if all("bpb" in m for m in (s, b, init)):
        legs.append(("bpb", "{:.4f}", cfg.min_bpb_margin))
    passed, parts = True, []
    for metric, fmt, margin in legs:
        vs_base = s[metric] < b[metric] - margin
        vs_init = s[metric] < init[metric]
        passed = passed and vs_base and vs_init
        parts.append(
            f"{metric} {fmt.format(s[metric])} vs baseline {fmt.format(b[metric])} (margin {margin}): "
            f"{'ok' if vs_base else 'FAIL'}, vs student_init {fmt.format(init[metric])}: {'ok' if vs_init else 'FAIL'}"
        )
    return passed, "; ".join(parts)
