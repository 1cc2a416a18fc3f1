"""Crash-safe shard writer.

A shard is committed in two steps, each an atomic rename of a fully written, fsynced file:
first ``<name>.parquet``, then its commit record ``<name>.json`` (size, sha256, rows, tokens,
metadata). Readers accept a shard only when the record exists and the file matches it, so a
crash at any moment leaves either nothing a reader accepts or a whole shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.schema import METADATA_KEY, ROW_GROUP_ROWS, ShardMeta, arrow_schema

RECORD_SUFFIX = ".json"


def record_path(shard_path: str | os.PathLike) -> Path:
    return Path(shard_path).with_suffix(RECORD_SUFFIX)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ShardWriter:
    """Streams rows into one Parquet shard and commits it atomically on ``close()``.

    Use as a context manager: an exception inside the block removes the temporary file and
    commits nothing.
    """

    def __init__(self, path: str | os.PathLike, meta: ShardMeta, row_group_rows: int = ROW_GROUP_ROWS):
        self.path = Path(path)
        if not meta.created:
            meta = dataclasses.replace(meta, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.meta = meta
        self.row_group_rows = row_group_rows
        self.schema = arrow_schema(meta.vocab_size).with_metadata({METADATA_KEY: self.meta.to_json()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._writer = pq.ParquetWriter(
            self._tmp,
            self.schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=["doc_id"],
            write_statistics=["doc_id", "window_index", "label_start"],
        )
        self._buffer: list[Mapping[str, object]] = []
        self.rows = 0
        self.tokens = 0  # labelled positions
        self._closed = False

    def write(self, row: Mapping[str, object]) -> None:
        """Add one window. ``row`` maps every schema column to a value (arrays for list columns)."""
        n = len(row["target_logprobs"])
        expected = len(row["input_ids"]) - 1 - int(row["label_start"])
        if n != expected or len(row["tail_mass"]) != n or len(row["topk_ids"]) != n * self.meta.k:
            raise ValueError(
                f"{self.path.name}: row {row['doc_id']}#{row['window_index']} has inconsistent lengths "
                f"(input_ids={len(row['input_ids'])}, label_start={row['label_start']}, "
                f"target_logprobs={n}, topk_ids={len(row['topk_ids'])}, k={self.meta.k})"
            )
        self._buffer.append(row)
        self.rows += 1
        self.tokens += n
        if len(self._buffer) >= self.row_group_rows:
            self._flush()

    def write_many(self, rows: Iterable[Mapping[str, object]]) -> None:
        for row in rows:
            self.write(row)

    def _flush(self) -> None:
        if not self._buffer:
            return
        cols = {}
        for field in self.schema:
            values = [r[field.name] for r in self._buffer]
            if pa.types.is_list(field.type):
                flat = np.concatenate([np.asarray(v) for v in values]) if values else np.array([])
                offsets = np.zeros(len(values) + 1, dtype=np.int32)
                np.cumsum([len(v) for v in values], out=offsets[1:])
                cols[field.name] = pa.ListArray.from_arrays(
                    pa.array(offsets, pa.int32()), pa.array(flat, field.type.value_type)
                )
            else:
                cols[field.name] = pa.array(values, field.type)
        self._writer.write_table(pa.Table.from_pydict(cols, schema=self.schema))
        self._buffer.clear()

    def close(self) -> dict:
        """Flush, fsync, rename into place, then write the commit record. Returns the record."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer already closed")
        self._flush()
        self._writer.close()
        self._closed = True
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        record = {
            "file": self.path.name,
            "bytes": self._tmp.stat().st_size,
            "sha256": file_sha256(self._tmp),
            "rows": self.rows,
            "tokens": self.tokens,
            "meta": json.loads(self.meta.to_json()),
        }
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        atomic_write_text(record_path(self.path), json.dumps(record, indent=1, sort_keys=True))
        return record

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._writer.close()
            finally:
                self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

