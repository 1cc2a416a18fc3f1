"""Teacher benchmark: tokens/s of (a) our labelling pipeline end to end including Parquet
writes, (b) the bare vLLM call with the same settings writing nothing, (c) a plain
transformers forward + log_softmax + top-k loop, on the same windows of the default corpus
with the bundled teacher. One engine serves (a) and (b); its start is not timed.

Engine slots (``--two-slots``, on by default): labelled tokens/s of two engines of one core
each (``teacher.engine.slots: 2``), each in its own process labelling half of the same windows
at the same time, against the one engine over both cores of (a). On a 2-core machine this
shows the mechanics, not a speed-up; on an N-GPU node each slot is a GPU.

``generate`` mode is measured the same way on the example prompts (``--generate-config``):
answer tokens/s of the labelling pipeline (sampling, per-token top-k, Parquet writes) against
the bare vLLM call with the same sampling parameters and seeds, writing nothing.

    .venv/bin/python benchmarks/teacher.py [--config configs/demo.yaml] [--windows 192]
        [--generate-config configs/generate.yaml] [--prompts 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--windows", type=int, default=192)
    parser.add_argument("--generate-config", default="configs/generate.yaml", help="'' to skip the generate-mode measurement")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--two-slots", type=int, default=1, help="0 to skip the engine-slot measurement")
    parser.add_argument("--slot-worker", nargs=4, metavar=("CONFIG", "WINDOWS", "SLOTS_DIR", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slot_worker:
        return slot_worker(*args.slot_worker)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from distill import pipeline
    from distill.config import load_config
    from benchmarks.common import bench_meta, corpus_windows
    from distill.teacher.labels import label_shard
    from distill.teacher.reference import reference_labels
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.cache import LabelStore

    cfg = load_config(args.config)
    windows, ids, starts = corpus_windows(cfg, args.windows)
    tokens = sum(len(w) - 1 - s for w, s in zip(ids, starts))
    k = cfg.teacher.k
    engine = VllmTeacher(pipeline.teacher_dir(cfg), k, cfg.corpus.window, cfg.teacher.engine)
    list(engine.score(ids[:8], starts[:8]))  # warm-up

    t0 = time.perf_counter()
    prompts = [{"prompt_token_ids": [int(t) for t in w]} for w in ids]
    for b in range(0, len(prompts), cfg.teacher.engine.batch_windows):
        engine.llm.generate(prompts[b : b + cfg.teacher.engine.batch_windows], engine.params, use_tqdm=False)
    bare = tokens / (time.perf_counter() - t0)

    store = LabelStore(tempfile.mkdtemp(prefix="bench-teacher-"))
    meta = bench_meta(cfg, k, engine.engine_version)
    t0 = time.perf_counter()
    result = label_shard(lambda: engine, store, "bench", meta, windows, progress=False)
    ours = tokens / (time.perf_counter() - t0)
    assert not result["cache_hit"] and result["tokens"] == tokens
    engine.close()

    model = AutoModelForCausalLM.from_pretrained(pipeline.teacher_dir(cfg), dtype=torch.float32, use_safetensors=True).eval()
    reference_labels(model, np.asarray(ids[0]), starts[0], k)  # warm-up
    t0 = time.perf_counter()
    for w, s in zip(ids, starts):
        reference_labels(model, np.asarray(w), s, k)
    hf = tokens / (time.perf_counter() - t0)

    gen = bench_generate(load_config(args.generate_config), args.prompts) if args.generate_config else None
    two_slots = bench_two_slots(args.config, windows, tokens) if args.two_slots else None

    print(f"windows={len(ids)} labelled_tokens={tokens} k={k}")
    if gen:
        print(f"generate: prompts={gen['prompts']} answer_tokens={gen['tokens']} tokens_per_s: pipeline={gen['ours']:.0f} bare_vllm={gen['bare']:.0f}")
        print(f"generate_pipeline_vs_bare_vllm={gen['ours'] / gen['bare']:.3f}")
    print(f"tokens_per_s: pipeline={ours:.0f} bare_vllm={bare:.0f} transformers={hf:.0f}")
    print(f"pipeline_vs_bare_vllm={ours / bare:.3f}")
    if two_slots:
        print(f"two slots of one core each: {two_slots:.0f} labelled tokens/s against one engine on both cores: {ours:.0f}")
        print(f"two_slots_vs_one={two_slots / ours:.3f}")
    print(f"pipeline_vs_transformers={ours / hf:.3f}")


def bench_two_slots(config: str, windows, tokens: int) -> float:
    """Two slot workers, started and warmed up, then released at once on half the windows each;
    tokens/s over the wall time until both are done."""
    import json
    import os
    import subprocess

    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="bench-slots-"))
    half = (windows.num_rows + 1) // 2
    workers = []
    for i, part in enumerate((windows.slice(0, half), windows.slice(half))):
        pq.write_table(part, work / f"half{i}.parquet")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--slot-worker", config, str(work / f"half{i}.parquet"),
               str(work / "slots"), str(work / f"store{i}")]
        workers.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}))
    try:
        for w in workers:
            assert _line(w, lambda l: l == "ready"), "a slot worker failed to start its engine"
        t0 = time.perf_counter()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        results = [json.loads(_line(w, lambda l: l.startswith("{"))) for w in workers]
        seconds = time.perf_counter() - t0
    finally:
        for w in workers:  # let each close its engine and exit, reading what it still logs
            try:
                w.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    assert sum(r["tokens"] for r in results) == tokens and {r["slot"] for r in results} == {0, 1}
    return tokens / seconds


def _line(proc, wanted) -> str:
    """The first line of ``proc``'s stdout that is ``wanted`` (vLLM logs to stdout too); '' at EOF."""
    for line in proc.stdout:
        if wanted(line.strip()):
            return line.strip()
    return ""


