"""Feature distillation from stored teacher hidden states against logit-only KD and CE, at equal steps.

    .venv/bin/python benchmarks/features.py [--configs configs/features.yaml configs/features_stdlib.yaml]
        [--steps N] [--seeds 0 1 ...] [--students teacher_layers random]
    .venv/bin/python benchmarks/features.py --rate [--windows 160] [--repeats 3]   # labelling speed only

Run from the repository root. For each config (``teacher.features`` set: the layers to capture):
build the corpus (the standard-library docstring corpus is written first, as ``benchmarks/adaptive.py``
does), label it with the teacher through the device labeller, features beside the labels (cache
hits once labelled). Then, for each student init (the config's ``teacher_layers`` student, and a
randomly initialized one of the same shape, where features should matter more) and each seed,
train three students through ``training.train_student`` that differ only in their loss: ``ce``
(the CE-only baseline), ``logit`` (the config's KD + CE mix, ``feature_weight`` 0) and ``feature``
(the same mix plus the config's ``train.feature_weight``), with the same steps, data order, seed
and learning rate. Each is evaluated on the held-out shards: KL(teacher || student) over the
whole vocabulary (a transformers teacher forward, the first ``eval.full_kl_windows`` windows),
perplexity and bits per byte over every held-out position.

``--rate`` measures what capturing costs the labelling instead: the first config's first
``--windows`` windows labelled (top-k, ``engine.score``) by an engine with feature capture and by
one without, interleaved and repeated; median (min..max) positions/s and their ratio,
``features_vs_plain_labelling_rate=``.

Prints the bytes each captured layer costs per labelled position in the shards (compressed, as
stored), a table per corpus and student, and ``name=value`` lines; the last two are
``feature_bytes_per_position_layer=`` and ``feature_kd_vs_logit_kd_kl=``: the random student's
held-out full KL with features over its KL without, the geometric mean over corpora and seeds
(below 1: features bring the student closer to the teacher).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.adaptive import label, write_stdlib_corpus  # noqa: E402

VARIANTS = ("ce", "logit", "feature")


def feature_bytes(shards) -> tuple[float, int]:
    """Compressed bytes of the feature columns per labelled position and captured layer, and the positions."""
    bytes_, positions = 0, 0
    for shard in shards:
        md = shard.parquet().metadata
        for g in range(md.num_row_groups):
            group = md.row_group(g)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema.split(".")[0] in ("feature_scales", "feature_codes"):
                    bytes_ += group.column(c).total_compressed_size
        positions += shard.tokens
    return bytes_ / positions / len(shards[0].meta.features["layers"]), positions


def variant(cfg, name: str, init: str, seed: int):
    """The run config of one student: ``name`` in ``VARIANTS``, ``init`` its initialization."""
    train = dataclasses.replace(cfg.train, seed=seed, progress=False)
    if name == "ce":
        train = dataclasses.replace(train, kd_weight=0.0, feature_weight=0.0)
    elif name == "logit":
        train = dataclasses.replace(train, feature_weight=0.0)
    student = dataclasses.replace(cfg.student, init=init, seed=seed)
    return dataclasses.replace(cfg, train=train, student=student)


def compare(cfg, corpus: str, inits, seeds, variants=VARIANTS) -> dict:
    """Every student's held-out full KL, perplexity and bits per byte: ``{(init, seed, variant): metrics}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.eval.evaluation import evaluate_model
    from distill.eval.full_kl import full_distribution_kl
    from distill.run import labelling, training
    from distill.run.paths import teacher_dir
    from distill.train.xtok import token_byte_table

    heldout = labelling.open_split(cfg, "heldout")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(cfg), dtype=torch.float32, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(teacher_dir(cfg))
    byte_lengths = torch.tensor([len(b) for b in token_byte_table(tok)])  # as the evaluation asset reads them
    results = {}
    for init in inits:
        for seed in seeds:
            models = {}
            for name in variants:
                run = variant(cfg, name, init, seed)
                summary = training.train_student(run, baseline=name == "ce")
                models[name] = AutoModelForCausalLM.from_pretrained(Path(summary["out_dir"]) / "model")
                metrics = evaluate_model(models[name], heldout, cfg.eval, byte_lengths=byte_lengths)
                results[(init, seed, name)] = {
                    "ppl": metrics["ppl"],
                    "bpb": metrics["bpb"],
                    "train_s": summary.get("seconds_this_run") or 0.0,
                    "final_feat": summary.get("final_feat"),
                }
            full = full_distribution_kl(teacher, models, heldout, cfg.eval)
            for name in variants:
                m = results[(init, seed, name)]
                m["kl_full"] = full[name]
                print(
                    f"  {corpus} {init:14s} seed {seed} {name:7s}: kl_full={m['kl_full']:.4f} ppl={m['ppl']:.2f} "
                    f"bpb={m['bpb']:.4f} ({m['train_s']:.0f}s"
                    + (f", final feature loss {m['final_feat']:.3f}" if m["final_feat"] is not None else "")
                    + f"; KL over {full['positions']:,} positions of {full['windows']} windows)",
                    flush=True,
                )
    return results


