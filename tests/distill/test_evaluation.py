"""Evaluation metrics against hand-computed values on tiny tensors, and the gate."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import from_mapping
from distill.configbase import ConfigError
from distill.data import load_mc
from distill.eval.answers import answer_agreement, greedy_answers
from distill.eval.choice import (
    choice_scores,
    engine_mc_accuracy,
    mc_accuracy,
    mc_prompt,
    mc_sequences,
    sequence_logprobs,
)
from distill.eval.config import EvalConfig
from distill.eval.evaluation import evaluate, evaluate_model
from distill.eval.full_kl import full_distribution_kl, full_kl_skip_reason
from distill.eval.gate import gate
from distill.eval.heldout import heldout_batches
from distill.eval.metrics import batch_sums, candidate_sums, finish, finish_candidates
from distill.eval.report import markdown_table, summary_line
from distill.eval.stored import collate_teacher_candidates, teacher_metrics
from distill.run import labelling
from distill.train.config import StudentConfig
from distill.train.student import build_student
from distill.train.trainer import collate_for


def tiny_batch():
    # one sequence, two labelled positions, vocabulary of 3, teacher top-2
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    batch = {
        "targets": torch.tensor([[0, 1, 0]]),
        "mask": torch.tensor([[True, True, False]]),
        "teacher_ids": torch.tensor([[[0, 1], [2, 0], [0, 1]]]),
        "teacher_logprobs": torch.log(torch.tensor([[[0.6, 0.3], [0.7, 0.2], [0.5, 0.5]]])),
    }
    return logits, batch


def test_metrics_by_hand():
    logits, batch = tiny_batch()
    m = finish(batch_sums(logits, batch))
    # perplexity: realized tokens have p = 0.5 and 0.1
    assert abs(m["ppl"] - math.exp(-(math.log(0.5) + math.log(0.1)) / 2)) < 1e-5
    # KL over top-2 + tail: (0.6, 0.3, 0.1) vs (0.5, 0.3, 0.2), then (0.7, 0.2, 0.1) vs (0.8, 0.1, 0.1)
    kl1 = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    kl2 = 0.7 * math.log(0.7 / 0.8) + 0.2 * math.log(0.2 / 0.1) + 0.1 * math.log(0.1 / 0.1)
    assert abs(m["kl"] - (kl1 + kl2) / 2) < 1e-5
    # top-1 agreement with the teacher: argmax 0 == teacher 0, argmax 2 == teacher 2
    assert m["top1"] == 1.0
    # ECE: confidences 0.5 (correct: target 0) and 0.8 (wrong: target 1), separate bins
    assert abs(m["ece"] - (abs(0.5 - 1) + abs(0.8 - 0)) / 2) < 1e-6
    assert m["positions"] == 2
    # position buckets: t=0 -> bucket "0-0", t=1 -> "1-2"; calibration bins hold one position each
    assert [(b["positions"], b["count"]) for b in m["kl_by_position"]] == [("0-0", 1), ("1-2", 1)]
    assert abs(m["kl_by_position"][0]["kl"] - kl1) < 1e-5 and abs(m["kl_by_position"][1]["kl"] - kl2) < 1e-5
    assert [(round(c["confidence"], 4), c["accuracy"]) for c in m["calibration"]] == [(0.5, 1.0), (0.8, 0.0)]


def test_gate_needs_strict_improvement():
    base, init = {"kl": 1.0, "ppl": 100.0, "bpb": 2.0}, {"kl": 3.0, "ppl": 500.0, "bpb": 3.0}
    cfg = EvalConfig(min_ppl_margin=5.0, min_bpb_margin=0.05)
    assert gate({"student": {"kl": 0.8, "ppl": 90.0, "bpb": 1.9}, "baseline": base, "student_init": init}, cfg)[0]
    # perplexity inside the margin fails; the KL to the stored labels is not a leg (a KD student
    # minimizes it), so a worse KL with better perplexity and bits per byte passes
    passed, text = gate({"student": {"kl": 0.8, "ppl": 97.0, "bpb": 1.9}, "baseline": base, "student_init": init}, cfg)
    assert not passed and "ppl 97.00 vs baseline 100.00 (margin 5.0): FAIL" in text
    assert gate({"student": {"kl": 1.5, "ppl": 90.0, "bpb": 1.9}, "baseline": base, "student_init": init}, cfg)[0]
    passed, text = gate({"student": {"kl": 0.8, "ppl": 90.0, "bpb": 1.97}, "baseline": base, "student_init": init}, cfg)
    assert not passed and "bpb 1.9700 vs baseline 2.0000 (margin 0.05): FAIL" in text
    assert not gate({"student": base, "baseline": base, "student_init": init}, EvalConfig())[0]
    # candidates data: the gold answer's perplexity among the candidates, and no bits per byte
    passed, text = gate(
        {"student": {"gold_ppl": 9.0}, "baseline": {"gold_ppl": 10.0}, "student_init": {"gold_ppl": 20.0}}, EvalConfig()
    )
    assert passed and text == "gold_ppl 9.00 vs baseline 10.00 (margin 0.0): ok, vs student_init 20.00: ok"


def test_gate_fails_a_student_no_better_than_its_initialization():
    """A baseline that training made worse than the initialization (a cut-from-the-teacher
    student can start well) must not let an untrained-looking student pass."""
    init = {"ppl": 80.0, "bpb": 1.8}
    passed, text = gate(
        {"student": {"ppl": 85.0, "bpb": 1.85}, "baseline": {"ppl": 120.0, "bpb": 2.1}, "student_init": init},
        EvalConfig(),
    )
    assert not passed
    assert "ppl 85.00 vs baseline 120.00 (margin 0.0): ok, vs student_init 80.00: FAIL" in text
    assert "bpb 1.8500 vs baseline 2.1000 (margin 0.0): ok, vs student_init 1.8000: FAIL" in text


def test_removed_kl_margin_says_what_replaced_it():
    with pytest.raises(ConfigError, match=r"eval\.min_kl_margin was removed: .*min_ppl_margin.*min_bpb_margin"):
        from_mapping({"eval": {"min_kl_margin": 0.0}})


def test_multiple_choice_scoring_by_hand(teacher_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, use_safetensors=True).eval()
    prompt, choice = "Question: Which keyword defines a function in Python?\nAnswer:", " def"
    scores = choice_scores(model, tok, prompt, [choice, " function"])
    ids = tok(prompt + choice)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    by_hand = sum(lp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))
    assert abs(scores[0].item() - by_hand) < 1e-4
    path = tmp_path / "mc.jsonl"
    path.write_text(
        '{"question": "q?", "choices": ["a", "b"], "answer": 0}\n{"question": "r?", "choices": ["c"], "answer": 0}\n'
    )
    with pytest.raises(ValueError, match=r"mc.jsonl:2: choices"):
        load_mc(path)
    items = load_mc(Path(__file__).resolve().parents[2] / "examples" / "python_mc.jsonl")
    result = mc_accuracy(model, tok, items[:3])
    assert result["mc_questions"] == 3 and result["mc_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_candidate_metrics_by_hand():
    # example 0: 2 candidates, gold 0; example 1: 3 candidates, gold 2; example 2: no gold
    student = torch.log(torch.tensor([[0.7, 0.3, 1.0], [0.2, 0.5, 0.3], [0.4, 0.6, 1.0]]))
    teacher = torch.log(torch.tensor([[0.9, 0.1, 1.0], [0.1, 0.2, 0.7], [0.5, 0.5, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    batch = {"candidate_mask": mask, "teacher_logprobs": teacher, "answer": torch.tensor([0, 2, -1])}
    m = finish_candidates(candidate_sums(student, batch))
    kl = [
        0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3),
        0.1 * math.log(0.1 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.7 * math.log(0.7 / 0.3),
        0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6),
    ]
    assert abs(m["kl"] - sum(kl) / 3) < 1e-5
    # choices 0, 1, 1 vs teacher 0, 2, 0 (tie at 0.5 -> argmax takes the first)
    assert abs(m["choice_agreement"] - 1 / 3) < 1e-9
    # gold: example 0 right (0.7), example 1 wrong (choice 1, gold p = 0.3)
    assert m["accuracy"] == 0.5 and m["gold_examples"] == 2 and m["examples"] == 3
    assert abs(m["gold_ppl"] - math.exp(-(math.log(0.7) + math.log(0.3)) / 2)) < 1e-5
    assert abs(m["ece"] - (abs(0.7 - 1) + abs(0.5 - 0)) / 2) < 1e-6


def test_candidates_report_names_its_own_quantities():
    """Candidates data reports the gold answer's perplexity and the agreement with the teacher's
    choice under their own names, in the metrics, the table and the summary line."""
    student = torch.log(torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    teacher = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    batch = {
        "candidate_mask": torch.ones(2, 2, dtype=torch.bool),
        "teacher_logprobs": teacher,
        "answer": torch.tensor([0, 1]),
    }
    m = {**finish_candidates(candidate_sums(student, batch)), "parameters": 2e6}
    assert not {"ppl", "top1", "positions", "teacher_agreement"} & set(m)
    results = {"teacher": m, "student": m, "baseline": m}
    header, _, row = markdown_table(results).splitlines()[:3]
    assert header == (
        "| model | params (M) | checkpoint (MB) | gold-answer ppl | KL(teacher‖model) | agrees with teacher's choice "
        "| ECE | gold accuracy |"
    )
    assert row == f"| teacher | 2.0 | – | {m['gold_ppl']:.2f} | {m['kl']:.4f} | 0.5000 | {m['ece']:.4f} | 1.000 |"
    g, kl = f"{m['gold_ppl']:.2f}", f"{m['kl']:.4f}"
    assert summary_line(results) == (
        f"teacher_gold_ppl={g} student_gold_ppl={g} baseline_gold_ppl={g} student_kl={kl} baseline_kl={kl} "
        "student_choice_agreement=0.5000 baseline_choice_agreement=0.5000"
    )


def test_token_report_table_and_summary():
    """The table and summary line of token data, character for character (the demo prints both)."""
    teacher = {"ppl": 3.2, "bpb": 0.91, "kl": 0.0, "top1": 1.0, "ece": 0.01, "parameters": 135e6, "mc_accuracy": 0.5}
    student = {"ppl": 9.87, "bpb": 1.5, "kl": 2.3376, "top1": 0.51, "ece": 0.02, "parameters": 40e6, "kl_full": 2.5}
    results = {"teacher": {**teacher, "checkpoint_bytes": 270e6}, "student": student, "baseline": student}
    assert markdown_table(results).splitlines() == [
        "| model | params (M) | checkpoint (MB) | held-out ppl | bits/byte | KL(teacher‖model) | top-1 agreement | ECE "
        "| MC accuracy | KL full (sample) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| teacher | 135.0 | 270 | 3.20 | 0.9100 | 0.0000 | 1.0000 | 0.0100 | 0.500 | – |",
        "| student | 40.0 | – | 9.87 | 1.5000 | 2.3376 | 0.5100 | 0.0200 | – | 2.500 |",
        "| baseline | 40.0 | – | 9.87 | 1.5000 | 2.3376 | 0.5100 | 0.0200 | – | 2.500 |",
    ]
    assert summary_line(results) == (
        "teacher_ppl=3.20 student_ppl=9.87 baseline_ppl=9.87 student_kl=2.3376 baseline_kl=2.3376 "
        "student_top1=0.5100 baseline_top1=0.5100 teacher_bpb=0.9100 student_bpb=1.5000 baseline_bpb=1.5000 "
        "student_kl_full=2.5000 baseline_kl_full=2.5000"
    )


def test_answer_agreement_by_hand():
    got = answer_agreement([[1, 2, 3], [4, 5], [], [9]], [[1, 2, 3], [4, 6, 7], [], [8, 9]])
    assert got["greedy_exact_match"] == 0.5
    assert abs(got["greedy_prefix_agreement"] - (1 + 1 / 3 + 1 + 0) / 4) < 1e-12
    with pytest.raises(ValueError, match="one answer per"):
        answer_agreement([[1]], [[1], [2]])


def test_teacher_backend_is_validated():
    assert EvalConfig().teacher_backend == "stored"
    with pytest.raises(ConfigError, match="teacher_backend='vllm' is invalid: expected stored or transformers"):
        EvalConfig(teacher_backend="vllm")


def test_teacher_candidate_metrics_from_stored_distribution():
    rows = [
        {"teacher_logprobs": np.log([0.9, 0.1]), "answer": 0},
        {"teacher_logprobs": np.log([0.2, 0.3, 0.5]), "answer": 1},
        {"teacher_logprobs": np.log([0.6, 0.4]), "answer": -1},
    ]
    batch = collate_teacher_candidates(rows)
    m = finish_candidates(candidate_sums(batch["teacher_logprobs"], batch))
    assert abs(m["kl"]) < 1e-7 and m["choice_agreement"] == 1.0 and m["gold_examples"] == 2
    assert abs(m["gold_ppl"] - math.exp(-(math.log(0.9) + math.log(0.3)) / 2)) < 1e-5
    assert m["accuracy"] == 0.5  # choice 0 right, choice 2 wrong (gold 1)
    assert abs(m["ece"] - (abs(0.9 - 1) + abs(0.5 - 0)) / 2) < 1e-6


def _one_at_a_time_scores(model, tok, items):
    """The multiple-choice scores unbatched: one forward per choice, the reference for the batched scoring."""
    scores = []
    for item in items:
        prompt, choices = mc_prompt(item)
        prompt_ids = tok(prompt)["input_ids"]
        for choice in choices:
            ids = torch.tensor([prompt_ids + tok(prompt + choice)["input_ids"][len(prompt_ids) :]])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            scores.append(lp[len(prompt_ids) - 1 :].gather(-1, ids[0, len(prompt_ids) :, None])[:, 0].sum().item())
    return scores


def test_batched_mc_and_greedy_equal_one_at_a_time(hf_teacher, teacher_dir):
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    items = load_mc(Path(__file__).resolve().parents[2] / "examples" / "python_mc.jsonl")[:5]
    seqs, starts, _ = mc_sequences(tok, items)
    batched = sequence_logprobs(hf_teacher, seqs, starts, batch_size=7)  # 20 choices: batches mix questions
    np.testing.assert_allclose(batched[:, 0].numpy(), _one_at_a_time_scores(hf_teacher, tok, items), atol=1e-4)
    assert mc_accuracy(hf_teacher, tok, items, batch_size=2) == mc_accuracy(hf_teacher, tok, items, batch_size=1)
    # greedy: left-padded batches of prompts of different lengths give the unbatched answers
    prompts = [s[:n] for s, n in zip(seqs[::4], starts[::4])][:4]
    assert len({len(p) for p in prompts}) > 1
    one = greedy_answers(hf_teacher, prompts, 6, tok.eos_token_id)
    assert greedy_answers(hf_teacher, prompts, 6, tok.eos_token_id, batch_size=3) == one
    assert greedy_answers(hf_teacher, prompts, [6, 2, 6, 1], tok.eos_token_id, batch_size=4) == [
        one[0],
        one[1][:2],
        one[2],
        one[3][:1],
    ]


@pytest.fixture(scope="module")
def heldout(tiny_config, engine, tmp_path_factory):
    """Labelled held-out shards of the tiny config (its own storage root; the session's engine)."""
    cfg = dataclasses.replace(tiny_config, storage_root=str(tmp_path_factory.mktemp("eval") / "data"))
    labelling.prepare_corpus(cfg)
    labelling.label_shards(
        cfg, [n for n in cfg.corpus.shard_names() if n.startswith("heldout")], engine_factory=lambda: engine
    )
    return cfg, labelling.open_split(cfg, "heldout")


def test_stored_teacher_metrics_match_a_transformers_forward(heldout, hf_teacher, teacher_dir):
    cfg, shards = heldout
    stored = teacher_metrics(shards, cfg.eval, teacher_dir)
    forward = evaluate_model(hf_teacher, shards, cfg.eval)
    rel = abs(stored["ppl"] - forward["ppl"]) / forward["ppl"]
    print(
        f"stored teacher ppl {stored['ppl']:.6f} vs transformers {forward['ppl']:.6f}: relative error {rel:.2e} "
        f"over {stored['positions']} positions"
    )
    assert rel < 1e-3
    assert stored["positions"] == forward["positions"] and stored["parameters"] == forward["parameters"]
    assert stored["kl"] == 0.0 and stored["top1"] == 1.0 and forward["kl"] < 0.01 and forward["top1"] > 0.98
    assert abs(stored["ece"] - forward["ece"]) < 0.02
    assert [b["positions"] for b in stored["kl_by_position"]] == [b["positions"] for b in forward["kl_by_position"]]
    assert all(b["kl"] == 0.0 for b in stored["kl_by_position"])
    assert sum(c["count"] for c in stored["calibration"]) == stored["positions"]
    assert set(stored) == set(forward)


def test_engine_greedy_and_mc_match_transformers(heldout, engine, answering_engine, hf_teacher, teacher_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    mc_file = Path(__file__).resolve().parents[2] / "examples" / "python_mc.jsonl"
    items = load_mc(mc_file)
    seqs, starts, _ = mc_sequences(tok, items)
    np.testing.assert_allclose(
        engine.sequence_logprobs(seqs, starts), sequence_logprobs(hf_teacher, seqs, starts, 16).numpy(), atol=2e-3
    )
    assert engine_mc_accuracy(engine, tok, items, source=mc_file) == mc_accuracy(hf_teacher, tok, items)
    prompts = [s[:n] for s, n in zip(seqs[::4], starts[::4])][:4]
    with pytest.raises(RuntimeError, match="labeller: device"):  # the session's engine only scores
        engine.greedy(prompts, 8, tok.eos_token_id)
    answering = answering_engine
    assert answering.labeller == "logprobs"
    assert answering.greedy(prompts, 8, tok.eos_token_id) == greedy_answers(hf_teacher, prompts, 8, tok.eos_token_id)
    np.testing.assert_allclose(
        answering.sequence_logprobs(seqs, starts), engine.sequence_logprobs(seqs, starts), atol=2e-3
    )
    # a question that does not fit the engine's context is named
    long = tmp_path / "long.jsonl"
    long.write_text(
        '{"question": "q?", "choices": ["a", "b"], "answer": 0}\n'
        + '{"question": "%s", "choices": ["a", "b"], "answer": 1}\n' % ("why " * 80)
    )
    with pytest.raises(ValueError, match=r"long.jsonl: question 2 \('why why.*beyond the teacher engine's max_len 64"):
        engine_mc_accuracy(engine, tok, load_mc(long), source=long)


def test_evaluate_never_builds_the_teacher_unless_asked(heldout, engine, teacher_dir, monkeypatch):
    cfg, shards = heldout
    real = transformers.AutoModelForCausalLM.from_pretrained
    stored = evaluate(
        {"teacher": teacher_dir}, shards, cfg.eval, engine_factory=lambda: engine
    )  # mc_file set: needs the engine
    assert stored["teacher"]["kl"] == 0.0 and 0 <= stored["teacher"]["mc_accuracy"] <= 1
    with pytest.raises(ValueError, match="needs the teacher's vLLM engine"):
        evaluate({"teacher": teacher_dir}, shards, cfg.eval)

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded with transformers")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert evaluate({"teacher": teacher_dir}, shards, cfg.eval, engine_factory=lambda: engine) == stored
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real)
    old = evaluate({"teacher": teacher_dir}, shards, dataclasses.replace(cfg.eval, teacher_backend="transformers"))
    assert abs(old["teacher"]["ppl"] / stored["teacher"]["ppl"] - 1) < 1e-3
    assert old["teacher"]["mc_accuracy"] == stored["teacher"]["mc_accuracy"]


def test_full_distribution_kl_against_a_direct_computation(heldout, hf_teacher, teacher_dir, monkeypatch):
    """KL to the teacher's full softmax on the first N held-out windows: 0 for the teacher
    itself, and for a 2-layer cut of it the value of a direct batched computation."""
    cfg, shards = heldout
    eval_cfg = dataclasses.replace(cfg.eval, full_kl_windows=3, batch_size=2)
    student = build_student(
        teacher_dir, StudentConfig(init="teacher_layers", num_layers=2), hf_teacher.config.vocab_size
    )
    out = full_distribution_kl(hf_teacher, {"self": hf_teacher, "cut": student}, shards, eval_cfg)
    assert out["windows"] == 3 and abs(out["self"]) < 1e-6
    total, positions = 0.0, 0
    with torch.no_grad():
        for batch in heldout_batches(shards, dataclasses.replace(eval_cfg, max_windows=3), collate_for(shards[0])):
            args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            t = torch.log_softmax(hf_teacher(**args).logits.double(), -1)[batch["mask"]]
            q = torch.log_softmax(student(**args).logits.double(), -1)[batch["mask"]]
            total += float((t.exp() * (t - q)).sum())
            positions += int(batch["mask"].sum())
    assert out["positions"] == positions
    assert out["cut"] > 0.1 and abs(out["cut"] - total / positions) < 1e-4 * out["cut"], (out["cut"], total / positions)
    # it runs only where the teacher fits: this machine fits the 135M teacher; a device with one
    # free byte (a condition this machine cannot produce) gets a reason naming the sizes
    assert full_kl_skip_reason(teacher_dir, torch.device("cpu"), False) is None
    monkeypatch.setattr("distill.eval.full_kl.free_memory", lambda device: 1)
    reason = full_kl_skip_reason(teacher_dir, torch.device("cpu"), False)
    assert reason is not None and "GiB on cpu" in reason and "0.0 GiB are free" in reason
