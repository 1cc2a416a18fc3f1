"""The whole asset graph materializes in-process on a tiny setting, with the real engine, and
every asset's output exists and reads back; a second labelling pass is all cache hits."""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def materialized(tiny_config_path, tiny_config, engine, tmp_path_factory):
    from pipelines.definitions import build_definitions
    from pipelines.run import materialize_all

    defs = build_definitions(str(tiny_config_path), keep_engine_alive=True)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(defs, instance, tiny_config.corpus.shard_names())
    return defs, instance, result


def _metadata(instance, key, partition=None):
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    if partition is not None:
        records = instance.fetch_materializations(dg.AssetKey(key), limit=100).records
        event = next(r.event_log_entry for r in records if r.partition_key == partition)
    assert event is not None, f"{key} was not materialized"
    return event.asset_materialization.metadata


def test_every_asset_materialized(materialized, tiny_config):
    defs, instance, result = materialized
    for key in ("teacher_model", "corpus", "student_model", "baseline_student", "evaluation"):
        assert _metadata(instance, key)
    keys = instance.get_materialized_partitions(dg.AssetKey("teacher_logits"))
    assert keys == set(tiny_config.corpus.shard_names())


def test_outputs_read_back(materialized, tiny_config, teacher_dir):
    from transformers import AutoModelForCausalLM

    from distill import pipeline
    from distill.data import corpus_dir

    defs, instance, result = materialized
    corpus = corpus_dir(tiny_config.root, tiny_config.corpus, pipeline.teacher_hashes(tiny_config)["tokenizer"])
    manifest = json.loads((corpus / "corpus.json").read_text())
    assert manifest["documents"] == 10 and _metadata(instance, "corpus")["documents"].value == 10
    # shards: train and held-out, verified against their commit records, with the configured k
    train, heldout = pipeline.open_split(tiny_config, "train"), pipeline.open_split(tiny_config, "heldout")
    assert sum(s.tokens for s in train + heldout) == sum(e["labelled_tokens"] for e in manifest["shards"].values())
    for shard in train + heldout:
        assert shard.meta.k == tiny_config.teacher.k and shard.meta.engine.startswith("vllm-")
    # students load in transformers from safetensors and compute
    for baseline in (False, True):
        model_dir = pipeline.student_dir(tiny_config, baseline) / "model"
        assert (model_dir / "model.safetensors").exists() and not list(model_dir.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        assert model.config.num_hidden_layers == tiny_config.student.num_layers
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # the evaluation table and its numbers
    meta = _metadata(instance, "evaluation")
    assert "| teacher |" in meta["table"].value and "| baseline |" in meta["table"].value
    assert meta["teacher_kl"].value < 0.01 and meta["teacher_top1"].value > 0.98
    for name in ("student", "baseline"):
        assert meta[f"{name}_ppl"].value > meta["teacher_ppl"].value
    assert meta["summary"].value.startswith("teacher_ppl=")
    checks = result.get_asset_check_evaluations()
    assert [c.check_name for c in checks] == ["distillation_gate"]


def test_second_labelling_is_all_cache_hits(materialized, tiny_config):
    from distill import pipeline

    calls_before = pipeline.get_engine(tiny_config).forward_calls
    results = pipeline.label_shards(tiny_config, tiny_config.corpus.shard_names())
    assert all(r["cache_hit"] for r in results.values())
    assert pipeline.get_engine(tiny_config).forward_calls == calls_before
