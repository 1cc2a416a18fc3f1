"""Greedy answers to held-out prompts (``generate`` data) and their agreement with the
teacher's greedy answers: exact match and the share of the teacher's answer reproduced."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from distill.eval.models import autocast, device_of


def _cut(answer: list[int], limit: int, eos_token_id: int | None) -> list[int]:
    answer = answer[:limit]
    if eos_token_id is not None and eos_token_id in answer:
        answer = answer[: answer.index(eos_token_id)]
    return answer


def _left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as left-padded (N, W) ids and attention, so every prompt ends at column W."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor([int(t) for t in p])
        attention[i, width - len(p) :] = 1
    return ids, attention


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
    device = device_of(model)
    limits = (
        [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    )
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    pad = eos_token_id if eos_token_id is not None else 0
    answers = []
    for b in range(0, len(prompts), batch_size):
        lims = limits[b : b + batch_size]
        ids, attention = (t.to(device) for t in _left_padded(prompts[b : b + batch_size], pad))
        with autocast(device, bf16):
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max(lims),
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=pad,
            )
        answers += [_cut(out[i, ids.shape[1] :].tolist(), limit, eos_token_id) for i, limit in enumerate(lims)]
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


@dataclasses.dataclass
class AnswerReference:
    """The greedy-answer comparison one evaluation shares across its models: the held-out
    prompts, each prompt's answer length limit (the same for every model), and the reference
    answers, the first model's (the teacher's)."""

    prompts: list[list[int]]
    limits: list[int] | int
    reference: list[list[int]] | None = None

    def agreement(self, answers: list[list[int]]) -> dict:
        """``answer_agreement`` with the reference; the first answers compared become it."""
        if self.reference is None:
            self.reference = answers
        return answer_agreement(answers, self.reference)
