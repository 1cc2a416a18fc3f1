"""The distillation gate: did distillation help? The verdict and one line per leg."""

from __future__ import annotations

from typing import Mapping

from distill.eval.config import EvalConfig


def gate(results: Mapping[str, dict], cfg: EvalConfig) -> tuple[bool, str]:
    """The student must beat the CE-only baseline by the configured margins and the student at
    initialization (``student_init``) outright, in held-out perplexity (candidates data: the
    gold answer's perplexity among the candidates) and, where measured for all three, bits per
    byte. Comparing with the baseline alone lets a student no better than its initialization
    pass whenever the baseline is worse. The stored-label KL is not a leg: ``tail: bucket`` KD
    minimizes exactly that quantity. On image questions, answer accuracy is a leg too: the student
    must answer at least as many right as the baseline and as its initialization. Returns (passed,
    the legs' text)."""
    s, b, init = results["student"], results["baseline"], results["student_init"]
    legs = [("gold_ppl" if "gold_ppl" in s else "ppl", "{:.2f}", cfg.min_ppl_margin)]
    if all("bpb" in m for m in (s, b, init)):
        legs.append(("bpb", "{:.4f}", cfg.min_bpb_margin))
    passed, parts = True, []
    if all("answer_acc" in m for m in (s, b, init)):
        # image questions: answering right is the point; ties pass (a saturated task has no margin to win)
        vs_base, vs_init = s["answer_acc"] >= b["answer_acc"], s["answer_acc"] >= init["answer_acc"]
        passed = vs_base and vs_init
        parts.append(
            f"answer_acc {s['answer_acc']:.3f} vs baseline {b['answer_acc']:.3f}: {'ok' if vs_base else 'FAIL'}, "
            f"vs student_init {init['answer_acc']:.3f}: {'ok' if vs_init else 'FAIL'}"
        )
    for metric, fmt, margin in legs:
        vs_base = s[metric] < b[metric] - margin
        vs_init = s[metric] < init[metric]
        passed = passed and vs_base and vs_init
        parts.append(
            f"{metric} {fmt.format(s[metric])} vs baseline {fmt.format(b[metric])} (margin {margin}): "
            f"{'ok' if vs_base else 'FAIL'}, vs student_init {fmt.format(init[metric])}: {'ok' if vs_init else 'FAIL'}"
        )
    return passed, "; ".join(parts)
