"""Teacher labelling of corpus shards into the content-addressed label store.

A shard's content key covers everything its labels depend on; a committed key is reused with
no teacher work at all (not even an engine start: engines are created lazily).
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from distill.configbase import check
from distill.teacher.checkpoint import BUNDLED
from distill.teacher.vllm_engine import EngineConfig
from storage.cache import LabelStore, content_key
from storage.schema import SCHEMA_VERSION, ShardMeta

LABEL_CODE_VERSION = "score-1"
MODES = ("score",)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    model: str = BUNDLED
    """Local checkpoint folder, hub id, or ``bundled:smollm2-135m-instruct``."""
    k: int = 32
    """Top-k entries stored per labelled position."""
    mode: str = "score"
    """Labelling mode: ``score`` (teacher-forced over the corpus)."""
    engine: EngineConfig = EngineConfig()
    """vLLM engine settings."""
    min_topk_mass: float = 0.5
    """Asset check (warning): mean teacher probability inside the stored top-k must reach this; raise k if it does not."""

    def __post_init__(self):
        check(1 <= self.k <= 1024, "k", self.k, "an integer in [1, 1024]")
        check(self.mode in MODES, "mode", self.mode, f"one of {MODES}")
        check(0.0 <= self.min_topk_mass <= 1.0, "min_topk_mass", self.min_topk_mass, "a number in [0, 1]")


def shard_key(teacher_hashes: dict, fingerprint: str, cfg: TeacherConfig, dtype: str) -> str:
    """Content key of one labelled shard: teacher, tokenizer, data, settings, code version."""
    return content_key(
        {
            "weights": teacher_hashes["weights"],
            "tokenizer": teacher_hashes["tokenizer"],
            "data": fingerprint,
            "mode": cfg.mode,
            "k": cfg.k,
            "temperature": 1.0,
            "dtype": dtype,
            "code": LABEL_CODE_VERSION,
            "schema": SCHEMA_VERSION,
        }
    )


def label_shard(
    engine_factory: Callable[[], object],
    store: LabelStore,
    key: str,
    meta: ShardMeta,
    windows: pa.Table,
    progress: bool = True,
) -> dict:
    """Label ``windows`` into ``store`` under ``key`` unless already committed.

    Engine work and Parquet writing overlap: the rows of one macro-batch are written by a
    background thread while the engine runs the next.
    """
    existing = store.lookup(key)
    if existing is not None:
        return {"cache_hit": True, "rows": existing.rows, "tokens": existing.tokens, "teacher_seconds": 0.0, "path": str(existing.path)}
    engine = engine_factory()
    lengths = pc.list_value_length(windows.column("input_ids"))
    total = int(pc.sum(lengths).as_py() or 0) - int(pc.sum(windows.column("label_start")).as_py() or 0) - windows.num_rows
    bar = tqdm(total=total, desc=f"label {meta.shard}", unit="tok", unit_scale=True, disable=not progress)
    step = getattr(getattr(engine, "cfg", None), "batch_windows", 64)
    t0 = time.perf_counter()
    # one macro-batch of Python objects at a time: memory stays bounded whatever the shard size
    with store.writer(key, meta) as writer, ThreadPoolExecutor(1) as pool, bar:
        pending = None
        for offset in range(0, windows.num_rows, step):
            part = windows.slice(offset, step)
            input_ids = part.column("input_ids").to_pylist()
            label_starts = part.column("label_start").to_pylist()
            doc_ids = part.column("doc_id").to_pylist()
            window_idx = part.column("window_index").to_pylist()
            batch = []
            for i, labels in enumerate(engine.score(input_ids, label_starts)):
                batch.append(
                    {
                        "doc_id": doc_ids[i],
                        "window_index": window_idx[i],
                        "input_ids": np.asarray(input_ids[i], np.int64),
                        "label_start": label_starts[i],
                        "topk_ids": labels["topk_ids"].reshape(-1),
                        "topk_logprobs": labels["topk_logprobs"].reshape(-1),
                        "target_logprobs": labels["target_logprobs"],
                        "tail_mass": labels["tail_mass"],
                    }
                )
                bar.update(len(labels["target_logprobs"]))
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_many, batch)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - t0
    return {"cache_hit": False, "rows": writer.rows, "tokens": writer.tokens, "teacher_seconds": seconds, "path": str(store.path_for(key))}
