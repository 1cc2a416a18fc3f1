"""Trainer: exact resume after a real SIGKILL, a 2-process torchrun run covering every row once,
and student vocabulary checks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.configbase import ConfigError
from distill.train.config import StudentConfig, TrainConfig
from distill.train.student import check_vocab
from distill.train.trainer import latest_checkpoint, train
from storage.reader import open_shard
from storage.schema import ShardMeta
from storage.writer import ShardWriter
from tests.distill.train_worker import TINY_STUDENT, write_shards
from tests.processes import run_group, start_group, stop_group

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder)
    return folder


def _worker(shard_dir, out, teacher_dir, steps, every, *extra):
    return [
        sys.executable,
        "-m",
        "tests.distill.train_worker",
        str(shard_dir),
        str(out),
        str(teacher_dir),
        str(steps),
        str(every),
        *extra,
    ]


def test_resume_after_sigkill_is_exact(shard_dir, teacher_dir, tmp_path):
    steps = 10
    full = run_group(_worker(shard_dir, tmp_path / "a", teacher_dir, steps, 2), timeout=600, cwd=REPO, env=ENV)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = start_group(
        _worker(shard_dir, tmp_path / "b", teacher_dir, steps, 2),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ckpts = tmp_path / "b" / "checkpoints"
        deadline = time.time() + 300
        while not (ckpts / "step-00000004").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop_group(proc, grace=5)
    assert not (tmp_path / "b" / "model").exists(), "killed before the end: no final model"
    resumed = run_group(_worker(shard_dir, tmp_path / "b", teacher_dir, steps, 2), timeout=600, cwd=REPO, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_two_process_torchrun_covers_every_row_once(shard_dir, teacher_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    log = tmp_path / "rows"
    # 64 rows in 16 row groups of 4: 8 row groups per rank, batch 4 -> 8 steps is one epoch
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.distill.train_worker",
        str(shard_dir),
        str(tmp_path / "out"),
        str(teacher_dir),
        "8",
        "0",
        str(log),
    ]
    out = run_group(cmd, timeout=600, cwd=REPO, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [Path(f"{log}.rank{r}").read_text().splitlines() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 32
    assert not set(ranks[0]) & set(ranks[1]), "ranks overlap"
    expected = {f"s{s}-doc-{i // 3}\t{i % 3}" for s in range(2) for i in range(32)}
    assert set(ranks[0]) | set(ranks[1]) == expected
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    # one epoch: the throughput count is every rank's labelled tokens, not rank 0's times two
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["labelled_tokens_this_run"] == sum(open_shard(p).tokens for p in shard_dir.glob("*.parquet"))
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 8 and all(math.isfinite(h["grad_norm"]) and h["peak_memory_mib"] > 0 for h in history)


def test_vocab_checks():
    check_vocab(49280, 49152, 49152, "padded student")  # embeddings padded beyond the tokenizer: fine
    with pytest.raises(ConfigError, match="smaller than the teacher"):
        check_vocab(32000, 49152, 49152, "student checkpoint /x")


def test_candidates_training_needs_gold_answers_for_ce_and_counts_examples(tmp_path, teacher_dir):
    """(The rule that candidates data trains with forward KL is the run config's, checked at load.)"""
    meta = ShardMeta(
        teacher="t",
        teacher_hash="w",
        tokenizer_hash="tok",
        vocab_size=49152,
        kind="candidates",
        kind_params={},
        temperature=1.0,
        mode="candidates",
        engine="test",
        data_fingerprint="fp",
        shard="train-00000",
        split="train",
        cache_key="c",
        code_version="test",
        settings={"length_normalize": False},
    )
    lp = np.log(np.array([0.7, 0.3], np.float32))
    with ShardWriter(tmp_path / "c.parquet", meta) as w:
        for i in range(4):
            w.write(
                {
                    "doc_id": f"c{i}",
                    "prompt_text": "p",
                    "prompt_ids": [1, 2, 3],
                    "candidates": ["yes", "no"],
                    "candidate_ids": [[10], [11, 12]],
                    "answer": -1,
                    "candidate_scores": lp,
                    "teacher_logprobs": lp,
                }
            )
    shard = open_shard(tmp_path / "c.parquet")
    student = StudentConfig(num_layers=1)
    with pytest.raises(ValueError, match="no example has a gold answer"):
        train(student, TrainConfig(steps=1, kd_weight=0.0, progress=False), teacher_dir, [shard], tmp_path / "b", 49152)
    # KD only needs no gold: two steps on the teacher's candidate distribution
    summary = train(
        student,
        TrainConfig(steps=2, batch_size=2, kd_weight=1.0, progress=False),
        teacher_dir,
        [shard],
        tmp_path / "s",
        49152,
    )
    assert summary["finished"] and summary["final_ce"] == 0.0 and summary["final_kd"] > 0
    # what a step processed is examples, under that name: 2 steps of 2 examples
    history = [json.loads(line) for line in (tmp_path / "s" / "history.jsonl").read_text().splitlines()]
    assert [h["examples"] for h in history] == [2, 2] and not any("tokens" in h for h in history)
    assert summary["labelled_examples_this_run"] == 4 and "labelled_tokens_this_run" not in summary


def test_diverging_run_stops_naming_the_step_and_saves_nothing(shard_dir, teacher_dir, tmp_path):
    shards = [open_shard(p) for p in sorted(shard_dir.glob("*.parquet"))]
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e30, warmup_steps=1, checkpoint_every=1, progress=False)
    with pytest.raises(
        FloatingPointError,
        match=r"training diverged at step 2: loss .*nothing of this step was saved\. Lower train\.lr \(now 1e\+30\)",
    ):
        train(TINY_STUDENT, cfg, teacher_dir, shards, tmp_path / "out", 49152)
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "summary.json").exists()
    last = latest_checkpoint(tmp_path / "out" / "checkpoints")
    assert last is not None and last.name == "step-00000001", "only steps with a finite loss are checkpointed"
