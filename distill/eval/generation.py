"""Generation throughput of a checkpoint under vLLM, measured in a child process so that the
engine's thread binding never touches the caller (run as ``python -m distill.eval.generation``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.procs import guard_children
from distill.teacher.config import EngineConfig
from distill.teacher.vllm_engine import _cpu_env, on_cpu

PROMPTS = [
    "Explain what a Python generator is.",
    "Write a short note about list comprehensions.",
    "What does the with statement do?",
    "Describe how exceptions propagate in Python.",
]


def measure(model_dir: str, max_tokens: int, copies: int) -> dict:
    """Greedy tokens/s of ``model_dir`` in this process (the child ``generation_throughput`` starts)."""
    from vllm import LLM, SamplingParams  # lazy: vLLM is an optional heavy dependency

    guard_children()

    kwargs = {}
    if on_cpu():
        _cpu_env(EngineConfig(cpu_kv_cache_gib=1))
        kwargs["dtype"] = "float32"
    llm = LLM(model=model_dir, max_model_len=512, enforce_eager=True, seed=0, **kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS * copies
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "sample": outputs[0].outputs[0].text[:200],
    }


def generation_throughput(model_dir: str | Path, max_tokens: int = 64, copies: int = 4, timeout: int = 900) -> dict:
    """Greedy generation tokens/s of ``model_dir`` under vLLM (a fresh engine in a child process)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    out = subprocess.run(
        [sys.executable, "-m", "distill.eval.generation", str(model_dir), str(max_tokens), str(copies)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[2],  # the repository root, where -m finds the distill package
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{model_dir}: vLLM generation failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
