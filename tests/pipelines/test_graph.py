"""The whole asset graph materializes in-process on a tiny setting, with the real engine, and
every asset's output exists and reads back; a second labelling pass is all cache hits."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from pydoc_data.topics import topics

import dagster as dg
import torch
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.data import corpus_dir
from distill.eval.generation import generation_throughput
from distill.run import engines, labelling, paths


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
    defs, instance, result = materialized
    corpus = corpus_dir(tiny_config.root, tiny_config.corpus, paths.teacher_hashes(tiny_config)["tokenizer"])
    manifest = json.loads((corpus / "corpus.json").read_text())
    assert manifest["documents"] == 10 and _metadata(instance, "corpus")["documents"].value == 10
    # shards: train and held-out, verified against their commit records, with the configured k
    train, heldout = labelling.open_split(tiny_config, "train"), labelling.open_split(tiny_config, "heldout")
    assert sum(s.tokens for s in train + heldout) == sum(e["labelled_tokens"] for e in manifest["shards"].values())
    for shard in train + heldout:
        assert shard.meta.kind_params == {"k": tiny_config.teacher.k} and shard.meta.engine.startswith("vllm-")
    # students load in transformers from safetensors and compute
    for baseline in (False, True):
        model_dir = paths.student_dir(tiny_config, baseline) / "model"
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
    defs, instance, result = materialized
    first_teacher_seconds = _metadata(instance, "teacher_logits", partition="train-00000")["teacher_seconds"].value
    assert first_teacher_seconds > 0
    calls_before = engines.get_engine(tiny_config).forward_calls
    t0 = time.perf_counter()
    results = labelling.label_shards(tiny_config, tiny_config.corpus.shard_names())
    seconds = time.perf_counter() - t0
    assert all(r["cache_hit"] for r in results.values())
    assert engines.get_engine(tiny_config).forward_calls == calls_before, "no teacher forward on a cache hit"
    assert seconds <= 0.02 * first_teacher_seconds, (seconds, first_teacher_seconds)
    # and a second full materialization through Dagster reports every shard as a cache hit
    names = tiny_config.corpus.shard_names()
    again = dg.materialize(
        list(defs.assets),
        selection=["teacher_logits"],
        resources=defs.resources,
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: names[0], ASSET_PARTITION_RANGE_END_TAG: names[-1]},
    )
    meta = again.get_asset_materialization_events()[0].materialization.metadata
    assert meta["cache_hits"].value == len(names) and meta["teacher_seconds"].value == 0.0
    assert engines.get_engine(tiny_config).forward_calls == calls_before


def test_shard_checks_ran(materialized):
    defs, instance, result = materialized
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert "distillation_gate" in checks
    # the labelling run's checks were recorded on the instance
    for name in ("shard_integrity", "topk_mass_coverage"):
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("teacher_logits"), name)]
        )
        execution = record[dg.AssetCheckKey(dg.AssetKey("teacher_logits"), name)]
        assert execution is not None and execution.status.value == "SUCCEEDED", (name, execution)


def test_changing_one_document_relabels_only_its_shard(tiny_config, engine, tmp_path):
    docs = [{"text": topics[name]} for name in sorted(topics)[:8]]
    src = tmp_path / "docs.jsonl"

    def run(docs):
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        corpus = dataclasses.replace(tiny_config.corpus, source=str(src), max_documents=None)
        cfg = dataclasses.replace(tiny_config, corpus=corpus, storage_root=str(tmp_path / "data"))
        labelling.prepare_corpus(cfg)
        return labelling.label_shards(cfg, corpus.shard_names())

    first = run(docs)
    assert not any(r["cache_hit"] for r in first.values())
    docs[3]["text"] += " One more sentence changes this document."
    second = run(docs)
    relabelled = [n for n, r in second.items() if not r["cache_hit"]]
    assert len(relabelled) == 1
    assert second[relabelled[0]]["key"] != first[relabelled[0]]["key"]
    assert all(second[n]["key"] == first[n]["key"] for n in second if n not in relabelled)


def test_student_checkpoint_generates_in_vllm_and_transformers(materialized, tiny_config):
    model_dir = paths.student_dir(tiny_config, baseline=False) / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
    measured = generation_throughput(model_dir, max_tokens=16, copies=1)
    assert measured["tokens"] == 16 * 4 and measured["tokens_per_s"] > 0


def test_evaluation_report_files(materialized):
    defs, instance, result = materialized
    meta = _metadata(instance, "evaluation")
    report = Path(meta["report"].value)
    text = report.read_text()
    for name in ("training_curves", "kl_by_position", "calibration"):
        assert (report.parent / f"{name}.png").stat().st_size > 1000
        assert f"({name}.png)" in text
        assert meta[f"plot_{name}"].value.startswith("![")
    assert 0.0 <= meta["teacher_mc_accuracy"].value <= 1.0 and "MC accuracy" in meta["table"].value