def labelling_rate(cfg, count: int, repeats: int) -> float:
    """Positions/s of top-k labelling with and without feature capture, interleaved; returns the ratio."""
    from benchmarks.common import corpus_windows
    from distill.run import engines, labelling

    labelling.prepare_teacher(cfg)
    plain_cfg = dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, features=None),
        train=dataclasses.replace(cfg.train, feature_weight=0.0),
    )
    _, ids, starts = corpus_windows(cfg, count)
    positions = sum(len(w) - 1 - s for w, s in zip(ids, starts))
    variants = {"features": (engines.get_engine(cfg), True), "plain": (engines.get_engine(plain_cfg), False)}
    rates = {name: [] for name in variants}
    for engine, features in variants.values():  # warm-up
        list(engine.score(ids[:4], starts[:4], k=cfg.teacher.k, features=features))
    for _ in range(repeats):
        for name, (engine, features) in variants.items():
            t0 = time.perf_counter()
            list(engine.score(ids, starts, k=cfg.teacher.k, features=features))
            rates[name].append(positions / (time.perf_counter() - t0))
    engines.close_engines()
    for name, values in rates.items():
        print(
            f"  {name:8s}: {statistics.median(values):.0f} positions/s ({min(values):.0f}..{max(values):.0f}), "
            f"{positions:,} positions x {repeats}",
            flush=True,
        )
    ratios = [f / p for f, p in zip(rates["features"], rates["plain"])]
    ratio = statistics.median(rates["features"]) / statistics.median(rates["plain"])
    print(f"features_vs_plain_labelling_rate={ratio:.3f} ({min(ratios):.3f}..{max(ratios):.3f} per round)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/features.yaml", "configs/features_stdlib.yaml"])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (every student)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (init and data order)")
    inits = ["teacher_layers", "random"]
    parser.add_argument("--students", nargs="+", default=inits, choices=inits, help="student inits")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="losses to train")
    parser.add_argument("--rate", action="store_true", help="measure the labelling rate with and without capture")
    parser.add_argument("--windows", type=int, default=160, help="--rate: windows labelled per round")
    parser.add_argument("--repeats", type=int, default=3, help="--rate: interleaved rounds")
    args = parser.parse_args()
    if not {"feature", "logit"} <= set(args.variants):
        parser.error("--variants must include feature and logit (the ratios compare them)")

    from distill.config import load_config
    from distill.run import labelling

    write_stdlib_corpus()
    configs = []
    for path in args.configs:
        cfg = load_config(path)
        if cfg.teacher.features is None:
            raise SystemExit(f"{path}: teacher.features is not set (the layers to capture)")
        if args.steps:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
        configs.append((Path(path).stem, cfg))
    if args.rate:
        labelling_rate(configs[0][1], args.windows, args.repeats)
        return
    per_layer = []
    for name, cfg in configs:
        print(f"labelling {name} ({cfg.corpus.source}), features {cfg.teacher.features}", flush=True)
        label(cfg)
        shards = labelling.open_split(cfg, "train") + labelling.open_split(cfg, "heldout")
        cost, positions = feature_bytes(shards)
        per_layer.append(cost)
        print(f"{name}_feature_bytes_per_position_layer={cost:.1f} ({positions:,} positions)", flush=True)
    ratios = []
    for name, cfg in configs:
        f = cfg.teacher.features
        print(
            f"corpus {name}: {cfg.train.steps} steps x {cfg.train.batch_size} windows of {cfg.corpus.window}, "
            f"kd_weight {cfg.train.kd_weight:g}, feature_weight {cfg.train.feature_weight:g} "
            f"({cfg.train.feature_loss}), "
            f"teacher layers {list(f.layers)} at dim {f.dim}",
            flush=True,
        )
        results = compare(cfg, name, args.students, args.seeds, args.variants)
        for init in args.students:
            for metric in ("kl_full", "ppl", "bpb"):
                for other in [v for v in ("logit", "ce") if v in args.variants]:
                    values = [
                        results[(init, s, "feature")][metric] / results[(init, s, other)][metric] for s in args.seeds
                    ]
                    spread = f" ({min(values):.4f}..{max(values):.4f})" if len(values) > 1 else ""
                    print(f"{name}_{init}_feature_vs_{other}_{metric}={statistics.median(values):.4f}{spread}")
            if init == "random":
                ratios += [
                    results[(init, s, "feature")]["kl_full"] / results[(init, s, "logit")]["kl_full"]
                    for s in args.seeds
                ]
    print(f"feature_bytes_per_position_layer={max(per_layer):.1f}")
    if ratios:
        print(f"feature_kd_vs_logit_kd_kl={math.exp(sum(map(math.log, ratios)) / len(ratios)):.4f}")


if __name__ == "__main__":
    main()
