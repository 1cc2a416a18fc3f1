"""Corpus: load documents from any ``datasets`` source, split train/held-out by document,
tokenize with the teacher's tokenizer, cut long documents into overlapping windows and assign
them to shards.

Windows: a document of ``n`` tokens is cut into windows of at most ``window`` tokens starting
every ``stride`` tokens. The label at position ``t`` of a window is the distribution of token
``t + 1``; window ``j > 0`` labels only targets its predecessor did not, so every token after
the document's first is labelled exactly once, with at least ``window - 1 - stride`` tokens of
context beyond the first window.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.configbase import check
from storage.cache import content_key
from storage.writer import atomic_write_text

PYDOC_SOURCE = "pydoc_topics"
CORPUS_MANIFEST = "corpus.json"
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    source: str = PYDOC_SOURCE
    """``pydoc_topics`` (the Python language reference shipped with Python), a hub dataset id, or local json/jsonl/parquet/csv/txt file(s) (comma-separated or a glob)."""
    text_column: str = "text"
    """Column holding the document text."""
    id_column: str | None = None
    """Column holding a stable document id; default: the row index."""
    split: str = "train"
    """Split of the ``datasets`` source to read."""
    max_documents: int | None = None
    """Read at most this many documents (None: all)."""
    heldout_fraction: float = 0.1
    """Fraction of documents held out for evaluation (by a hash of the document id)."""
    window: int = 1024
    """Tokens per window; longer documents are split into several windows."""
    stride: int | None = None
    """Start offset between consecutive windows of a document; default ``window - 1`` (one token of overlap, every token labelled once)."""
    min_tokens: int = 2
    """Documents with fewer tokens (after tokenization) are dropped and counted."""
    train_shards: int = 4
    """Number of train shards (one teacher partition each)."""
    heldout_shards: int = 1
    """Number of held-out shards."""

    def __post_init__(self):
        check(0.0 < self.heldout_fraction < 1.0, "heldout_fraction", self.heldout_fraction, "a number in (0, 1)")
        check(self.window >= 2, "window", self.window, "an integer >= 2")
        check(
            self.stride is None or 1 <= self.stride <= self.window - 1,
            "stride", self.stride, f"None or an integer in [1, window - 1 = {self.window - 1}]",
        )
        check(self.train_shards >= 1, "train_shards", self.train_shards, "an integer >= 1")
        check(self.heldout_shards >= 1, "heldout_shards", self.heldout_shards, "an integer >= 1")
        check(self.min_tokens >= 2, "min_tokens", self.min_tokens, "an integer >= 2")
        check(self.max_documents is None or self.max_documents >= 2, "max_documents", self.max_documents, "None or >= 2")

    @property
    def effective_stride(self) -> int:
        return self.stride if self.stride is not None else self.window - 1

    def shard_names(self) -> list[str]:
        return [f"train-{i:05d}" for i in range(self.train_shards)] + [
            f"heldout-{i:05d}" for i in range(self.heldout_shards)
        ]


class CorpusError(ValueError):
    """The dataset cannot be used: missing column, non-text values..."""


def _hash_unit(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _local_files(source: str) -> list[str] | None:
    """Local files named by ``source`` (comma-separated paths or globs), or None for a hub id."""
    import glob

    names = [s.strip() for s in source.split(",")]
    files: list[str] = []
    for name in names:
        matches = sorted(glob.glob(str(Path(name).expanduser())))
        if matches:
            files += matches
        elif len(names) == 1 and not Path(name).suffix and not name.startswith((".", "/", "~")):
            return None
        else:
            raise CorpusError(f"{name}: no such file (corpus.source)")
    return files


def load_documents(cfg: CorpusConfig) -> Iterator[tuple[str, object]]:
    """Yield ``(doc_id, text)`` pairs; ``text`` is whatever the column holds (checked later)."""
    if cfg.source == PYDOC_SOURCE:
        from pydoc_data.topics import topics

        items = sorted(topics.items())
        yield from items[: cfg.max_documents]
        return
    import datasets

    files = _local_files(cfg.source)
    if files is not None:
        ext = Path(files[0]).suffix.lstrip(".").lower()
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "txt": "text", "text": "text"}.get(ext)
        if builder is None:
            raise CorpusError(f"{files[0]}: unsupported file type {ext!r}; use json, jsonl, parquet, csv or txt")
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    else:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    for col in [cfg.text_column] + ([cfg.id_column] if cfg.id_column else []):
        if col not in ds.column_names:
            raise CorpusError(f"{cfg.source}: no column {col!r}; columns are {ds.column_names} (set corpus.text_column / corpus.id_column)")
    n = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    for i in range(n):
        row = ds[i]
        doc_id = str(row[cfg.id_column]) if cfg.id_column else f"row-{i:09d}"
        yield doc_id, row[cfg.text_column]


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, label_start)`` for each window of a document of ``n_tokens`` tokens."""
    out = []
    start, last_target = 0, 0  # last_target: absolute index of the last labelled target token
    while True:
        end = min(start + window, n_tokens)
        # position t predicts absolute token start + t + 1; label those beyond last_target
        label_start = max(0, last_target - start)
        out.append((start, end, label_start))
        last_target = end - 1
        if end >= n_tokens:
            return out
        start += stride


