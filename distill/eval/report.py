"""The evaluation report's text: what each kind of data measures (``MODE_NOTES``), the markdown
table of every model's metrics, and the one-line ``key=value`` summary the demo prints last."""

from __future__ import annotations

from typing import Mapping

MODE_NOTES = {
    "score": "Held-out text: perplexity of each model on the held-out windows; KL and top-1 against the teacher's "
    "stored labels. Image questions: the same over the answer tokens, and answer accuracy (every answer token, and "
    "the end of the turn, the model's most likely: what greedy decoding would write).",
    "generate": "Held-out prompts: perplexity, KL and top-1 over the teacher's answer tokens; greedy answers compared "
    "with the teacher's greedy answers.",
    "candidates": "Held-out examples: KL over each example's candidates; agreement = the model's choice is the "
    "teacher's; gold-answer ppl = perplexity of the gold answer among the candidates; gold accuracy where the data "
    "has gold answers.",
}

# (metric, column title, cell format) in table order; a column is shown when any model has its metric
COLUMNS = (
    ("ppl", "held-out ppl", "{:.2f}"),
    ("bpb", "bits/byte", "{:.4f}"),  # models compare across tokenizers by bits per byte
    ("gold_ppl", "gold-answer ppl", "{:.2f}"),
    ("kl", "KL(teacher‖model)", "{:.4f}"),
    ("top1", "top-1 agreement", "{:.4f}"),
    ("choice_agreement", "agrees with teacher's choice", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("accuracy", "gold accuracy", "{:.3f}"),
    ("answer_acc", "answer accuracy", "{:.3f}"),
    ("greedy_exact_match", "greedy = teacher's", "{:.3f}"),
    ("greedy_prefix_agreement", "greedy prefix agreement", "{:.3f}"),
    ("mc_accuracy", "MC accuracy", "{:.3f}"),
    ("generation_tokens_per_s", "vLLM gen tok/s", "{:.3f}"),
    ("kl_full", "KL full (sample)", "{:.3f}"),
)


def _columns(results: Mapping[str, dict]) -> list[tuple[str, str, str]]:
    """The ``COLUMNS`` some model has, then one per lm-eval metric (``lm_eval_<task>_<metric>``)."""
    harness = sorted({c for m in results.values() for c in m if c.startswith("lm_eval_")})
    columns = [*COLUMNS, *((c, c[len("lm_eval_") :].replace("_acc", " acc"), "{:.3f}") for c in harness)]
    return [c for c in columns if any(c[0] in m for m in results.values())]


def markdown_table(results: Mapping[str, dict]) -> str:
    """One row per model: parameters, checkpoint size, then its metrics (– where not measured)."""
    columns = _columns(results)
    lines = [
        "| model | params (M) | checkpoint (MB) |" + "".join(f" {title} |" for _, title, _ in columns),
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for name, m in results.items():
        size = f"{m['checkpoint_bytes'] / 1e6:.0f}" if "checkpoint_bytes" in m else "–"
        cells = [fmt.format(m[metric]) if metric in m else "–" for metric, _, fmt in columns]
        lines.append(f"| {name} | {m['parameters'] / 1e6:.1f} | {size} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def summary_line(results: Mapping[str, dict]) -> str:
    """``key=value`` pairs of teacher, student and baseline: perplexity, KL to the stored labels
    and top-1 agreement (candidates data: gold-answer perplexity, KL over the candidates and
    agreement with the teacher's choice), then bits per byte and KL to the full distribution
    where measured."""
    t, s, b = results["teacher"], results["student"], results["baseline"]
    ppl, agree = ("gold_ppl", "choice_agreement") if "gold_ppl" in s else ("ppl", "top1")
    return (
        f"teacher_{ppl}={t[ppl]:.2f} student_{ppl}={s[ppl]:.2f} baseline_{ppl}={b[ppl]:.2f} "
        f"student_kl={s['kl']:.4f} baseline_kl={b['kl']:.4f} "
        f"student_{agree}={s[agree]:.4f} baseline_{agree}={b[agree]:.4f}"
        + (
            f" teacher_bpb={t['bpb']:.4f} student_bpb={s['bpb']:.4f} baseline_bpb={b['bpb']:.4f}"
            if all("bpb" in m for m in (t, s, b))
            else ""
        )
        + (
            f" student_kl_full={s['kl_full']:.4f} baseline_kl_full={b['kl_full']:.4f}"
            if "kl_full" in s and "kl_full" in b
            else ""
        )
        + (
            f" teacher_acc={t['answer_acc']:.4f} student_acc={s['answer_acc']:.4f} baseline_acc={b['answer_acc']:.4f}"
            if all("answer_acc" in m for m in (t, s, b))
            else ""
        )
    )
