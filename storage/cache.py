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

from storage.reader import Shard, ShardError, open_shard
from storage.writer import record_path


def content_key(fields: Mapping[str, object]) -> str:
    """Stable hex key of a JSON-serializable mapping (order of keys does not matter)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class LabelStore:
    """Shards laid out as ``<root>/<key[:2]>/<key>.parquet`` with ``<key>.json`` commit records."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.parquet"

    def is_committed(self, key: str) -> bool:
        return record_path(self.path_for(key)).exists()

    def open(self, key: str, expect: Mapping[str, object] | None = None, verify_checksum: bool = True) -> Shard:
        return open_shard(self.path_for(key), expect=expect, verify_checksum=verify_checksum)

    def lookup(self, key: str, expect: Mapping[str, object] | None = None) -> Shard | None:
        """The committed, valid shard under ``key``, or None when it must be (re)labelled.

        A shard that fails verification is removed so that relabelling can replace it.
        """
        if not self.is_committed(key):
            return None
        try:
            return self.open(key, expect=expect)
        except ShardError:
            record_path(self.path_for(key)).unlink(missing_ok=True)
            return None
