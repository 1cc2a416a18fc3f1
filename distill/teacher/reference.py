"""Plain transformers reference for teacher labels: forward, log_softmax over the full
vocabulary, top-k. The yardstick the vLLM engine is tested and benchmarked against."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def reference_labels(model, input_ids: np.ndarray, label_start: int, k: int) -> dict:
    """Same arrays as ``vllm_engine.flat_to_labels`` for one window, from a HF causal LM."""
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None]
    logits = model(input_ids=ids).logits[0, :-1].float()  # (L-1, V): position t predicts t+1
    logprobs = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # sorted, descending
    target = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    sl = slice(label_start, None)
    tail = (1.0 - top_lp.double().exp().sum(-1)).clamp(0, 1)
    return {
        "topk_ids": top_ids[sl].numpy(),
        "topk_logprobs": top_lp[sl].numpy(),
        "target_logprobs": target[sl].numpy(),
        "tail_mass": tail[sl].float().numpy(),
    }
