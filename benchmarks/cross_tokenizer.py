"""A student with its own tokenizer, distilled from the teacher's stored top-k, against its
CE-only baseline (same tokenizer, model, steps, data order and seed).

    .venv/bin/python benchmarks/cross_tokenizer.py [--config configs/cross_tokenizer.yaml] [--steps N]

Run from the repository root. Labels the config's corpus with its teacher (cache hits once the
demo ran), trains the student's BPE tokenizer once, then trains three students through
``training.train_student``: ``uld`` and ``span_kl`` (``train.cross_tokenizer_loss``) and the
CE-only baseline. Each is evaluated on the held-out windows with ``evaluate_model`` (bits per
byte of the held-out text, perplexity over its own tokens, span KL to the teacher at aligned
positions) and on the multiple-choice file; the teacher's bits per byte come from its stored
labels. The last line is ``xtok_kd_vs_ce_bpb=``: the better KD student's bits per byte over the
baseline's (below 1: distillation across tokenizers helps).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cross_tokenizer.yaml")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import load_config
    from distill.data import load_mc
    from distill.eval.choice import mc_accuracy
    from distill.eval.evaluation import evaluate_model
    from distill.eval.stored import teacher_metrics
    from distill.run import engines, labelling, tokenizing, training
    from distill.train.xtok import token_byte_table

    cfg = load_config(args.config)
    train = dataclasses.replace(cfg.train, progress=False, **({"steps": args.steps} if args.steps else {}))
    cfg = dataclasses.replace(cfg, train=train)
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    labelling.label_shards(cfg, cfg.corpus.shard_names())
    engines.close_engines()
    vocab, cross = tokenizing.student_tokens(cfg)
    print(
        f"student tokenizer: {vocab} ids; {cross.matched_fraction:.2%} of the teacher's ids have a byte-identical "
        "student token",
        flush=True,
    )
    heldout = labelling.open_split(cfg, "heldout")
    lengths = torch.tensor([len(b) for b in token_byte_table(tokenizing.teacher_tokenizer(cfg))])
    teacher = teacher_metrics(heldout, cfg.eval, byte_lengths=lengths)
    print(
        f"teacher: bpb={teacher['bpb']:.4f} ppl={teacher['ppl']:.3f} (its own tokens, from stored labels)", flush=True
    )
    items = load_mc(cfg.eval.mc_file) if cfg.eval.mc_file else None
    bpb = {}
    runs = {
        "uld": (dataclasses.replace(cfg, train=dataclasses.replace(train, cross_tokenizer_loss="uld")), False),
        "span_kl": (dataclasses.replace(cfg, train=dataclasses.replace(train, cross_tokenizer_loss="span_kl")), False),
        "ce_baseline": (cfg, True),
    }
    for name, (run, baseline) in runs.items():
        summary = training.train_student(run, baseline=baseline)
        model = AutoModelForCausalLM.from_pretrained(Path(summary["out_dir"]) / "model")
        m = evaluate_model(model, heldout, cfg.eval, cross=cross)
        mc = (
            mc_accuracy(model, cross.tokenizer, items, cfg.eval.mc_length_normalize, cfg.eval.batch_size)["mc_accuracy"]
            if items
            else float("nan")
        )
        bpb[name] = m["bpb"]
        how = "reused" if summary.get("reused") else f"trained in {summary.get('seconds_this_run') or 0:.0f}s"
        print(
            f"{name}: bpb={m['bpb']:.4f} ppl={m['ppl']:.3f} span_kl_to_teacher={m['kl']:.4f} "
            f"top1_vs_teacher={m['top1']:.4f} "
            f"mc_accuracy={mc:.3f} ({m['aligned_positions']:,} of {m['positions']:,} positions aligned; {how})",
            flush=True,
        )
    print(f"xtok_kd_vs_ce_bpb={min(bpb['uld'], bpb['span_kl']) / bpb['ce_baseline']:.4f}")


if __name__ == "__main__":
    main()
