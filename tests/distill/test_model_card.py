"""Model cards: content from a real trained student's provenance, and the Hub's own parser."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard

from distill.run import paths
from distill.run.card import model_card, teacher_license

INFO = {
    "name": "student-abc",
    "baseline": False,
    "teacher": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "license": "apache-2.0",
    "labels": {
        "mode": "score",
        "kind": "topk",
        "kind_params": {"k": 32},
        "teacher_hash": "w" * 64,
        "tokenizer_hash": "t" * 64,
        "engine": "vllm-0.32.0",
        "settings": {},
    },
    "data": {"source": "pydoc_topics", "fingerprint": "f" * 32, "windows": 1234, "tokens": 150000},
    "student": {"init": "teacher_layers", "num_layers": 4, "tokenizer": None},
    "train": {
        "kd_weight": 0.5,
        "divergence": "forward_kl",
        "tail": "bucket",
        "temperature": 1.0,
        "cross_tokenizer_loss": "uld",
        "batch_size": 8,
        "grad_accum": 1,
        "lr": 1e-3,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.01,
        "seed": 0,
        "precision": "auto",
    },
    "summary": {"steps": 60, "parameters": 42_000_000, "final_loss": 2.5, "world_size": 1},
}


def test_card_content_and_hub_parser(tmp_path):
    table = "| model | ppl |\n|---|---:|\n| teacher | 26.44 |\n| student | 124.43 |\n| baseline | 134.71 |"
    results = {"student": {"ppl": 124.43, "kl": 1.9876}, "baseline": {"ppl": 134.71, "kl": 2.3421}}
    path = tmp_path / "README.md"
    path.write_text(model_card(INFO, results, table))
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-1.7B-Instruct" and "knowledge-distillation" in card.data.tags
    text = card.text
    for needle in (
        "w" * 64,
        "t" * 64,
        "f" * 32,
        "`score` mode, top-32 logprobs and the tail mass",
        "forward_kl",
        "tail `bucket`",
        "60 steps",
        "lr 0.001",
        "| student | 124.43 |",
        "perplexity 124.43 vs 134.71",
        "## Intended use and limits",
    ):
        assert needle in text, needle
    unevaluated = model_card({**INFO, "baseline": True})
    assert (
        "Not evaluated yet" in unevaluated
        and "CE-only baseline" in unevaluated
        and "baseline" in ModelCard(unevaluated).data.tags
    )
    params = {"draws": 64, "proposal_k": 2048, "sampler": "systematic", "seed": 0}
    sampled = model_card({**INFO, "labels": {**INFO["labels"], "kind": "sampled", "kind_params": params}})
    assert "sampled ids with counts (64 systematic draws per position from the top-2048 + tail)" in sampled


def test_teacher_license_comes_from_its_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: llama3.1\ntags: [x]\n---\n# A teacher\n")
    assert teacher_license(tmp_path, str(tmp_path)) == "llama3.1"
    (tmp_path / "README.md").unlink()
    assert teacher_license(tmp_path, str(tmp_path)) == "other"
    assert teacher_license(tmp_path, "bundled:smollm2-135m-instruct") == "apache-2.0"


def test_trained_and_evaluated_students_carry_their_cards(tiny_config, materialized):
    for baseline in (False, True):
        folder = paths.student_dir(tiny_config, baseline)
        card = ModelCard.load(folder / "model" / "README.md")
        assert card.data.license == "apache-2.0"  # the bundled teacher's
        summary = json.loads((folder / "summary.json").read_text())
        train_set = json.loads((folder / "train_set.json").read_text())
        assert train_set["shards"][0]["meta"]["teacher_hash"] in card.text
        assert f"{summary['steps']} steps" in card.text and "| student |" in card.text, (
            "the evaluation's table is in the card"
        )
        assert ("the CE-only baseline: no distillation" in card.text) == baseline
        assert (folder / "run_config.json").exists()
    assert Path(paths.student_dir(tiny_config, False) / "model" / "README.md").read_text().startswith("---\nlicense:")
