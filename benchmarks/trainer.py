"""Trainer benchmark on the demo setting (bundled teacher's labels, 4-layer student cut from it).

    .venv/bin/python benchmarks/trainer.py [--config configs/demo.yaml]

Prints, measured in this run:
- docs_per_batch: mean distinct documents in a training batch (with the config's shuffle buffer; without it, for scale)
- loader_overhead: time to stream one batch from the Parquet shards (with the shuffle buffer, averaged over two
  buffer refills, so the refill cost is amortized as in training) / the time of a KD training step on it
- kd_step_vs_ce_step: a top-k KD + CE step / a CE-only step (median over rounds, spread min..max)
- offline_vs_online_kd_step: our offline KD step / an online KD step running the teacher forward in the loop
  (every step is the trainer's own ``DistillRecipe.step``, on a recipe per variant set up with the
  variant's config; the variants alternate their order from round to round, and each ratio is
  taken within a round)
- topk_vs_full_kd_gap_closed: at equal steps, (KL_ce - KL_topk) / (KL_ce - KL_full_online) on held-out data;
  the full-vocabulary reference is trained by ``distill.train.trainer.train`` with an online teacher, so it
  shares every setting of the other students (grad_accum, clipping, temperature, precision, seeding,
  data order) and differs only in its labels
- sampled_vs_full_kd_gap_closed: the same share for a student trained on sampled labels (``teacher.labels: sampled``)
- sampled_bytes_per_token / topk_bytes_per_token: train-shard bytes per labelled token of either kind
- sampled_minus_topk_ece: ECE of the sampled-label student minus the top-k one, with a 95% paired
  bootstrap interval over held-out windows (the same for full-vocabulary KD, and the teacher's own ECE)
  (KL here is to the teacher's full distribution, from a transformers forward on the held-out windows;
  ECE and perplexity of each student are printed too; ``--quality 0`` skips all of it)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, for the imports below

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from benchmarks.timing import interleave, paired_ratios  # noqa: E402
from benchmarks.timing import summary as median_spread  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.eval.evaluation import evaluate_model  # noqa: E402
from distill.eval.full_kl import full_distribution_kl as full_kl  # noqa: E402
from distill.eval.metrics import ece_bins, expected_calibration_error  # noqa: E402
from distill.run import engines, labelling, paths, tokenizing, training  # noqa: E402
from distill.train.trainer import DistillRecipe, batches, train  # noqa: E402
from storage.reader import ShardStream, StreamPosition  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--timing-steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quality", type=int, default=1, help="0: skip the equal-steps quality comparison (trains four students)"
    )
    parser.add_argument(
        "--draws", type=int, default=None, help="sampled labels: draws per position (default: the config's)"
    )
    parser.add_argument(
        "--proposal-k",
        type=int,
        default=None,
        help="sampled labels: top-K' the draws come from (default: the config's)",
    )
    parser.add_argument(
        "--sampler", default=None, help="sampled labels: systematic or multinomial (default: the config's)"
    )
    parser.add_argument(
        "--sample-seed", type=int, default=None, help="sampled labels: the draws' base seed (default: the config's)"
    )
    args = parser.parse_args()

    cfg = load_config(args.config)
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    names = cfg.corpus.shard_names()
    labelling.label_shards(cfg, names)  # cache hits when the demo already ran
    engines.close_engines()
    train_shards, heldout = labelling.open_split(cfg, "train"), labelling.open_split(cfg, "heldout")
    teacher_dir = paths.teacher_dir(cfg)
    vocab = len(tokenizing.teacher_tokenizer(cfg))
    k = train_shards[0].meta.slots
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = (
        AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True).to(device).eval()
    )

    def recipe(train_cfg, online_teacher=None) -> DistillRecipe:
        """The trainer's recipe for one variant with its student and optimizer set up (no data
        stream, no checkpoints: the variants step on the same preloaded batches)."""
        r = DistillRecipe(cfg.student, train_cfg, teacher_dir, train_shards, scratch, vocab, teacher=online_teacher)
        r.setup_processes()
        r.setup_model()
        return r

    # CE only (the baseline's train section), top-k KD and online KD (the student's)
    scratch = Path(tempfile.mkdtemp(prefix="trainer-benchmark-"))  # written to by nothing the timing runs
    recipes = {"ce": recipe(cfg.baseline_train), "kd": recipe(cfg.train), "online": recipe(cfg.train, teacher)}
    n = args.timing_steps
    buffer = cfg.train.shuffle_buffer

    def docs_per_batch(shuffle_buffer, count=50):
        stream = ShardStream(train_shards, seed=cfg.train.seed, shuffle_buffer=shuffle_buffer)
        return statistics.mean(
            len({doc for doc, _ in b["row_ids"]})
            for (b, _), _ in zip(
                batches(stream, cfg.train.batch_size, k, StreamPosition(), with_ids=True), range(count)
            )
        )

    docs = {"buffer": docs_per_batch(buffer), "row_group_only": docs_per_batch(0)}
    preloaded = [
        b
        for b, _ in zip(
            (
                b
                for b, _ in batches(
                    ShardStream(train_shards, seed=1, shuffle_buffer=buffer), cfg.train.batch_size, k, StreamPosition()
                )
            ),
            range(n),
        )
    ]
    for r in recipes.values():  # warm-up: first kernels, the optimizer's state
        r.step(preloaded[:1])

    loader_batches = max(n, 2 * buffer // cfg.train.batch_size)

    def run_streamed():
        for _ in zip(
            batches(
                ShardStream(train_shards, seed=1, shuffle_buffer=buffer), cfg.train.batch_size, k, StreamPosition()
            ),
            range(loader_batches),
        ):
            pass

    def run_preloaded(mode="kd"):
        for b in preloaded:
            recipes[mode].step([b])  # one optimizer step of the trainer on one micro-batch

    # interleaved, the order reversed every other round; each ratio within a round, then its median and spread
    results = interleave(
        {
            "stream": run_streamed,
            "ce": lambda: run_preloaded("ce"),
            "kd": lambda: run_preloaded("kd"),
            "online": lambda: run_preloaded("online"),
        },
        args.rounds,
    )
    med = {key: statistics.median(v) for key, v in results.items()}
    ratios = {
        "loader_overhead": paired_ratios(
            [s / loader_batches for s in results["stream"]], [kd / n for kd in results["kd"]]
        ),
        "kd_step_vs_ce_step": paired_ratios(results["kd"], results["ce"]),
        "offline_vs_online_kd_step": paired_ratios(results["kd"], results["online"]),
    }

    print(
        f"step seconds (median of {args.rounds} rounds x {n} steps, order alternating): "
        + ", ".join(f"{k}={v / n:.3f}" for k, v in med.items() if k != "stream")
        + f"; streaming one batch: {med['stream'] / loader_batches:.4f}s"
    )
    for name, values in ratios.items():
        fmt = ".4f" if name == "loader_overhead" else ".3f"  # the loader's share is ~0.001
        print(f"{name}: {median_spread(values, fmt)} ({', '.join(f'{v:{fmt}}' for v in values)})")
    print(
        f"distinct documents per batch of {cfg.train.batch_size}: {docs['buffer']:.2f} with a {buffer}-window buffer, "
        f"{docs['row_group_only']:.2f} mixing one row group"
    )
    print(f"docs_per_batch={docs['buffer']:.2f}")
    print(f"loader_overhead={statistics.median(ratios['loader_overhead']):.4f}")
    print(f"kd_step_vs_ce_step={statistics.median(ratios['kd_step_vs_ce_step']):.3f}")
    print(f"offline_vs_online_kd_step={statistics.median(ratios['offline_vs_online_kd_step']):.3f}")
    recipes.clear()  # the timing students and their optimizers
    shutil.rmtree(scratch, ignore_errors=True)
    if not args.quality:
        return

    # quality at equal steps, forward KL: CE-only, top-k KD (the demo's students), sampled-label
    # KD and online full-vocab KD
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, divergence="forward_kl"))
    ce_summary = training.train_student(cfg, baseline=True)
    topk_summary = training.train_student(cfg, baseline=False)
    chosen = {"draws": args.draws, "proposal_k": args.proposal_k, "sampler": args.sampler, "seed": args.sample_seed}
    sampled = dataclasses.replace(cfg.teacher.sampled_labels, **{f: v for f, v in chosen.items() if v is not None})
    sampled_cfg = dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, labels="sampled", sampled_labels=sampled)
    )
    labelling.label_shards(sampled_cfg, [n for n in names if n.startswith("train")])
    engines.close_engines()
    sampled_shards = labelling.open_split(sampled_cfg, "train")
    sampled_summary = training.train_student(sampled_cfg, baseline=False)
    # the full-vocabulary reference: the same trainer, config, shards and seed as the top-k student,
    # with the teacher's whole distribution computed in the loop instead of the stored labels
    student_vocab, cross = tokenizing.student_tokens(cfg)
    if cross is not None:
        raise SystemExit(
            f"{args.config}: the full-vocabulary reference needs a student that shares the teacher's tokenizer "
            "(student.tokenizer is set)"
        )
    online_dir = Path(tempfile.mkdtemp(prefix="online-reference-"))
    try:
        cfg_online = dataclasses.replace(cfg.train, progress=False)
        online_summary = train(
            cfg.student, cfg_online, teacher_dir, train_shards, online_dir, student_vocab, teacher=teacher
        )
        online_seconds = online_summary["seconds_this_run"]
        students = {
            name: AutoModelForCausalLM.from_pretrained(Path(summary["out_dir"]) / "model", use_safetensors=True).eval()
            for name, summary in (
                ("ce", ce_summary),
                ("topk", topk_summary),
                ("sampled", sampled_summary),
                ("full", {"out_dir": online_dir}),
            )
        }
    finally:
        shutil.rmtree(online_dir, ignore_errors=True)
    teacher = teacher.cpu()
    metrics = {name: evaluate_model(model, heldout, cfg.eval) for name, model in students.items()}
    kl, bins = full_distribution_kl(teacher, students, heldout, cfg.eval)
    gap = {name: (kl["ce"] - kl[name]) / (kl["ce"] - kl["full"]) for name in ("topk", "sampled")}
    size = {
        name: sum(sh.record["bytes"] for sh in shards) / sum(sh.tokens for sh in shards)
        for name, shards in (("topk", train_shards), ("sampled", sampled_shards))
    }
    draws = sampled_cfg.teacher.sampled_labels

    print(
        f"held-out, after {cfg.train.steps} steps (online run {online_seconds:.0f}s); KL to the teacher's full "
        "distribution:"
    )
    for name in students:
        m = metrics[name]
        print(
            f"  {name:8s} KL_full={kl[name]:.4f} KL_stored_topk={m['kl']:.4f} ppl={m['ppl']:.2f} ECE={m['ece']:.4f} "
            f"top1={m['top1']:.4f}"
        )
    teacher_ece = expected_calibration_error({key: v.sum(0) for key, v in bins["teacher"].items()})
    print(f"  teacher  ECE={float(teacher_ece):.4f} (its own top-1 on the same positions)")
    ece_diff = {name: ece_interval(bins, name, "topk") for name in ("sampled", "full")}
    for name, (d, low, high) in ece_diff.items():
        print(
            f"ECE {name} - ECE topk = {d:+.4f} (95% paired bootstrap over held-out windows: {low:+.4f} .. {high:+.4f})"
        )
    print(
        f"sampled labels: {draws.draws} {draws.sampler} draws from top-{draws.proposal_k} + tail, seed {draws.seed}; "
        f"top-k: k={k}"
    )
    print(f"topk_bytes_per_token={size['topk']:.2f}")
    print(f"sampled_bytes_per_token={size['sampled']:.2f}")
    print(f"topk_vs_full_kd_gap_closed={gap['topk']:.3f}")
    print(f"sampled_minus_topk_ece={ece_diff['sampled'][0]:.4f}")
    print(f"sampled_vs_full_kd_gap_closed={gap['sampled']:.3f}")


def full_distribution_kl(teacher, students: dict, shards, eval_cfg) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Mean KL(teacher's full softmax || student) over every held-out labelled position (up to
    ``eval.max_windows`` windows), by ``distill.eval.full_kl.full_distribution_kl``; and per window,
    each model's ECE bin sums (``ece_bins``, each (windows, bins)), the teacher's included, for
    ``ece_interval``."""
    bins: dict[str, list] = {name: [] for name in ("teacher", *students)}

    def window_bins(name, log_probs, targets):
        top_lp, top_id = log_probs.max(-1)
        bins[name].append(ece_bins(top_lp.exp().double(), (top_id == targets).double()))

    every = dataclasses.replace(eval_cfg, full_kl_windows=eval_cfg.max_windows or 2**62)
    kl = full_kl(teacher, students, shards, every, on_window=window_bins)
    return (
        {name: kl[name] for name in students},
        {name: {key: torch.stack([w[key] for w in b]) for key in b[0]} for name, b in bins.items()},
    )


def ece_interval(
    bins: dict[str, dict], a: str, b: str, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """ECE(a) - ECE(b) on the held-out windows and its 95% paired bootstrap interval (windows
    resampled with replacement, the same resample for both models)."""
    ece = expected_calibration_error
    windows = len(bins[a]["bin_count"])
    weights = torch.from_numpy(
        np.random.default_rng(seed).multinomial(windows, [1 / windows] * windows, size=resamples)
    ).double()
    resampled = {name: {key: weights @ v for key, v in bins[name].items()} for name in (a, b)}
    diff = ece(resampled[a]) - ece(resampled[b])
    low, high = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    whole = {name: {key: v.sum(0) for key, v in bins[name].items()} for name in (a, b)}
    return float(ece(whole[a]) - ece(whole[b])), low, high


if __name__ == "__main__":
    main()
