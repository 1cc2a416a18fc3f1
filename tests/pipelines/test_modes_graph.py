"""The whole asset graph in ``generate`` and ``candidates`` mode on the shipped example data:
teacher labels, distilled and CE-only students trained on them, and the mode's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import yaml

from distill.config import load_config, merge
from distill.run import labelling
from pipelines.definitions import build_definitions
from pipelines.run import materialize_all
from tests.conftest import REPO

MODES = {
    "generate": {
        "teacher": {"mode": "generate", "sampling": {"n": 2, "temperature": 0.8, "max_tokens": 16}},
        "corpus": {"source": str(REPO / "examples" / "prompts.jsonl"), "id_column": "id"},
        "eval": {"agreement_prompts": 3, "agreement_max_tokens": 8},
    },
    "candidates": {
        "teacher": {"mode": "candidates"},
        "corpus": {"source": str(REPO / "examples" / "candidates.jsonl"), "id_column": "id"},
    },
}


@pytest.fixture(params=sorted(MODES))
def mode_run(request, tiny_config_path, engine, tmp_path):
    data = merge(yaml.safe_load(tiny_config_path.read_text()), MODES[request.param])
    data["corpus"]["max_documents"] = 16
    data["eval"].pop("mc_file")
    path = tmp_path / f"{request.param}.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(build_definitions(str(path), keep_engine_alive=True), instance, cfg.corpus.shard_names())
    return request.param, cfg, instance, result


def _meta(instance, key):
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was not materialized"
    return event.asset_materialization.metadata


def test_mode_runs_through_the_graph(mode_run):
    mode, cfg, instance, result = mode_run
    assert instance.get_materialized_partitions(dg.AssetKey("teacher_logits")) == set(cfg.corpus.shard_names())
    for key in ("corpus", "student_model", "baseline_student", "evaluation"):
        _meta(instance, key)
    shards = labelling.open_split(cfg, "train")
    assert {s.meta.mode for s in shards} == {mode}
    meta = _meta(instance, "evaluation")
    report_path = Path(meta["report"].value)
    results = json.loads((report_path.parent / "results.json").read_text())["results"]
    # the teacher evaluated by transformers against its own stored labels
    agree = "choice_agreement" if mode == "candidates" else "top1"
    assert results["teacher"]["kl"] < 2e-3 and results["teacher"][agree] > 0.97
    for name in ("student", "baseline"):
        assert 0 <= results[name]["kl"] and 0 <= results[name][agree] <= 1
    text = report_path.read_text()
    if mode == "generate":
        assert results["teacher"]["greedy_exact_match"] == 1.0
        for name in ("student", "baseline"):
            assert 0 <= results[name]["greedy_exact_match"] <= results[name]["greedy_prefix_agreement"] <= 1
        assert "greedy = teacher's" in meta["table"].value and "teacher's answer tokens" in text
        # the students learned from answer tokens only, and the baseline from the same data
        prompts = {d for s in shards for d in s.parquet().read(columns=["doc_id"]).column("doc_id").to_pylist()}
        assert sum(s.rows for s in shards) == 2 * len(prompts), "n=2 answers per prompt"
    else:
        assert results["teacher"]["choice_agreement"] == 1.0
        for name in ("teacher", "student", "baseline"):
            assert 0 <= results[name]["accuracy"] <= 1 and results[name]["gold_examples"] == results[name]["examples"]
        assert meta["student_accuracy"].value == results["student"]["accuracy"]
        assert "gold accuracy" in meta["table"].value and "among the candidates" in text
