"""The evaluation run: the teacher, the distilled student, the CE-only baseline and the student
at initialization on the held-out shards; the report (markdown, PNG plots, JSON) is written to
``<root>/evaluations/<key>`` and the students' model cards are rewritten with its table."""

from __future__ import annotations

import dataclasses
import json

import torch

from distill.config import RunConfig
from distill.data import load_mc
from distill.eval.choice import mc_accuracy
from distill.eval.evaluation import evaluate, evaluate_model
from distill.eval.full_kl import full_distribution_kl, full_kl_skip_reason
from distill.eval.gate import gate
from distill.eval.generation import generation_throughput
from distill.eval.models import eval_device, load_model
from distill.eval.plots import write_plots
from distill.eval.report import MODE_NOTES, markdown_table, summary_line
from distill.run.engines import close_engines, get_engine
from distill.run.labelling import open_split
from distill.run.paths import run_images, student_dir, teacher_dir
from distill.run.tokenizing import student_tokens, teacher_tokenizer
from distill.run.training import write_student_card
from distill.train.student import build_student
from distill.train.xtok import token_byte_table
from distill.vision import PixelInputs
from storage.cache import content_key
from storage.writer import atomic_write_text


def evaluate_run(cfg: RunConfig) -> dict:
    """Teacher, distilled student, CE-only baseline and the student at initialization on
    held-out shards; report (markdown + PNG plots + JSON) in ``<root>/evaluations/<key>``."""
    shards = open_split(cfg, "heldout")
    models = {"teacher": teacher_dir(cfg)}
    histories = {}
    for name, baseline in (("student", False), ("baseline", True)):
        folder = student_dir(cfg, baseline)
        if not (folder / "model").exists():
            asset = "baseline_student" if baseline else "student_model"
            raise FileNotFoundError(f"{folder / 'model'}: {name} not trained; materialize the {asset} asset")
        models[name] = folder / "model"
        histories[name] = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    # the teacher from its stored labels and its vLLM engine (eval.teacher_backend), the students
    # on the training device and precision
    tok = teacher_tokenizer(cfg)
    byte_lengths = (
        torch.tensor([len(b) for b in token_byte_table(tok)]) if shards[0].meta.mode != "candidates" else None
    )
    vocab, cross = student_tokens(cfg)
    students = {"student": cross, "baseline": cross} if cross is not None else {}
    pixels = PixelInputs(teacher_dir(cfg), run_images(cfg)) if cfg.corpus.images else None
    results = evaluate(
        models,
        shards,
        cfg.eval,
        cfg.train.precision,
        engine_factory=lambda generates=False: get_engine(cfg, generates=generates),
        byte_lengths=byte_lengths,
        cross=students,
        pixels=pixels,
    )
    device, bf16 = eval_device(cfg.train.precision)
    init = build_student(teacher_dir(cfg), cfg.student, vocab, cross.tokenizer if cross is not None else None).to(
        device
    )
    with torch.no_grad():
        results["student_init"] = evaluate_model(init, shards, cfg.eval, bf16, byte_lengths, cross, pixels)
        if cfg.eval.mc_file:
            results["student_init"].update(
                mc_accuracy(
                    init,
                    cross.tokenizer if cross is not None else tok,
                    load_mc(cfg.eval.mc_file),
                    cfg.eval.mc_length_normalize,
                    cfg.eval.batch_size,
                    bf16,
                )
            )
    # KL to the teacher's full distribution on a sample of held-out windows (reported, not gated)
    full_kl = {
        "skipped": (
            "eval.full_kl_windows is 0"
            if not cfg.eval.full_kl_windows
            else "candidates data has no per-token distribution"
            if shards[0].meta.mode == "candidates"
            else "the students have their own tokenizer"
            if cross is not None
            else "an ensemble's full distribution is its members' mixture (not computed)"
            if cfg.teacher.ensemble
            else "image questions (not computed)"
            if cfg.corpus.images
            else full_kl_skip_reason(models["teacher"], device, bf16)
        )
    }
    if full_kl["skipped"] is None:
        teacher = load_model(models["teacher"], device, torch.bfloat16 if bf16 else torch.float32)
        compared = {
            "student": load_model(models["student"], device),
            "baseline": load_model(models["baseline"], device),
            "student_init": init,
        }
        full_kl = {**full_distribution_kl(teacher, compared, shards, cfg.eval, bf16), "skipped": None}
        for name in compared:
            results[name]["kl_full"] = full_kl.pop(name)
        del teacher, compared
    del init
    speedup = None
    if cfg.eval.generation_throughput:
        close_engines()  # the teacher engine evaluate() used: each measurement starts its own engine on the device
        for name in ("teacher", "student"):
            results[name]["generation_tokens_per_s"] = generation_throughput(models[name])["tokens_per_s"]
        speedup = results["student"]["generation_tokens_per_s"] / results["teacher"]["generation_tokens_per_s"]
    passed, gate_text = gate(results, cfg.eval)
    key = content_key(
        {
            "models": {n: str(p) for n, p in models.items()},
            "heldout": [s.meta.cache_key for s in shards],
            "eval": dataclasses.asdict(cfg.eval),
        }
    )
    out = cfg.root / "evaluations" / key
    plots = write_plots(results, histories, out)
    report = {
        "results": results,
        "table": markdown_table(results),
        "summary": summary_line(results),
        "gate_passed": passed,
        "gate": gate_text,
        "full_kl": full_kl,
        "generation_speedup": speedup,
        "plots": {n: str(p) for n, p in plots.items()},
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=1))
    images = "\n".join(f"![{n}]({p.name})" for n, p in plots.items())
    speed = (
        f"Student generates {speedup:.2f}x the teacher's tokens/s under vLLM on this machine.\n\n" if speedup else ""
    )
    note = MODE_NOTES[shards[0].meta.mode]
    note += (
        f" KL full: KL to the teacher's full distribution (a transformers forward) on the first {full_kl['windows']} "
        f"held-out windows ({full_kl['positions']} positions)."
        if full_kl["skipped"] is None
        else f" KL full: not computed ({full_kl['skipped']})."
    )
    atomic_write_text(
        out / "report.md",
        f"# Distillation report\n\n{note}\n\n{report['table']}\n\n{speed}Gate: {gate_text}\n\n{images}\n\n"
        f"`{report['summary']}`\n",
    )
    report["out_dir"] = str(out)
    train_shards = open_split(cfg, "train", verify_checksum=False)
    for name, baseline in (("student", False), ("baseline", True)):
        folder = student_dir(cfg, baseline)
        summary = {**json.loads((folder / "summary.json").read_text()), "out_dir": str(folder)}
        write_student_card(cfg, summary, train_shards, baseline, results, report["table"])
    return report
