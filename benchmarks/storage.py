"""Storage benchmark: bytes per token and decode faithfulness of our shard layout against the
naive layout (nested int32 ids + float32 logprobs, what axolotl-style datasets hold), on real
teacher labels (bundled SmolLM2 teacher, default corpus, k=32), plus read throughput compared
with the student trainer's consumption rate on this machine.

    .venv/bin/python benchmarks/storage.py [--config configs/demo.yaml] [--windows 256]
"""
from __future__ import annotations

import sys
from pathlib import Path

# this file's name would shadow the ``storage`` package: run from the repository root instead
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--windows", type=int, default=256, help="corpus windows to label (about 127 tokens each)")
    parser.add_argument("--train-steps", type=int, default=6)
    args = parser.parse_args()

    import torch

    from distill import pipeline
    from distill.config import load_config
    from benchmarks.common import bench_meta, corpus_windows
    from distill.teacher.vllm_engine import VllmTeacher
    from storage.reader import ShardStream, StreamPosition, open_shard
    from storage.writer import ShardWriter

    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, k=32))
    windows, ids_list, starts = corpus_windows(cfg, args.windows)
    engine = VllmTeacher(pipeline.teacher_dir(cfg), 32, cfg.corpus.window, cfg.teacher.engine)
    labels = list(engine.score(ids_list, starts))
    engine.close()
    rows = []
    for i, lab in enumerate(labels):
        rows.append({
            "doc_id": windows.column("doc_id")[i].as_py(), "window_index": windows.column("window_index")[i].as_py(),
            "input_ids": np.asarray(ids_list[i]), "label_start": starts[i],
            "topk_ids": lab["topk_ids"].reshape(-1), "topk_logprobs": lab["topk_logprobs"].reshape(-1),
            "target_logprobs": lab["target_logprobs"], "tail_mass": lab["tail_mass"],
        })
    tokens = sum(len(r["target_logprobs"]) for r in rows)
    out = Path(tempfile.mkdtemp(prefix="bench-storage-"))

    # naive: nested lists of int32 ids and float32 logprobs, pyarrow defaults
    naive = pa.table({
        "input_ids": [r["input_ids"].astype(np.int32).tolist() for r in rows],
        "target_token_ids": [r["topk_ids"].reshape(-1, 32).astype(np.int32).tolist() for r in rows],
        "target_logprobs": [r["topk_logprobs"].reshape(-1, 32).tolist() for r in rows],
    }, schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("target_token_ids", pa.list_(pa.list_(pa.int32()))),
                         ("target_logprobs", pa.list_(pa.list_(pa.float32())))]))
    pq.write_table(naive, out / "naive.parquet")
    naive_bpt = (out / "naive.parquet").stat().st_size / tokens

    meta = bench_meta(cfg, 32, engine.engine_version)
    t0 = time.perf_counter()
    with ShardWriter(out / "ours.parquet", meta) as w:
        w.write_many(rows)
    write_s = time.perf_counter() - t0
    ours_bpt = (out / "ours.parquet").stat().st_size / tokens

    shard = open_shard(out / "ours.parquet")
    decoded = [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]
    kl, target_err, tail_err, tail_rel_err, order_ok = [], 0.0, 0.0, 0.0, True
    for a, b in zip(rows, decoded):
        n = len(a["target_logprobs"])
        if not n:
            continue
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        p = np.exp(a["topk_logprobs"].reshape(n, 32).astype(np.float64))
        q = np.exp(b["topk_logprobs"].reshape(n, 32).astype(np.float64))
        order_ok &= bool(np.all(np.diff(q, axis=1) <= 1e-12))
        p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
        kl.append((p * np.log(p / q)).sum(1))
        target_err = max(target_err, float(np.abs(a["target_logprobs"] - b["target_logprobs"]).max()))
        tail, decoded_tail = a["tail_mass"].astype(np.float64), b["tail_mass"].astype(np.float64)
        tail_err = max(tail_err, float(np.abs(tail - decoded_tail).max()))
        # relative, of the tail and of the top-k mass 1 - tail (0 and 1 are stored exactly)
        rel = np.abs(tail - decoded_tail) / np.minimum(tail, 1 - tail).clip(min=1e-300)
        tail_rel_err = max(tail_rel_err, float(rel.max()))
    kl_error = float(np.concatenate(kl).mean())

    # read throughput: stream + decode + collate into training tensors, several passes
    from distill.trainer import batches, collate

    t0, read_tokens = time.perf_counter(), 0
    for _ in range(5):
        stream = ShardStream([shard], seed=0)
        rows_buf = []
        for row, _ in stream.rows(epochs=1):
            rows_buf.append(row)
            if len(rows_buf) == 8:
                read_tokens += int(collate(rows_buf, 32)["mask"].sum())
                rows_buf = []
    read_rate = read_tokens / (time.perf_counter() - t0)

    # trainer consumption rate: the configured student, a few steps, same batches
    from distill.losses import distillation_loss
    from distill.student import build_student

    model = build_student(pipeline.teacher_dir(cfg), cfg.student, 49152)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batches(ShardStream([shard], seed=0), cfg.train.batch_size, 32, StreamPosition())
    batch, _ = next(data)
    train_tokens, t0 = 0, None
    for step in range(args.train_steps + 1):
        if step == 1:
            t0, train_tokens = time.perf_counter(), 0  # first step is warm-up
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = distillation_loss(logits, batch["targets"], batch["topk_ids"], batch["teacher_logprobs"], batch["mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        train_tokens += int(batch["mask"].sum())
        batch, _ = next(data)
    train_rate = train_tokens / (time.perf_counter() - t0)

    print(f"positions={tokens} windows={len(rows)} write_seconds={write_s:.2f}")
    print(f"decode: order_preserved={order_ok} max_target_logprob_error={target_err:.2e} max_tail_mass_error={tail_err:.2e} "
          f"max_tail_mass_relative_error={tail_rel_err:.2e}")
    print(f"read_tokens_per_s={read_rate:.0f} train_tokens_per_s={train_rate:.0f}")
    print(f"naive_bytes_per_token={naive_bpt:.2f}")
    print(f"bytes_per_token={ours_bpt:.2f}")
    print(f"kl_error={kl_error:.2e}")
    print(f"read_vs_train_rate={read_rate / train_rate:.1f}")


if __name__ == "__main__":
    main()
