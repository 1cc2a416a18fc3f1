"""Evaluation metrics against hand-computed values on tiny tensors, and the gate."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.evaluation import EvalConfig, batch_sums, finish, gate


def tiny_batch():
    # one sequence, two labelled positions, vocabulary of 3, teacher top-2
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    batch = {
        "targets": torch.tensor([[0, 1, 0]]),
        "mask": torch.tensor([[True, True, False]]),
        "topk_ids": torch.tensor([[[0, 1], [2, 0], [0, 1]]]),
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
    base = {"kl": 1.0, "ppl": 100.0}
    cfg = EvalConfig(min_kl_margin=0.1, min_ppl_margin=5.0)
    assert gate({"student": {"kl": 0.8, "ppl": 90.0}, "baseline": base}, cfg)[0]
    passed, text = gate({"student": {"kl": 0.95, "ppl": 90.0}, "baseline": base}, cfg)
    assert not passed and "KL 0.9500 vs baseline 1.0000" in text and "FAIL" in text
    assert not gate({"student": base, "baseline": base}, EvalConfig())[0]


def test_multiple_choice_scoring_by_hand(teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.evaluation import choice_scores, load_mc, mc_accuracy

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
    path.write_text('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n{"question": "r?", "choices": ["c"], "answer": 0}\n')
    with pytest.raises(ValueError, match=r"mc.jsonl:2: choices"):
        load_mc(path)
    items = load_mc(Path(__file__).resolve().parents[2] / "examples" / "python_mc.jsonl")
    result = mc_accuracy(model, tok, items[:3])
    assert result["mc_questions"] == 3 and result["mc_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_candidate_metrics_by_hand():
    from distill.evaluation import candidate_sums, finish_candidates

    # example 0: 2 candidates, gold 0; example 1: 3 candidates, gold 2; example 2: no gold
    student = torch.log(torch.tensor([[0.7, 0.3, 1.0], [0.2, 0.5, 0.3], [0.4, 0.6, 1.0]]))
    teacher = torch.log(torch.tensor([[0.9, 0.1, 1.0], [0.1, 0.2, 0.7], [0.5, 0.5, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    batch = {"candidate_mask": mask, "teacher_logprobs": teacher, "answer": torch.tensor([0, 2, -1])}
    m = finish_candidates(candidate_sums(student, batch))
    kl = [0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3),
          0.1 * math.log(0.1 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.7 * math.log(0.7 / 0.3),
          0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)]
    assert abs(m["kl"] - sum(kl) / 3) < 1e-5
    # choices 0, 1, 1 vs teacher 0, 2, 0 (tie at 0.5 -> argmax takes the first)
    assert abs(m["teacher_agreement"] - 1 / 3) < 1e-9 and m["top1"] == m["teacher_agreement"]
    # gold: example 0 right (0.7), example 1 wrong (choice 1, gold p = 0.3)
    assert m["accuracy"] == 0.5 and m["gold_examples"] == 2 and m["positions"] == 3
    assert abs(m["ppl"] - math.exp(-(math.log(0.7) + math.log(0.3)) / 2)) < 1e-5
    assert abs(m["ece"] - (abs(0.7 - 1) + abs(0.5 - 0)) / 2) < 1e-6


def test_answer_agreement_by_hand():
    from distill.evaluation import answer_agreement

    got = answer_agreement([[1, 2, 3], [4, 5], [], [9]], [[1, 2, 3], [4, 6, 7], [], [8, 9]])
    assert got["greedy_exact_match"] == 0.5
    assert abs(got["greedy_prefix_agreement"] - (1 + 1 / 3 + 1 + 0) / 4) < 1e-12
    with pytest.raises(ValueError, match="one answer per"):
        answer_agreement([[1]], [[1], [2]])
