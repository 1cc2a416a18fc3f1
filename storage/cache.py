"""Content-addressed label store.

Every shard is stored under a content key: the hash of everything its labels depend on
(teacher weights, tokenizer, the shard's token content, mode, k, temperature, label-code
version). Labelling a shard whose key is already committed is a cache hit: no teacher work.
Changing any input changes exactly the keys of the shards it affects.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from storage import fs as fsmod
from storage.reader import Shard, ShardError, open_shard
from storage.writer import ShardWriter, record_path


def content_key(fields: Mapping[str, object]) -> str:
    """Stable hex key of a JSON-serializable mapping (order of keys does not matter)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class LabelStore:
    """Shards laid out as ``<root>/<key[:2]>/<key>.parquet`` with ``<key>.json`` commit records.

    ``root`` is a local folder or an object-store URI (``s3://bucket/prefix``; pyarrow URI
    options such as ``?endpoint_override=...`` work).
    """

    def __init__(self, root: str | os.PathLike):
        self.location = str(root)
        self.fs, base = fsmod.resolve(root)
        self.root = Path(base)
        self.is_local = self.fs is None

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.parquet"

    def is_committed(self, key: str) -> bool:
        return fsmod.exists(self.fs, str(record_path(self.path_for(key))))

    def writer(self, key: str, meta, **kwargs) -> ShardWriter:
        return ShardWriter(self.path_for(key), meta, fs=self.fs, store=self.display_location, **kwargs)

    @property
    def display_location(self) -> str:
        """The location as errors name it: a URI's query (which may carry credentials) dropped."""
        return fsmod.display(self.location)

    def open(self, key: str, expect: Mapping[str, object] | None = None, verify_checksum: bool = True) -> Shard:
        """The verified shard under ``key``; a shard whose own cache key differs (copied or
        renamed from another key) is rejected like any other mismatch."""
        expect = {**(expect or {}), "cache_key": key}
        return open_shard(self.path_for(key), expect=expect, verify_checksum=verify_checksum, fs=self.fs)

    def lookup(self, key: str, expect: Mapping[str, object] | None = None) -> Shard | None:
        """The committed, valid shard under ``key``, or None when it must be (re)labelled.

        A shard that fails verification is removed so that relabelling can replace it; a
        transient read error (``OSError``) propagates and removes nothing.
        """
        if not self.is_committed(key):
            return None
        try:
            return self.open(key, expect=expect)
        except ShardError:
            fsmod.delete(self.fs, str(record_path(self.path_for(key))))
            return None


def set_manifest(shards) -> dict:
    """The manifest of a shard set: files, rows, tokens, checksums and metadata, in order."""
    return {
        "shards": [
            {
                "file": str(s.path),
                "rows": s.rows,
                "tokens": s.tokens,
                "bytes": s.record["bytes"],
                "sha256": s.record["sha256"],
                "meta": s.record["meta"],
            }
            for s in shards
        ],
        "rows": sum(s.rows for s in shards),
        "tokens": sum(s.tokens for s in shards),
    }
