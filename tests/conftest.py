"""Shared fixtures: the bundled teacher (converted once into the repo's data folder), a tiny run
config, and one real vLLM engine for every test that needs it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_K = 8
TINY_WINDOW = 64


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    from distill.teacher.checkpoint import BUNDLED, resolve_teacher

    return resolve_teacher(BUNDLED, REPO / "data")


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory, teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("run")
    config = {
        "storage_root": str(root / "data"),
        "teacher": {"model": str(teacher_dir), "k": TINY_K},
        "corpus": {"max_documents": 10, "window": TINY_WINDOW, "train_shards": 2, "heldout_shards": 1, "heldout_fraction": 0.25},
        "train": {"steps": 3, "batch_size": 4, "progress": False},
        "eval": {"max_windows": 12, "mc_file": str(REPO / "examples" / "python_mc.jsonl")},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_config(tiny_config_path):
    from distill.config import load_config

    return load_config(tiny_config_path)


@pytest.fixture(scope="session")
def hf_teacher(teacher_dir):
    """The bundled teacher under plain transformers (the reference the engine is checked against)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True)


def mode_config(tiny_config, mode: str, **teacher):
    """The tiny config in ``generate`` or ``candidates`` mode on the shipped example data
    (same k, window and engine settings: the session's engine serves it)."""
    import dataclasses

    source = {"generate": "prompts.jsonl", "candidates": "candidates.jsonl"}[mode]
    corpus = dataclasses.replace(tiny_config.corpus, source=str(REPO / "examples" / source), id_column="id", max_documents=12)
    return dataclasses.replace(tiny_config, teacher=dataclasses.replace(tiny_config.teacher, mode=mode, **teacher), corpus=corpus)


@pytest.fixture(scope="session")
def engine(tiny_config):
    """The one vLLM engine of the test session (the graph test reuses it through the same key)."""
    from distill import pipeline

    eng = pipeline.get_engine(tiny_config)
    yield eng
    pipeline.close_engines()


@pytest.fixture(scope="session")
def materialized(tiny_config_path, tiny_config, engine):
    """The whole asset graph materialized once, in-process, on the tiny config."""
    import dagster as dg

    from pipelines.definitions import build_definitions
    from pipelines.run import materialize_all

    defs = build_definitions(str(tiny_config_path), keep_engine_alive=True)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(defs, instance, tiny_config.corpus.shard_names())
    return defs, instance, result
