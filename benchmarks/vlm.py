"""Labelling image questions: throughput with images, and what a labelled answer token costs on disk.

    .venv/bin/python benchmarks/vlm.py [--config configs/vlm.yaml] [--windows 128] [--repeats 3]

Run from the repository root. Builds the config's vision-language teacher and its corpus (cached
once built), labels every shard (cache hits once labelled) and reports the stored bytes per
labelled token of the train and held-out shards. Then times the device labeller (``engine.score``,
the labelling path) on the first ``--windows`` questions of ``train-00000`` in two variants on the
same engine, interleaved and repeated: ``images`` (the rows as labelled: image and question) and
``text`` (the same questions and answers with the image left out: the language model alone,
which shows what the vision encoder and the image tokens cost). Prints median (min..max)
questions/s and prompt positions/s of each, and last ``image_vs_text_labelling_rate=``: questions/s
with images over questions/s without, the median of the per-round ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def stored_bytes_per_token(cfg) -> tuple[float, int]:
    """Bytes of the label shards (as stored) per labelled token, and the tokens."""
    from distill.run import labelling

    shards = labelling.open_split(cfg, "train") + labelling.open_split(cfg, "heldout")
    tokens = sum(s.tokens for s in shards)
    return sum(Path(s.path).stat().st_size for s in shards) / tokens, tokens


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/vlm.yaml")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from benchmarks.common import corpus_windows
    from benchmarks.timing import interleave, median, paired_ratios, rates, summary
    from distill.config import load_config
    from distill.data import image_store
    from distill.run import engines, labelling

    cfg = load_config(args.config)
    if not cfg.corpus.images:
        raise SystemExit(f"{args.config}: corpus.image_column is not set (no images to label)")
    info = labelling.prepare_teacher(cfg)
    print(f"teacher {info['architecture']}: {info['path']}", flush=True)
    labelling.prepare_corpus(cfg)
    labelling.label_shards(cfg, cfg.corpus.shard_names())
    per_token, tokens = stored_bytes_per_token(cfg)
    print(f"stored labels: {per_token:.1f} bytes per labelled token ({tokens:,} tokens, k={cfg.teacher.k})")

    windows, ids, starts = corpus_windows(cfg, args.windows)
    store = image_store(cfg.root)
    spans = windows.column("image_span").to_pylist()
    images = [(store.open(h), span) for h, span in zip(windows.column("image").to_pylist(), spans)]
    plain = [w[:s] + w[e:] for w, (s, e, _) in zip(ids, spans)]
    plain_starts = [st - (e - s) for st, (s, e, _) in zip(starts, spans)]
    engine = engines.get_engine(cfg)
    k = cfg.teacher.k
    try:
        list(engine.score(ids[:4], starts[:4], k=k, images=images[:4]))  # warm-up
        list(engine.score(plain[:4], plain_starts[:4], k=k))
        seconds = interleave(
            {
                "images": lambda: list(engine.score(ids, starts, k=k, images=images)),
                "text": lambda: list(engine.score(plain, plain_starts, k=k)),
            },
            args.repeats,
        )
    finally:
        engines.close_engines()
    n = len(ids)
    for name, positions in (("images", sum(map(len, ids))), ("text", sum(map(len, plain)))):
        print(
            f"  {name:6s}: {summary(rates(n, seconds[name]), '.1f')} questions/s, "
            f"{summary(rates(positions, seconds[name]))} prompt positions/s ({positions / n:.1f} per question)",
            flush=True,
        )
    ratios = paired_ratios(rates(n, seconds["images"]), rates(n, seconds["text"]))
    print(f"bytes_per_labelled_token={per_token:.1f}")
    print(f"image_vs_text_labelling_rate={median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f} per round)")


if __name__ == "__main__":
    main()
