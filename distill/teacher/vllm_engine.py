"""The vLLM teacher engine: teacher-forced top-k soft labels through the engine's fast path.

Token-id prompts, ``prompt_logprobs=k`` with flat logprobs and no detokenization, prefix caching
off (it would skip the prompt positions whose logprobs we need), one engine per process reused
across shards. vLLM returns, for each prompt position ``p >= 1``, the realized token ``p`` first
(with its true rank) followed by ranks ``1..k``; the realized token is therefore *not* counted
twice here: the top-k are always entries ``1..k``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from distill.configbase import check


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"
    """Weights/activation dtype; ``auto`` uses float32 on CPU (bf16 is slow without AVX-512) and the checkpoint's dtype on GPU."""
    batch_windows: int = 64
    """Windows sent to the engine per call (a macro-batch)."""
    max_num_batched_tokens: int = 4096
    """Engine scheduler token budget per step (bounds the logits memory of prompt logprobs)."""
    enforce_eager: bool = True
    """Skip CUDA-graph / torch.compile warm-up (prefill-only work gains little from it)."""
    gpu_memory_utilization: float = 0.85
    """Fraction of GPU memory vLLM may use (GPU only)."""
    tensor_parallel_size: int = 1
    """GPUs to shard the teacher over."""
    cpu_kv_cache_gib: int = 2
    """KV cache size on the CPU engine, GiB."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own Python code (off unless you trust the checkpoint)."""
    seed: int = 0
    """Engine seed."""

    def __post_init__(self):
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", self.dtype, "auto, float32, bfloat16 or float16")
        check(self.batch_windows >= 1, "batch_windows", self.batch_windows, "an integer >= 1")
        check(self.max_num_batched_tokens >= 256, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 256")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_env(cfg: EngineConfig) -> None:
    """Use every core this process may run on, unless the user chose otherwise."""
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))


class VllmTeacher:
    """One vLLM engine over a local checkpoint, producing top-k labels for token windows."""

    def __init__(self, model_dir: str | os.PathLike, k: int, max_len: int, cfg: EngineConfig = EngineConfig()):
        import vllm

        self.cfg, self.k, self.max_len = cfg, k, max_len
        self.model_dir = Path(model_dir)
        dtype = cfg.dtype
        if _on_cpu():
            _cpu_env(cfg)
            if dtype == "auto":
                dtype = "float32"
        self.dtype = dtype
        self.engine_version = f"vllm-{vllm.__version__}"
        self.llm = vllm.LLM(
            model=str(self.model_dir),
            dtype=dtype,
            max_model_len=max_len + 1,  # the one generated token vLLM insists on
            max_logprobs=k,
            enable_prefix_caching=False,
            enforce_eager=cfg.enforce_eager,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, max_len),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            trust_remote_code=cfg.trust_remote_code,
            seed=cfg.seed,
        )
        self.params = vllm.SamplingParams(
            max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True, temperature=0.0
        )
        self.forward_calls = 0

    def score(self, windows: Sequence[Sequence[int]], label_starts: Sequence[int]) -> Iterator[dict]:
        """Per window, the labels of positions ``label_start .. len - 2`` (see ``flat_to_labels``)."""
        for b in range(0, len(windows), self.cfg.batch_windows):
            batch = windows[b : b + self.cfg.batch_windows]
            for ids in batch:
                if len(ids) > self.max_len:
                    raise ValueError(f"window of {len(ids)} tokens exceeds the engine's max_len {self.max_len}")
            prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in batch]
            outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
            self.forward_calls += 1
            for ids, start, out in zip(batch, label_starts[b : b + len(batch)], outputs):
                yield flat_to_labels(out.prompt_logprobs, np.asarray(ids), int(start), self.k)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None


def flat_to_labels(flat, input_ids: np.ndarray, label_start: int, k: int) -> dict:
    """Turn vLLM ``FlatLogprobs`` of one prompt into position-aligned label arrays.

    ``flat`` position ``p`` (``1 <= p < L``) is the distribution that predicted token ``p``,
    i.e. the label of window position ``t = p - 1``. Returns for positions ``label_start .. L-2``:
    ``topk_ids`` (n, k), ``topk_logprobs`` (n, k), ``target_logprobs`` (n,), ``tail_mass`` (n,).
    """
    L = len(input_ids)
    starts = np.asarray(flat.start_indices[1:])
    ends = np.asarray(flat.end_indices[1:])
    if len(starts) != L - 1 or not np.all(ends - starts == k + 1):
        raise RuntimeError(f"unexpected prompt logprobs layout: {len(starts)} positions for {L} tokens, widths {set((ends - starts).tolist())}")
    lo = starts[0]
    token_ids = np.asarray(flat.token_ids[lo:], dtype=np.int64).reshape(L - 1, k + 1)
    logprobs = np.asarray(flat.logprobs[lo:], dtype=np.float32).reshape(L - 1, k + 1)
    if not np.array_equal(token_ids[:, 0], input_ids[1:]):
        raise RuntimeError("prompt logprobs are not aligned with the prompt tokens")
    sl = slice(label_start, L - 1)
    topk_lp = logprobs[sl, 1:]
    tail = 1.0 - np.exp(topk_lp.astype(np.float64)).sum(axis=1)
    return {
        "topk_ids": token_ids[sl, 1:],
        "topk_logprobs": topk_lp,
        "target_logprobs": logprobs[sl, 0],
        "tail_mass": np.clip(tail, 0.0, 1.0).astype(np.float32),
    }
