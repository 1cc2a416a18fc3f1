"""Training in two processes through the Dagster asset (``torchrun`` started by Dagster Pipes,
gloo on the CPU): for DDP and FSDP, one rank is SIGKILLed after a checkpoint, the asset's
materialization fails, and the next one resumes and ends bit-identical to an uninterrupted
run. The train split has 3 row groups, which do not divide by the 2 ranks."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
import shutil
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.config import load_config
from distill.run import labelling, paths
from pipelines.definitions import build_definitions
from pipelines.run import run_errors

STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def labelled(tiny_config_path, engine, tmp_path_factory) -> dict:
    """The tiny config on 10 short documents in 3 train shards (5, 10 and 9 windows: one row
    group each) and a small random student, its train shards labelled by the session's engine."""
    root = tmp_path_factory.mktemp("distributed")
    texts = list(pydoc_data.topics.topics.values())
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": texts[i * 7][:1200]}) + "\n" for i in range(10))
    )
    data = yaml.safe_load(tiny_config_path.read_text())
    data["storage_root"] = str(root / "data")
    data["corpus"] = {
        **data["corpus"],
        "source": str(root / "docs.jsonl"),
        "id_column": "id",
        "max_documents": None,
        "train_shards": 3,
    }
    data["student"] = {
        "init": "random",
        "num_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    data["train"] = {
        "steps": STEPS,
        "batch_size": 2,
        "lr": 1e-3,
        "checkpoint_every": EVERY,
        "keep_checkpoints": 10,
        "progress": False,
        "nproc_per_node": 2,
    }
    cfg = load_config(_write(tiny_config_path.parent / "distributed-base.yaml", data))
    labelling.prepare_corpus(cfg)
    train = [n for n in cfg.corpus.shard_names() if n.startswith("train")]
    labelling.label_shards(cfg, train, engine_factory=lambda: engine)
    shards = labelling.open_split(cfg, "train")
    groups = sum(s.parquet().metadata.num_row_groups for s in shards)
    assert groups % 2 == 1, f"the test needs an odd number of row groups, got {groups}"
    return data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _rank_pid(rank: int) -> int | None:
    """The pid of this process's descendant that is torchrun's rank ``rank``."""
    for child in psutil.Process().children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "LOCAL_RANK" in child.environ():
                return child.pid
        except psutil.Error:
            continue
    return None


def _kill_rank_after(checkpoint: Path, rank: int, killed: list, deadline_s: float = 600) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    pid = _rank_pid(rank) if checkpoint.exists() else None
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def _materialize(config: Path, instance) -> dg.ExecuteInProcessResult:
    defs = build_definitions(str(config))
    return dg.materialize(
        list(defs.assets),
        selection=["student_model"],
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rank_killed_after_checkpoint_resumes_to_the_uninterrupted_result(labelled, tiny_config_path, strategy):
    data = {**labelled, "train": {**labelled["train"], "strategy": strategy}}
    config = _write(tiny_config_path.parent / f"distributed-{strategy}.yaml", data)
    cfg = load_config(config)
    out = paths.student_dir(cfg, baseline=False)
    instance = dg.DagsterInstance.ephemeral()

    # uninterrupted, put aside as the reference
    first = _materialize(config, instance)
    assert first.success, run_errors(first)
    meta = first.asset_materializations_for_node("student_model")[0].metadata
    assert meta["processes"].value == 2 and meta["strategy"].value == strategy and meta["steps"].value == STEPS
    assert meta["reported_steps"].value >= 1, "rank 0 reported no step through Pipes"
    reference = out.parent / f"{out.name}-reference"
    shutil.move(out, reference)

    # rank 1 is SIGKILLed once the step-2 checkpoint is committed: the step fails, no model
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_rank_after, args=(out / "checkpoints" / f"step-{EVERY:08d}", 1, killed), daemon=True
    )
    killer.start()
    try:
        crashed = _materialize(config, instance)
    finally:
        killer.join(timeout=620)
    assert killed, "the run ended before a rank could be killed"
    assert not crashed.success, "a killed rank must fail the step"
    assert any(
        "training in 2 processes failed" in e and "resumes from checkpoint step-" in e for e in run_errors(crashed)
    ), run_errors(crashed)
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert _rank_pid(0) is None and _rank_pid(1) is None, "torchrun left a rank running"

    # the next materialization resumes from the last checkpoint and ends where the reference ended
    resumed = _materialize(config, instance)
    assert resumed.success, run_errors(resumed)
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{strategy}: {name} differs after resume"

    # every result in the history is bit-identical; peak memory is a measurement of the process
    def results(folder):
        return [
            {k: v for k, v in json.loads(line).items() if k != "peak_memory_mib"}
            for line in (folder / "history.jsonl").read_text().splitlines()
        ]

    assert results(reference) == results(out) and all("grad_norm" in h for h in results(out))

    # the saved student loads in transformers with its own architecture (FSDP2 renames the class)

    model = AutoModelForCausalLM.from_pretrained(out / "model", use_safetensors=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
