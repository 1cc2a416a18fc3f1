"""Soft labels computed from full-vocabulary logits, on whatever device holds them (issue 26).

One pure function, ``label_logits``: logits of N positions in, packed label tensors out, with no
Python object per entry. It is the math the device labeller runs inside the engine, on the
engine's device (``distill.teacher.vllm_labeller``, ``teacher.engine.labeller: device``).

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

The log-softmax runs in float32 (a log-sum-exp with its maximum taken out loses nothing that
matters at the codec's precision); the cumulative distribution of the draws runs in float64 where
the device supports it: a float32 cumulative sum over 128k ids drifts by about 1e-3, more than
one draw in 80.
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
    offsets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Packed labels of ``logits`` (N, V); see the module docstring for the returned tensors.

    ``targets`` (N,) int64: realized next tokens. ``offsets`` (N,): the systematic draws' uniform
    offsets in [0, 1), one per position (the engine derives them from a per-request seed, so a
    window's draws do not depend on its batch); without them they come from ``generator``."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, {vocab}] (the vocabulary)")
    if draws < 0:
        raise ValueError(f"draws={draws} must be >= 0")
    if offsets is not None and offsets.shape != (n,):
        raise ValueError(f"offsets must be (N,) = ({n},), got shape {tuple(offsets.shape)}")
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    top, top_ids = scores.topk(k, dim=-1)  # (N, k), most likely first
    weights = (scores - top[:, :1]).exp_()  # (N, V): probabilities times the normalizer
    if draws:  # the draws need block sums anyway: the total is their sum
        blocks = _blocks(weights)
        block_sums = blocks.sum(dim=-1)  # (N, blocks)
        total = block_sums.sum(dim=-1, keepdim=True)
    else:
        total = weights.sum(dim=-1, keepdim=True)  # (N, 1)
    lse = top[:, :1] + total.log()
    out = {"topk_ids": top_ids, "topk_logprobs": top - lse}
    if targets is not None:
        out["target_logprobs"] = (scores.gather(-1, targets.view(n, 1).long()) - lse).view(n)
    if draws:
        if offsets is None:
            offsets = torch.rand(n, generator=generator, device=logits.device)
        out.update(_systematic_draws(blocks, block_sums, vocab, draws, offsets))
    # the tail summed over the ids outside the top k: no cancellation, unlike 1 - sum(p)
    out["tail_mass"] = (weights.scatter_(-1, top_ids, 0.0).sum(dim=-1, keepdim=True) / total).view(n)
    return out


BLOCK = 64  # ids per block of the draws' two-level search


def _blocks(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (N, V) as (N, blocks, BLOCK), zero-padded at the end when V is not a multiple."""
    n, vocab = weights.shape
    pad = (-vocab) % BLOCK
    return (torch.nn.functional.pad(weights, (0, pad)) if pad else weights).view(n, -1, BLOCK)


def _systematic_draws(
    blocks: torch.Tensor, block_sums: torch.Tensor, vocab: int, draws: int, offsets: torch.Tensor
) -> dict:
    """``draw_ids``/``draw_counts`` (N, draws) from ``blocks`` (N, blocks, BLOCK), the probabilities
    times any positive per-row factor, and their sums per block.

    No cumulative sum over the whole vocabulary: the points are first located among the blocks (a
    cumulative sum of block sums, in float64 where the device has it), then inside their block (a
    float32 cumulative sum of ``BLOCK`` entries). The distribution function is thus exact to
    float32's resolution everywhere, and the work per position is ``V + draws * BLOCK``."""
    n, count, _ = blocks.shape
    wide = _wide(blocks.device)
    block_cdf = block_sums.to(wide).cumsum(dim=-1)  # (N, blocks)
    steps = torch.arange(draws, device=blocks.device, dtype=wide)
    points = (offsets.to(wide).view(n, 1) + steps) / draws * block_cdf[:, -1:]  # (N, D), increasing
    blk = torch.searchsorted(block_cdf, points, right=True).clamp_(max=count - 1)  # (N, D)
    before = torch.where(blk > 0, block_cdf.gather(-1, (blk - 1).clamp(min=0)), 0.0)
    rows = (torch.arange(n, device=blocks.device).view(n, 1) * count + blk).view(-1)
    inner = blocks.reshape(n * count, BLOCK).index_select(0, rows).view(n, draws, BLOCK).cumsum(dim=-1)
    within = torch.searchsorted(inner, (points - before).to(inner.dtype).unsqueeze(-1), right=True)
    ids = (blk * BLOCK + within.squeeze(-1).clamp_(max=BLOCK - 1)).clamp_(max=vocab - 1)  # (N, D), non-decreasing
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
