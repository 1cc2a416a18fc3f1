"""Soft labels computed from full-vocabulary logits, on whatever device holds them (issue 26).

One pure function, ``label_logits``: logits of N positions in, packed label tensors out, with no
Python object per entry. It is the math a labeller inside the engine runs on the engine's device;
the engine hook that calls it is not wired yet, so labelling still goes through vLLM's
``prompt_logprobs`` (``distill.teacher.vllm_engine``).

Per position, from ``logits`` (N, V) at ``temperature``:

- ``topk_ids`` (N, k) int64 and ``topk_logprobs`` (N, k) float32, most likely first;
- ``target_logprobs`` (N,) float32, the realized next token's logprob (when ``targets`` is given);
- ``tail_mass`` (N,) float32: the probability outside the top k, as ``exp(logsumexp(rest) - lse)``,
  exact down to float32's smallest normal numbers, where ``1 - sum(p)`` of float32 logprobs
  cannot resolve less than about 1e-7;
- with ``draws`` > 0, ``draw_ids`` (N, draws) int64 and ``draw_counts`` (N, draws) int32: a
  systematic sample from the *whole* vocabulary (one uniform offset per position, points
  ``(u + i) / draws`` on the cumulative distribution), the distinct ids most drawn first, unused
  slots with count 0 and the first id repeated. Every id's count is within one of ``draws * p``,
  and ``count / draws`` has expectation ``p``: no proposal, so no bucket bias.

The log-softmax and the cumulative distribution run in float64 where the device supports it:
a float32 cumulative sum over 128k ids drifts by about 1e-3, more than one draw in 80.
"""

from __future__ import annotations

import torch


def _wide(device: torch.device) -> torch.dtype:
    """float64 where the device computes it (CPU, CUDA); float32 elsewhere (e.g. MPS)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def label_logits(
    logits: torch.Tensor,
    k: int,
    *,
    targets: torch.Tensor | None = None,
    draws: int = 0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Packed labels of ``logits`` (N, V); see the module docstring for the returned tensors.

    ``targets`` (N,) int64: realized next tokens. ``generator``: the source of the systematic
    offsets (on ``logits``' device), so labels are reproducible per call."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, {vocab}] (the vocabulary)")
    if draws < 0:
        raise ValueError(f"draws={draws} must be >= 0")
    wide = _wide(logits.device)
    logprobs = torch.log_softmax(logits.to(wide) / temperature, dim=-1)  # (N, V)
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # (N, k), most likely first
    rest = logprobs.scatter(-1, top_ids, float("-inf"))  # (N, V): everything outside the top k
    out = {
        "topk_ids": top_ids,
        "topk_logprobs": top_lp.float(),
        "tail_mass": torch.logsumexp(rest, dim=-1).exp().float(),  # (N,)
    }
    if targets is not None:
        out["target_logprobs"] = logprobs.gather(-1, targets.view(n, 1).long()).view(n).float()
    if draws:
        out.update(_systematic_draws(logprobs, draws, generator))
    return out


def _systematic_draws(logprobs: torch.Tensor, draws: int, generator: torch.Generator | None) -> dict:
    """``draw_ids``/``draw_counts`` (N, draws) from the full distribution ``logprobs`` (N, V)."""
    n, vocab = logprobs.shape
    cdf = logprobs.exp().cumsum(dim=-1)  # (N, V)
    cdf = cdf / cdf[:, -1:]  # the last point is 1 exactly, so every draw lands on an id
    offsets = torch.rand(n, 1, generator=generator, device=logprobs.device, dtype=logprobs.dtype)
    points = (offsets + torch.arange(draws, device=logprobs.device, dtype=logprobs.dtype)) / draws  # (N, D)
    ids = torch.searchsorted(cdf, points, right=True).clamp_(max=vocab - 1)  # (N, D), non-decreasing
    # run-length encode each row: ids are sorted, so equal ids are adjacent
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = starts.long().cumsum(dim=-1) - 1  # (N, D): which distinct id each draw belongs to
    counts = torch.zeros(n, draws, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(-1, slot, torch.ones_like(slot, dtype=torch.int32))
    distinct = torch.zeros_like(ids).scatter_(-1, slot, ids)
    order = counts.argsort(dim=-1, descending=True, stable=True)  # most drawn first, ties by id
    counts, distinct = counts.gather(-1, order), distinct.gather(-1, order)
    distinct = torch.where(counts > 0, distinct, distinct[:, :1])  # unused slots repeat the first id
    return {"draw_ids": distinct, "draw_counts": counts}
