"""A student with its own tokenizer, end to end on the real teacher's labels: a BPE trained on
the training split, both cross-tokenizer losses, the CE-only baseline, and an evaluation that
compares every model in bits per byte."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import from_mapping
from distill.configbase import ConfigError
from distill.run import evaluating, labelling, paths, tokenizing, training


def _cross_config(tiny_config, loss):
    student = dataclasses.replace(
        tiny_config.student,
        init="random",
        tokenizer="bpe:400",
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    train = dataclasses.replace(tiny_config.train, cross_tokenizer_loss=loss, lr=3e-3)
    return dataclasses.replace(tiny_config, student=student, train=train)


def test_student_with_its_own_tokenizer_end_to_end(tiny_config, engine):
    labelling.prepare_corpus(tiny_config)
    labelling.label_shards(tiny_config, tiny_config.corpus.shard_names(), engine_factory=lambda: engine)
    cfg = _cross_config(tiny_config, "uld")
    folder = tokenizing.prepare_student_tokenizer(cfg)
    assert tokenizing.prepare_student_tokenizer(cfg) == folder, "trained once, then reused"
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 400

    summaries = {}
    for name, run, baseline in (
        ("uld", cfg, False),
        ("span_kl", _cross_config(tiny_config, "span_kl"), False),
        ("baseline", cfg, True),
    ):
        summaries[name] = training.train_student(run, baseline=baseline)
        assert summaries[name]["steps"] == run.train.steps and math.isfinite(summaries[name]["final_loss"])
        if not baseline:
            assert summaries[name]["final_kd"] > 0, f"{name}: the KD term saw aligned positions"
    model_dir = Path(summaries["uld"]["out_dir"]) / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == 400 and len(AutoTokenizer.from_pretrained(model_dir)) == 400, (
        "saved with its own tokenizer"
    )
    assert len({s["out_dir"] for s in summaries.values()}) == 3
    assert paths.student_dir(cfg, False) != paths.student_dir(tiny_config, False)

    report = evaluating.evaluate_run(cfg)
    results = report["results"]
    for name in ("teacher", "student", "baseline", "student_init"):
        assert 0 < results[name]["bpb"] < 20, f"{name}: bits per byte"
    # every model is scored on the same text: the teacher's and the students' bytes nearly agree
    # (the students' first labelled token may start a few bytes later)
    assert abs(results["student"]["bytes"] - results["teacher"]["bytes"]) / results["teacher"]["bytes"] < 0.05
    assert results["teacher"]["bpb"] < results["student"]["bpb"], "the 135M teacher beats a 3-step 2-layer student"
    assert results["student"]["aligned_positions"] > 0 and "mc_accuracy" in results["student"]
    assert "bits/byte" in report["table"] and "student_bpb=" in report["summary"]
    saved = json.loads((Path(report["out_dir"]) / "results.json").read_text())
    assert saved["results"]["student"]["bpb"] == pytest.approx(results["student"]["bpb"])


def test_cross_tokenizer_config_is_checked():
    with pytest.raises(ConfigError, match="init: teacher_layers"):
        from_mapping({"student": {"tokenizer": "bpe:1000"}})
    with pytest.raises(ConfigError, match="bpe:N with N >= 300"):
        from_mapping({"student": {"init": "random", "tokenizer": "bpe:12"}})
    with pytest.raises(ConfigError, match="cross_tokenizer_loss"):
        from_mapping({"train": {"cross_tokenizer_loss": "gold"}})
