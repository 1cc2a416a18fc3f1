"""Crash safety under real SIGKILLs, a real S3-compatible server on loopback, and interop."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.cache import LabelStore
from storage.export import export_axolotl
from storage.reader import ShardError, ShardStream, open_shard
from tests.storage.test_shards import make_meta, make_rows

REPO = Path(__file__).resolve().parents[2]
N_SHARDS, ROWS = 12, 120


def _check_store(root: Path) -> int:
    """Every shard file either is rejected or is whole; returns how many are committed."""
    committed = 0
    for path in root.rglob("*.parquet"):
        if path.name.startswith("."):
            continue  # a temporary: never a shard name readers look up
        try:
            shard = open_shard(path)
        except ShardError as e:
            assert "no commit record" in str(e), str(e)
            continue
        assert shard.rows == ROWS
        assert sum(1 for _ in ShardStream([shard], shuffle=False).rows(epochs=1)) == ROWS
        committed += 1
    return committed


def test_sigkill_never_leaves_an_accepted_partial_shard(tmp_path):
    root = tmp_path / "store"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.storage.writer_worker", str(root), str(N_SHARDS), str(ROWS)]
    # how long the whole set takes on this machine now (under load it is several times the
    # ~2 s of an idle machine): kills land uniformly inside that window
    t0 = time.monotonic()
    timing = subprocess.run(
        [*cmd[:-3], str(tmp_path / "timing"), *cmd[-2:]], cwd=REPO, env=env, capture_output=True, timeout=300
    )
    assert timing.returncode == 0, timing.stderr[-2000:]
    window = time.monotonic() - t0
    kills = attempts = mid_write = 0
    progress = []
    while kills < 20:
        attempts += 1
        assert attempts < 200, "the writer kept finishing before it could be killed"
        if progress and progress[-1] == N_SHARDS:
            # everything committed: start over so later kills also land mid-write
            for p in root.rglob("*"):
                if p.is_file():
                    p.unlink()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "start", "writer worker failed to start"
        time.sleep(rng.uniform(0.0, 0.8 * window))  # somewhere inside the writes
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        progress.append(_check_store(root))
        mid_write += any(p.name.startswith(".") for p in root.rglob("*"))
    assert kills >= 20
    assert any(0 < c < N_SHARDS for c in progress), f"kills never landed mid-set: {progress}"
    assert mid_write > 0, "no kill landed while a shard was being written"
    # a rerun completes the set, exactly
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _check_store(root) == N_SHARDS
    store = LabelStore(root)
    assert sum(store.open(f"key-{i:03d}").rows for i in range(N_SHARDS)) == N_SHARDS * ROWS
    leftovers = [p.name for p in root.rglob(".*")]
    assert not leftovers, f"stale temporaries not cleaned: {leftovers}"


def test_s3_store_round_trip_and_validation(s3_server):
    store = LabelStore(s3_server.replace("s3://labels/run", "s3://labels/run-a"))
    assert not store.is_local
    rows = make_rows(50, 49152, 8, seed=3)
    with store.writer("abc123", make_meta(k=8, cache_key="abc123")) as w:
        w.write_many(rows)
    assert store.is_committed("abc123")
    shard = store.open("abc123", expect={"kind": "topk", "kind_params": {"k": 8}})
    got = [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]
    assert len(got) == 50
    for a, b in zip(rows, got):
        np.testing.assert_array_equal(np.asarray(a["teacher_ids"], np.int64), b["teacher_ids"].astype(np.int64))
        np.testing.assert_allclose(b["target_logprobs"], a["target_logprobs"], atol=1e-3)
    # an uploaded shard without its commit record is invisible
    w = store.writer("partial", make_meta(k=8, cache_key="partial"))
    w.write_many(rows[:5])
    w.abort()
    assert not store.is_committed("partial") and store.lookup("partial") is None
    # a replaced (truncated) object is rejected by size, naming it
    fs = store.fs
    path = str(store.path_for("abc123"))
    data = fs.open_input_stream(path).read()
    with fs.open_output_stream(path) as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ShardError, match="abc123.parquet.*truncated"):
        store.open("abc123")
    # another run's expectations
    with store.writer("other", make_meta(k=8, cache_key="other", teacher_hash="zzz")) as w:
        w.write_many(rows[:3])
    with pytest.raises(ShardError, match="teacher_hash"):
        store.open("other", expect={"teacher_hash": "w1"})


def test_interop_pyarrow_datasets_and_axolotl_export(tmp_path):
    path = tmp_path / "s.parquet"
    rows = make_rows(20, 49152, 4, seed=5, length=(5, 30))
    with open_writer(path) as w:
        w.write_many(rows)
    assert pq.read_table(path).num_rows == 20
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 20 and ds[0]["doc_id"] == rows[0]["doc_id"]
    out = tmp_path / "axolotl.parquet"
    assert export_axolotl([open_shard(path)], out) == 20
    table = pq.read_table(out)
    assert {"input_ids", "labels", "target_token_ids", "target_logprobs", "target_mask"} <= set(table.column_names)
    first = table.slice(0, 1).to_pylist()[0]
    r = rows[0]
    L, s = len(r["input_ids"]), r["label_start"]
    assert len(first["target_token_ids"]) == L and sum(map(sum, first["target_mask"])) == (L - 1 - s) * 4
    assert first["target_token_ids"][s] == [int(x) for x in r["teacher_ids"][:4]]
    assert first["labels"][: s + 1] == [-100] * (s + 1) and first["labels"][s + 1 :] == [
        int(x) for x in r["input_ids"][s + 1 :]
    ]


def open_writer(path):
    from storage.writer import ShardWriter

    return ShardWriter(path, make_meta(k=4))
