"""A student distilled from a teacher ensemble against each single teacher's student.

    .venv/bin/python benchmarks/ensemble.py [--config configs/ensemble.yaml] [--steps N]

Run from the repository root. From the ensemble config it derives three runs that differ only in
the teacher: the ensemble, its first member alone and its second member alone (a ``finetune``
member by its adapted checkpoint, built once by ``labelling.prepare_finetuned``). Each is
labelled (every member's shards are cached on their own, so the single runs reuse the ensemble's
member labels), a student is trained through ``training.train_student`` (same student, steps,
data order, seed and losses), and all are evaluated on the same held-out windows with
``evaluate_model``: perplexity of the text, and KL to each teacher's held-out labels (top-k plus
a tail bucket). The CE-only baseline is trained too, for reference.

Prints one line per student, then ``ensemble_vs_best_single_ppl=`` (the ensemble student's
perplexity over the best single-teacher student's; below 1: the ensemble helps).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ensemble.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from distill.config import load_config
    from distill.eval.evaluation import evaluate_model
    from distill.run import engines, labelling, paths, training

    cfg = load_config(args.config)
    if args.steps:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    if not cfg.teacher.ensemble:
        raise SystemExit(f"{args.config}: teacher.models must list two or more teachers")
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    for info in labelling.prepare_finetuned(cfg):
        print(
            f"fine-tuned member: loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} over "
            f"{info['settings']['steps']} steps, "
            f"{info['seconds']:.0f}s{' (reused)' if info['reused'] else ''}",
            flush=True,
        )
    names = cfg.corpus.shard_names()
    t0 = time.perf_counter()
    results = labelling.label_shards(cfg, names)
    engines.close_engines()
    fresh = sum(not m["cache_hit"] for r in results.values() for m in r["members"])
    print(
        f"labels: {len(names)} shards x {len(cfg.teacher.members)} members ({fresh} member shards labelled now), "
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    runs = {"ensemble": cfg}
    for i, (member, _) in enumerate(paths.member_runs(cfg)):
        runs[f"teacher{i}"] = member
    heldout = {name: labelling.open_split(run, "heldout") for name, run in runs.items()}
    for name, shards in heldout.items():
        meta = shards[0].meta
        print(f"  {name} labels: {meta.teacher}; held-out {meta.kind} labels, {meta.slots} ids each", flush=True)
    students = {f"{name}_student": training.train_student(run) for name, run in runs.items()}
    students["ce_baseline"] = training.train_student(cfg, baseline=True)
    ppl = {}
    for name, summary in students.items():
        model = AutoModelForCausalLM.from_pretrained(Path(summary["out_dir"]) / "model")
        metrics = {target: evaluate_model(model, shards, cfg.eval) for target, shards in heldout.items()}
        ppl[name] = metrics["ensemble"]["ppl"]
        kls = " ".join(f"kl_to_{target}={m['kl']:.4f}" for target, m in metrics.items())
        how = "reused" if summary.get("reused") else f"trained in {summary.get('seconds_this_run') or 0:.0f}s"
        print(
            f"{name}: ppl={ppl[name]:.3f} {kls} top1_vs_ensemble={metrics['ensemble']['top1']:.4f} ({how})", flush=True
        )
    for name, shards in heldout.items():
        from distill.eval.stored import teacher_metrics

        print(
            f"teacher {name}: ppl={teacher_metrics(shards, cfg.eval)['ppl']:.3f} (from its stored held-out labels)",
            flush=True,
        )
    best = min(ppl[f"teacher{i}_student"] for i in range(len(cfg.teacher.members)))
    print(f"ensemble_vs_best_single_ppl={ppl['ensemble_student'] / best:.4f}")


if __name__ == "__main__":
    main()
