"""Multiple-choice benchmarks (``eval.mc_file``) scored by log-likelihood: each choice's summed
(or mean) token logprob after the question's prompt, through a loaded model or the teacher's
vLLM engine; the highest-scoring choice is the model's answer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distill.eval.models import autocast, device_of


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


def _right_padded(sequences: Sequence[Sequence[int]], starts: Sequence[int]):
    """``sequences`` as right-padded (N, W) ids and attention, and the (N, W - 1) mask of the
    logits that predict each sequence's tokens ``start ..`` (logits at t predict token t + 1)."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(sequences, starts)):
        ids[i, : len(s)] = torch.tensor([int(t) for t in s])
        attention[i, : len(s)] = 1
        mask[i, start - 1 : len(s) - 1] = True
    return ids, attention, mask


@torch.no_grad()
def sequence_logprobs(
    model, sequences: Sequence[Sequence[int]], starts: Sequence[int], batch_size: int, bf16: bool = False
) -> torch.Tensor:
    """Per sequence, the summed logprob of its tokens ``start ..`` and their count, (N, 2)
    float64: right-padded forwards of ``batch_size`` sequences (padding after a sequence does
    not change a causal model's logits on it)."""
    device = device_of(model)
    out = []
    for b in range(0, len(sequences), batch_size):
        padded = _right_padded(sequences[b : b + batch_size], starts[b : b + batch_size])
        ids, attention, mask = (t.to(device) for t in padded)
        with autocast(device, bf16):
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
                f"beyond the teacher engine's max_len {engine.max_len} (corpus.window); shorten the question or "
                "raise corpus.window"
            )
    return _mc_result(items, engine.sequence_logprobs(seqs, starts), length_normalize)
