"""Setup shared by the benchmarks: the first windows of the demo corpus, and shard metadata."""

from __future__ import annotations


def config_windows_repeats(doc: str, windows: int):
    """The arguments of a benchmark over the first windows of a config's corpus: ``--config``,
    ``--windows`` and ``--repeats`` (interleaved runs of each variant)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--windows", type=int, default=windows)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def corpus_windows(cfg, count: int, shard: str = "train-00000"):
    """(windows table, input id lists, label starts) of the first ``count`` windows of a shard."""
    from distill.data import read_corpus_shard
    from distill.run import labelling, paths

    labelling.prepare_corpus(cfg)
    hashes = paths.teacher_hashes(cfg)
    _, windows = read_corpus_shard(cfg.root, cfg.corpus, hashes["tokenizer"], shard, cfg.teacher.mode)
    windows = windows.slice(0, count)
    return windows, windows.column("input_ids").to_pylist(), windows.column("label_start").to_pylist()


def bench_meta(cfg, k: int, engine_version: str):
    import dataclasses

    from distill.run import labelling, paths
    from distill.teacher.labels import mode_settings
    from storage.schema import ShardMeta

    hashes = paths.teacher_hashes(cfg)
    return ShardMeta(
        teacher=cfg.teacher.model,
        teacher_hash=hashes["weights"],
        tokenizer_hash=hashes["tokenizer"],
        vocab_size=labelling.expected_meta(cfg, "train")["vocab_size"],
        **dataclasses.replace(cfg.teacher, k=k).label_kind("train"),  # the kind the config labels, at k
        temperature=1.0,
        mode=cfg.teacher.mode,
        engine=engine_version,
        data_fingerprint="bench",
        shard="train-00000",
        split="train",
        cache_key="bench",
        code_version="bench",
        settings=mode_settings(cfg.teacher),
    )
