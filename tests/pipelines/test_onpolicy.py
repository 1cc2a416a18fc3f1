"""On-policy (GKD) rounds on the real engine: the student answers the training prompts under
vLLM, the teacher labels its answers, the student trains on a mix; rounds are cached, chained
and partitions of a Dagster asset; the evaluation measures KL on the students' own answers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import distill.teacher.vllm_engine as vllm_engine
from distill.config import load_config, merge
from distill.run import labelling, onpolicy, paths, tokenizing, training
from distill.teacher.checkpoint import checkpoint_hashes
from distill.train.trainer import train
from pipelines.definitions import build_definitions
from pipelines.run import materialize_rounds
from storage.reader import ShardStream, StreamPosition
from tests.conftest import REPO

ROUNDS = {
    "rounds": 2,
    "steps": 2,
    "lmbda": 0.5,
    "prompts_per_round": 4,
    "eval_prompts": 3,
    "sampling": {"n": 2, "max_tokens": 12},
}


@pytest.fixture(scope="module")
def onpolicy_config(tiny_config_path, engine, tmp_path_factory):
    """The tiny config in generate mode with two short rounds, and its distilled student."""
    data = merge(
        yaml.safe_load(tiny_config_path.read_text()),
        {
            "teacher": {"mode": "generate", "sampling": {"n": 2, "temperature": 0.8, "max_tokens": 12}},
            "corpus": {"source": str(REPO / "examples" / "prompts.jsonl"), "id_column": "id", "max_documents": 16},
            "eval": {"agreement_prompts": 3, "agreement_max_tokens": 8},
            "onpolicy": ROUNDS,
        },
    )
    data["eval"].pop("mc_file")
    path = tmp_path_factory.mktemp("onpolicy") / "onpolicy.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    labelling.label_shards(cfg, cfg.corpus.shard_names())
    training.train_student(cfg)
    return path, cfg


def test_rounds_train_on_the_students_own_answers_labelled_by_the_teacher(onpolicy_config, hf_teacher, monkeypatch):
    _, cfg = onpolicy_config
    first = onpolicy.run_rounds(cfg, 1)[0]
    start = paths.student_dir(cfg, False) / "model"
    assert first["round"] == 1 and not first["reused"] and first["start"] == str(start)
    assert first["answers"] == 4 * 2 and first["prompts"] == 4 and first["steps"] == 2

    # the answers: the distilled student's (by its weights), 2 per prompt, labelled by the teacher
    shard = paths.label_store(cfg).open(first["answers_key"])
    assert shard.meta.mode == "generate" and shard.meta.slots == cfg.teacher.k and shard.meta.split == "train"
    assert shard.meta.settings["generator"] == "student"
    assert shard.meta.settings["generator_weights"] == checkpoint_hashes(start)["weights"]
    prompts = {
        d: ids
        for d, ids in zip(*(onpolicy.prompt_table(cfg, "train").column(c).to_pylist() for c in ("doc_id", "input_ids")))
    }

    table = [row for row, _ in ShardStream([shard], shuffle=False).rows(StreamPosition(), epochs=1)]
    assert sorted(r["window_index"] for r in table) == [0] * 4 + [1] * 4
    agree, diffs = [], []
    for row in table:
        prompt = prompts[row["doc_id"]]
        ids = [int(t) for t in row["input_ids"]]
        assert ids[: len(prompt)] == prompt and row["label_start"] == len(prompt) - 1 and len(ids) > len(prompt)
        n = len(ids) - 1 - row["label_start"]
        assert len(row["target_logprobs"]) == n, "one label per answer token"
        with torch.no_grad():
            logp = torch.log_softmax(hf_teacher(input_ids=torch.tensor([ids])).logits[0].double(), -1)[
                row["label_start"] : len(ids) - 1
            ]
        realized = logp.gather(1, torch.tensor(ids[row["label_start"] + 1 :])[:, None])[:, 0]
        diffs.append(
            (realized - torch.tensor(np.asarray(row["target_logprobs"]), dtype=torch.float64)).abs().max().item()
        )
        top = np.asarray(row["teacher_ids"]).reshape(n, -1)[:, 0]
        agree.append(float((logp.argmax(-1).numpy() == top).mean()))
    assert max(diffs) < 2e-3, f"the teacher's logprobs of the student's tokens differ from transformers by {max(diffs)}"
    assert np.mean(agree) > 0.95

    card = (Path(first["out_dir"]) / "model" / "README.md").read_text()
    assert "round 1 of GKD-style rounds" in card and "8 answers to 4 training prompts by the student" in card

    # the round's student moved from where it started
    before, after = (
        load_file(start / "model.safetensors"),
        load_file(Path(first["out_dir"]) / "model" / "model.safetensors"),
    )
    assert any(not torch.equal(before[n], after[n]) for n in before)

    # round 2 starts from round 1; round 1 is reused, not recomputed
    both = onpolicy.run_rounds(cfg)
    assert [i["reused"] for i in both] == [True, False]
    assert both[1]["start"] == str(Path(first["out_dir"]) / "model") and both[1]["answers_key"] != first["answers_key"]
    # the teacher's rows and the lambda coins go on: round 1 where the distilled student's stream ended, round 2 where
    # round 1's did (its own answers, a new stream, from their first row); tests/distill/test_onpolicy.py checks the
    # rows
    student_end = json.loads((start.parent / "summary.json").read_text())["position"]
    assert first["start_position"] == {"index": 0, "main": student_end, "extra": {"epoch": 0, "unit": 0, "row": 0}}
    assert both[1]["start_position"] == {**first["position"], "extra": {"epoch": 0, "unit": 0, "row": 0}}
    assert first["position"]["index"] == 2 * cfg.train.batch_size * cfg.train.grad_accum
    assert both[1]["position"]["index"] == 2 * first["position"]["index"]
    assert onpolicy.final_model(cfg) == Path(both[1]["out_dir"]) / "model"

    # a finished run needs no engine at all

    def no_engine(*args, **kwargs):
        raise AssertionError("a finished round started an engine")

    monkeypatch.setattr(vllm_engine.VllmTeacher, "__init__", no_engine)
    assert all(i["reused"] for i in onpolicy.run_rounds(cfg))
    monkeypatch.undo()

    # the off-policy control: the teacher answers the same prompts, with the same sampling
    control = dataclasses.replace(cfg, onpolicy=dataclasses.replace(cfg.onpolicy, generator="teacher"))
    ctl = onpolicy.run_rounds(control, 1)[0]
    ctl_shard = paths.label_store(cfg).open(ctl["answers_key"])
    assert (
        ctl_shard.meta.settings["generator"] == "teacher" and ctl["answers"] == 8 and ctl["out_dir"] != first["out_dir"]
    )
    assert ctl_shard.meta.settings["generator_weights"] == paths.teacher_hashes(cfg)["weights"]
    assert {r["doc_id"] for r in ctl_shard.parquet().read(columns=["doc_id"]).to_pylist()} == {
        r["doc_id"] for r in table
    }


def test_rounds_are_asset_partitions_and_the_evaluation_reports_own_answer_kl(onpolicy_config):
    path, cfg = onpolicy_config
    defs = build_definitions(str(path), keep_engine_alive=True)
    assets = list(defs.assets)
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_assets_def("onpolicy_student").partitions_def.get_partition_keys() == ["round-001", "round-002"]
    result = dg.materialize(
        assets, selection=["onpolicy_student"], partition_key="round-002", resources=defs.resources, instance=instance
    )
    assert result.success
    meta = instance.get_latest_materialization_event(dg.AssetKey("onpolicy_student")).asset_materialization.metadata
    assert meta["round"].value == 2 and Path(meta["model_dir"].value) == onpolicy.final_model(cfg)

    # make demo's runner: every round in one run (a partition range), then the evaluation
    result = materialize_rounds(defs, instance)
    assert result.success
    assert instance.get_materialized_partitions(dg.AssetKey("onpolicy_student")) == {"round-001", "round-002"}
    meta = instance.get_latest_materialization_event(dg.AssetKey("onpolicy_evaluation")).asset_materialization.metadata
    report = json.loads((Path(meta["report"].value).parent / "results.json").read_text())
    results = report["results"]
    assert set(results) == {"teacher", "offpolicy", "onpolicy"}
    assert results["teacher"]["greedy_exact_match"] == 1.0
    for name in ("offpolicy", "onpolicy"):
        m = results[name]
        assert m["self_kl"] >= 0 and 0 <= m["self_top1"] <= 1 and m["self_tokens"] > 0
        assert 0 <= m["greedy_exact_match"] <= m["greedy_prefix_agreement"] <= 1
        assert meta[f"{name}_self_kl"].value == pytest.approx(m["self_kl"])
    assert results["onpolicy"]["answer_tokens"] == sum(r["answer_tokens"] for r in report["rounds"]) > 0
    # beside the own-answer KL: what it could hide (short, cut or repetitive answers); the teacher's own answers,
    # sampled alike
    answers = cfg.onpolicy.sampling.n * min(cfg.onpolicy.eval_prompts, onpolicy.prompt_table(cfg, "heldout").num_rows)
    for name in ("teacher", "offpolicy", "onpolicy"):
        m = results[name]
        assert (
            m["self_len"] * answers == pytest.approx(m["self_tokens"])
            and 1 <= m["self_len"] <= cfg.onpolicy.sampling.max_tokens
        )
        assert 0 <= m["self_eos"] <= 1 and 0 < m["self_distinct2"] <= 1 and m["self_teacher_ll"] < 0
        assert meta[f"{name}_self_teacher_ll"].value == pytest.approx(m["self_teacher_ll"])
    assert "distinct-2" in meta["table"].value
    assert "KL (own answers)" in meta["table"].value and len(report["rounds"]) == 2


def test_a_round_resumes_exactly_inside_its_mix(onpolicy_config, tmp_path):
    """Stopped after one step and resumed, a round's training (two streams mixed by lambda)
    ends with the weights of an uninterrupted run."""
    _, cfg = onpolicy_config
    plan = onpolicy.plan_round(cfg, 1)
    answers = onpolicy.label_answer_sets(cfg, [plan.answers])  # committed by the rounds above: no engine work
    steps = dataclasses.replace(plan.train, steps=3, lr=1e-2)
    args = (plan.student, steps, paths.teacher_dir(cfg), labelling.open_split(cfg, "train"))
    vocab = len(tokenizing.teacher_tokenizer(cfg))
    train(*args, tmp_path / "a", vocab, mix=(answers, 0.5))
    stopped = train(*args, tmp_path / "b", vocab, mix=(answers, 0.5), stop_after=1)
    assert not stopped["finished"] and (tmp_path / "b" / "checkpoints").exists()
    saved = json.loads(next((tmp_path / "b" / "checkpoints").glob("step-*/position.json")).read_text())
    assert (
        set(saved["positions"][0]) == {"index", "main", "extra"} and saved["positions"][0]["index"] == steps.batch_size
    )
    train(*args, tmp_path / "b", vocab, mix=(answers, 0.5))
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in "ab")
    assert all(torch.equal(a[n], b[n]) for n in a)
    history = [json.loads(line) for line in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