def slot_worker(config: str, windows_file: str, slots_dir: str, store_dir: str) -> None:
    import dataclasses
    import json

    import pyarrow.parquet as pq

    from benchmarks.common import bench_meta
    from distill import pipeline
    from distill.config import load_config
    from distill.teacher.labels import label_shard
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.cache import LabelStore

    cfg = load_config(config)
    windows = pq.read_table(windows_file)
    engine_cfg = dataclasses.replace(cfg.teacher.engine, slots=2)
    engine = VllmTeacher(pipeline.teacher_dir(cfg), cfg.teacher.k, cfg.corpus.window, engine_cfg, slot_folder=slots_dir)
    ids, starts = windows.column("input_ids").to_pylist(), windows.column("label_start").to_pylist()
    list(engine.score(ids[:4], starts[:4]))  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    result = label_shard(lambda: engine, LabelStore(store_dir), "bench", bench_meta(cfg, cfg.teacher.k, engine.engine_version),
                         windows, progress=False)
    print(json.dumps({"tokens": result["tokens"], "slot": engine.slot.index}), flush=True)
    engine.close()


def bench_generate(cfg, count: int) -> dict:
    import vllm

    from benchmarks.common import bench_meta, corpus_windows
    from distill import pipeline
    from distill.teacher.labels import label_shard, prompt_seed
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.cache import LabelStore

    windows, ids, _ = corpus_windows(cfg, count)
    doc_ids = windows.column("doc_id").to_pylist()
    s, k = cfg.teacher.sampling, cfg.teacher.k
    engine = VllmTeacher(pipeline.teacher_dir(cfg), k, cfg.corpus.window, cfg.teacher.engine)
    list(engine.generate(ids[:4], [0] * 4, s))  # warm-up
    params = [vllm.SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=min(s.max_tokens, cfg.corpus.window - len(p)),
                                  logprobs=k, flat_logprobs=True, seed=prompt_seed(s.seed, d)) for p, d in zip(ids, doc_ids)]
    step = cfg.teacher.engine.batch_windows
    t0 = time.perf_counter()
    bare_tokens = 0
    for b in range(0, len(ids), step):
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in ids[b : b + step]], params[b : b + step], use_tqdm=False)
        bare_tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
    bare = time.perf_counter() - t0
    store = LabelStore(tempfile.mkdtemp(prefix="bench-generate-"))
    t0 = time.perf_counter()
    result = label_shard(lambda: engine, store, "bench", bench_meta(cfg, k, engine.engine_version), windows, cfg.teacher, progress=False)
    ours = time.perf_counter() - t0
    engine.close()
    # seeded per prompt: the pipeline labels exactly the answers the bare call produced
    assert result["tokens"] == bare_tokens, (result["tokens"], bare_tokens)
    return {"prompts": len(ids), "tokens": bare_tokens, "ours": bare_tokens / ours, "bare": bare_tokens / bare}


if __name__ == "__main__":
    main()
