"""Adaptive KD (AKL, Wu et al., COLING 2025) against the fixed mix at equal steps, on two corpora.

    .venv/bin/python benchmarks/adaptive.py [--configs configs/demo.yaml configs/adaptive_stdlib.yaml]
    .venv/bin/python benchmarks/adaptive.py --label-only   # build and label the corpora, train nothing

Run from the repository root. For each config: build the corpus (the standard-library docstring
corpus is written to ``data/corpora/stdlib_docstrings.jsonl`` first), label it with the config's
teacher (cache hits once labelled; the bundled teacher runs at a few hundred tokens/s on a CPU),
then train two students that differ only in ``train.divergence``: ``forward_kl`` (the fixed mix,
the default) and ``akl`` (same ``kd_weight``, steps, data order, seed, lr, ``tail``), through
``training.train_student`` (students are cached under ``data/students`` by config and training
code, so a rerun with unchanged code only evaluates). Both are evaluated on the held-out shards
with ``evaluate_model``: KL(teacher || student) over the teacher's top-k plus a tail bucket, and
perplexity.

Prints, per corpus, held-out KL and perplexity of both and their ratios
(``<corpus>_akl_vs_fixed_heldout_kl=``, ``<corpus>_akl_vs_fixed_ppl=``); the last line is
``akl_vs_fixed_heldout_kl=``, the geometric mean of the per-corpus KL ratios (below 1: AKL closer
to the teacher).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

STDLIB_JSONL = Path("data/corpora/stdlib_docstrings.jsonl")
# packages left out: tests, GUI demos, vendored tools, and pydoc_data (the demo corpus itself)
_SKIP = {
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "turtledemo",
    "tkinter",
    "ensurepip",
    "venv",
    "__pycache__",
}
MAX_CHARS = 2500  # per document: ~135k SmolLM2 tokens over ~280 modules


def stdlib_documents(max_chars: int = MAX_CHARS) -> list[dict]:
    """One document per standard-library module: its module, class and function docstrings (those of
    80 characters or more), in source order, cut at ``max_chars`` on a paragraph boundary; modules
    with less than 400 characters of docstrings are left out. Deterministic for a Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib)
        if any(part in _SKIP or part.startswith(("test", "config-")) for part in rel.parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    parts.append(doc if isinstance(node, ast.Module) else f"{node.name}: {doc}")
        text = "\n\n".join(parts)
        if len(text) > max_chars:
            cut = text.rfind("\n\n", 0, max_chars)
            text = text[: cut if cut > max_chars // 2 else max_chars]
        if len(text) >= 400:
            docs.append({"id": ".".join(rel.with_suffix("").parts), "text": text})
    return docs


def write_stdlib_corpus(path: Path = STDLIB_JSONL) -> Path:
    """Write the docstring corpus as JSONL (``id``, ``text``) unless it is already there."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in stdlib_documents()))
        tmp.replace(path)
    return path


def label(cfg) -> None:
    from distill.run import engines, labelling

    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    t0 = time.perf_counter()
    results = labelling.label_shards(cfg, cfg.corpus.shard_names())
    engines.close_engines()
    hits = sum(1 for r in results.values() if r.get("cache_hit"))
    tokens = sum(int(r.get("tokens", 0)) for r in results.values())
    print(
        f"  labels: {len(results)} shards ({hits} cached), {tokens:,} labelled tokens, {time.perf_counter() - t0:.0f}s",
        flush=True,
    )


def compare(cfg, name: str) -> dict:
    """Train the fixed mix and AKL at equal steps; held-out KL and perplexity of both."""
    from transformers import AutoModelForCausalLM

    from distill.eval.evaluation import evaluate_model
    from distill.run import labelling, training

    train_shards, heldout = labelling.open_split(cfg, "train"), labelling.open_split(cfg, "heldout")
    print(
        f"corpus {name}: {sum(s.tokens for s in train_shards):,} labelled train tokens, "
        f"{sum(s.tokens for s in heldout):,} held-out; "
        f"window {cfg.corpus.window}, {cfg.train.steps} steps x {cfg.train.batch_size * cfg.train.grad_accum} windows, "
        f"lr {cfg.train.lr:g}, kd_weight {cfg.train.kd_weight:g}, tail {cfg.train.tail}",
        flush=True,
    )
    out = {}
    for variant, divergence in (("fixed", "forward_kl"), ("akl", "akl")):
        run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, divergence=divergence, progress=False))
        summary = training.train_student(run)
        model = AutoModelForCausalLM.from_pretrained(Path(summary["out_dir"]) / "model")
        metrics = evaluate_model(model, heldout, cfg.eval)
        out[variant] = {
            "kl": metrics["kl"],
            "ppl": metrics["ppl"],
            "top1": metrics["top1"],
            "positions": metrics["positions"],
            "train_tokens": summary.get("labelled_tokens_this_run"),
            "train_s": summary.get("seconds_this_run"),
            "reused": summary.get("reused"),
        }
        extra = f", mu {run.train.akl_mu:g}" if divergence == "akl" else ""
        print(
            f"  {variant:5s} ({divergence}{extra}): heldout_kl={metrics['kl']:.4f} ppl={metrics['ppl']:.3f} "
            f"top1={metrics['top1']:.4f} "
            f"({metrics['positions']:,} held-out positions; trained on {out[variant]['train_tokens']:,} tokens in "
            f"{out[variant]['train_s'] or 0:.0f}s{', reused' if summary.get('reused') else ''})",
            flush=True,
        )
    out["kl_ratio"] = out["akl"]["kl"] / out["fixed"]["kl"]
    out["ppl_ratio"] = out["akl"]["ppl"] / out["fixed"]["ppl"]
    print(f"{name}_akl_vs_fixed_heldout_kl={out['kl_ratio']:.4f}")
    print(f"{name}_akl_vs_fixed_ppl={out['ppl_ratio']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/demo.yaml", "configs/adaptive_stdlib.yaml"])
    parser.add_argument("--label-only", action="store_true", help="build and label the corpora, train nothing")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (both variants)")
    args = parser.parse_args()

    from distill.config import load_config

    write_stdlib_corpus()
    configs = []
    for path in args.configs:
        cfg = load_config(path)
        if args.steps:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
        configs.append((Path(path).stem, cfg))
    for name, cfg in configs:
        print(f"labelling {name} ({cfg.corpus.source})", flush=True)
        label(cfg)
    if args.label_only:
        return
    ratios = [compare(cfg, name)["kl_ratio"] for name, cfg in configs]
    print(f"akl_vs_fixed_heldout_kl={math.exp(sum(map(math.log, ratios)) / len(ratios)):.4f}")


if __name__ == "__main__":
    main()
