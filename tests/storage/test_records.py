"""Commit records are plain JSON anyone can edit or copy: readers trust the Parquet footer
(covered by the checksum) and accept a record only when it agrees with it, and a store accepts
a shard only under its own cache key."""

from __future__ import annotations

import json

import pytest

from storage.cache import LabelStore
from storage.reader import ShardError, open_shard
from storage.writer import folder_lock, record_path
from tests.conftest import REPO
from tests.storage.test_shards import make_meta, make_rows


def _store_with(tmp_path, *keys, rows=12):
    store = LabelStore(tmp_path / "labels")
    for i, key in enumerate(keys):
        with store.writer(key, make_meta(cache_key=key)) as w:
            w.write_many(make_rows(rows + i, 49152, 4, seed=i))
    return store


def _edit_record(path, **changes):
    rec = record_path(path)
    data = json.loads(rec.read_text())
    rec.write_text(json.dumps({**data, **changes}))
    return data


def test_counts_come_from_the_footer_and_must_match_the_record(tmp_path):
    store = _store_with(tmp_path, "k1")
    shard = store.open("k1")
    assert shard.rows == 12 and shard.tokens == shard.record["tokens"] > 0
    original = _edit_record(store.path_for("k1"), rows=0, tokens=0)
    with pytest.raises(
        ShardError, match=r"k1\.json: field 'rows' is 0 but the file holds 12 \(edited or foreign commit record\)"
    ):
        store.open("k1")
    _edit_record(store.path_for("k1"), rows=12, tokens=original["tokens"] + 1)
    with pytest.raises(ShardError, match="field 'tokens'"):
        store.open("k1")
    _edit_record(store.path_for("k1"), tokens=original["tokens"], meta={**original["meta"], "kind_params": {"k": 8}})
    with pytest.raises(ShardError, match=r"metadata field\(s\) \['kind_params'\] differ from the file's footer"):
        store.open("k1")
    _edit_record(store.path_for("k1"), **original)
    assert store.open("k1").rows == 12  # restored record: accepted again


@pytest.mark.parametrize("text", ["[1, 2]", "5", '"x"', '{"bytes": 1}', "\xff\xfe"])
def test_record_that_is_not_a_commit_record_is_named(tmp_path, text):
    store = _store_with(tmp_path, "k1")
    record_path(store.path_for("k1")).write_bytes(text.encode("latin-1"))
    with pytest.raises(ShardError, match=r"k1\.json: (not a commit record|unreadable commit record)"):
        open_shard(store.path_for("k1"))


def test_shard_copied_under_another_key_is_rejected_and_lookup_relabels(tmp_path):
    store = _store_with(tmp_path, "k1", "k2")
    for src, dst in ((store.path_for("k1"), store.path_for("k2")),):
        dst.write_bytes(src.read_bytes())
        record_path(dst).write_bytes(record_path(src).read_bytes())
    with pytest.raises(ShardError, match=r"field 'cache_key' is 'k1' but the run expects 'k2'"):
        store.open("k2")
    assert open_shard(store.path_for("k2")).meta.cache_key == "k1"  # a bare path has no key to check
    assert store.lookup("k2") is None and not store.is_committed("k2")  # will be relabelled
    assert store.lookup("k1") is not None


def test_lookup_keeps_the_record_on_a_transient_read_error(tmp_path, monkeypatch):
    store = _store_with(tmp_path, "k1")
    import storage.reader

    def flaky(*args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(storage.reader, "_sha256", flaky)  # a fault we cannot cause for real on local disk
    with pytest.raises(OSError):
        store.lookup("k1")
    assert store.is_committed("k1")


def test_folder_lock_serializes_and_is_released_by_a_dead_holder(tmp_path):
    import subprocess
    import sys
    import threading

    folder = tmp_path / "student"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from storage.writer import folder_lock\n"
                f"with folder_lock({str(folder)!r}, 'test'):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        waits = []

        def take():
            with folder_lock(folder, "training of this student", on_wait=waits.append):
                waits.append("acquired")

        t = threading.Thread(target=take)
        t.start()
        t.join(timeout=2)
        assert t.is_alive() and len(waits) == 1 and f"in process {holder.pid}" in waits[0]
        holder.kill()  # the kernel drops a dead holder's lock
        t.join(timeout=30)
        assert waits[-1] == "acquired"
    finally:
        holder.kill()
        holder.wait()