def corpus_dir(root: Path, cfg: CorpusConfig, tokenizer_hash: str) -> Path:
    key = content_key({"corpus": dataclasses.asdict(cfg), "tokenizer": tokenizer_hash, "v": 1})
    return Path(root) / "corpus" / key


def build_corpus(cfg: CorpusConfig, tokenizer, tokenizer_hash: str, root: Path, batch_docs: int = 256) -> dict:
    """Read, tokenize and shard the corpus under ``corpus_dir``; return its manifest.

    Always re-reads the source (the data may have changed); shard files are replaced
    atomically and the manifest is written last. Shard fingerprints depend only on content,
    so unchanged shards keep their teacher-label cache keys.
    """
    out = corpus_dir(root, cfg, tokenizer_hash)
    manifest_path = out / CORPUS_MANIFEST
    stride = cfg.effective_stride
    docs: list[tuple[str, str]] = []
    counts = {"documents_read": 0, "dropped_empty": 0, "dropped_short": 0, "dropped_duplicate_id": 0}
    seen: set[str] = set()
    for doc_id, text in load_documents(cfg):
        counts["documents_read"] += 1
        if text is None:
            counts["dropped_empty"] += 1
            continue
        if not isinstance(text, str):
            raise CorpusError(
                f"{cfg.source}: document {doc_id} has a {type(text).__name__} in column {cfg.text_column!r}, expected text"
            )
        if not text.strip():
            counts["dropped_empty"] += 1
            continue
        if doc_id in seen:
            counts["dropped_duplicate_id"] += 1
            continue
        seen.add(doc_id)
        docs.append((doc_id, text))
    if not docs:
        raise CorpusError(f"{cfg.source}: no non-empty documents in column {cfg.text_column!r}")
    # split by document: a hash of the id, so adding or editing one document moves no other
    heldout = {d for d, _ in docs if _hash_unit(d, "split") < cfg.heldout_fraction}
    if not heldout:
        heldout = {min(docs, key=lambda d: _hash_unit(d[0], "split"))[0]}
    if len(heldout) == len(docs):
        raise CorpusError(f"{cfg.source}: only {len(docs)} document(s); need at least 2 to split train/held-out")
    shards: dict[str, list[dict]] = {name: [] for name in cfg.shard_names()}
    for b in range(0, len(docs), batch_docs):
        batch = docs[b : b + batch_docs]
        encoded = tokenizer([t for _, t in batch])["input_ids"]
        for (doc_id, _), ids in zip(batch, encoded):
            if len(ids) < cfg.min_tokens:
                counts["dropped_short"] += 1
                continue
            split = "heldout" if doc_id in heldout else "train"
            n = cfg.heldout_shards if split == "heldout" else cfg.train_shards
            shard = f"{split}-{int(_hash_unit(doc_id, 'shard') * n):05d}"
            for w, (start, end, label_start) in enumerate(windows(len(ids), cfg.window, stride)):
                shards[shard].append(
                    {"doc_id": doc_id, "window_index": w, "input_ids": ids[start:end], "label_start": label_start}
                )
    out.mkdir(parents=True, exist_ok=True)
    shard_info = {}
    for name, rows in shards.items():
        rows.sort(key=lambda r: (r["doc_id"], r["window_index"]))
        table = pa.table(
            {
                "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
                "window_index": pa.array([r["window_index"] for r in rows], pa.int32()),
                "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
                "label_start": pa.array([r["label_start"] for r in rows], pa.int32()),
            }
        )
        h = hashlib.sha256(tokenizer_hash.encode())
        for r in rows:
            h.update(f"{r['doc_id']}\x1f{r['window_index']}\x1f{r['label_start']}\x1f".encode())
            h.update(np.asarray(r["input_ids"], np.int64).tobytes())
        path = out / f"{name}.parquet"
        tmp = out / f".{name}.parquet.tmp-{os.getpid()}"
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
        shard_info[name] = {
            "file": path.name,
            "fingerprint": h.hexdigest()[:32],
            "windows": len(rows),
            "documents": len({r["doc_id"] for r in rows}),
            "labelled_tokens": int(sum(len(r["input_ids"]) - 1 - r["label_start"] for r in rows)),
        }
    manifest = {
        "source": cfg.source,
        "config": dataclasses.asdict(cfg),
        "tokenizer_hash": tokenizer_hash,
        "documents": len(docs) - counts["dropped_short"],
        "heldout_documents": len(heldout),
        **counts,
        "shards": shard_info,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_corpus_shard(root: Path, cfg: CorpusConfig, tokenizer_hash: str, shard: str) -> tuple[dict, pa.Table]:
    """The manifest entry and the windows of one corpus shard; errors say to materialize the corpus."""
    out = corpus_dir(root, cfg, tokenizer_hash)
    manifest_path = out / CORPUS_MANIFEST
    if not manifest_path.exists():
        raise CorpusError(f"{manifest_path}: corpus not built for this config; materialize the corpus asset first")
    manifest = json.loads(manifest_path.read_text())
    if shard not in manifest["shards"]:
        raise CorpusError(f"{manifest_path}: no shard {shard!r}; shards are {sorted(manifest['shards'])}")
    entry = manifest["shards"][shard]
    return entry, pq.read_table(out / entry["file"])
