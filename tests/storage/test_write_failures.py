"""Several nodes on one shared folder (temporaries carry host and boot; cleanup touches only
this host's dead ones), and write failures that name shard, store and operation and leave
nothing behind: a real file-size limit (EFBIG, the kernel's answer past RLIMIT_FSIZE, as
ENOSPC is a full disk's) and a real refused PUT (a bucket policy that moto enforces)."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from storage import writer as writer_mod
from storage.cache import LabelStore
from storage.reader import ShardError
from storage.writer import (
    ShardWriteError,
    ShardWriter,
    atomic_write_text,
    remove_stale_temporaries,
    temp_name,
    temp_owner,
)
from tests.storage.test_shards import make_meta, make_rows

REPO = Path(__file__).resolve().parents[2]
DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process here


# --- temporaries on a shared folder -------------------------------------------------------


def test_temporary_names_carry_host_boot_and_pid(tmp_path):
    name = temp_name(tmp_path / "k.parquet", ".raw").name
    assert name.startswith(".k.parquet.raw.tmp-")
    owner = temp_owner(name)
    assert owner.host == re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname())[:63] and owner.pid == os.getpid()
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    if boot_id.exists():
        assert owner.boot == boot_id.read_text().strip().replace("-", "")[:8]
    assert temp_owner(f".k.parquet.tmp-{DEAD_PID}-deadbeef") is None  # an older version's name


def _temp(folder: Path, host: str, boot: str, pid: int, name: str = "k.parquet") -> Path:
    path = folder / f".{name}.tmp-{host}-{boot}-{pid}-{os.urandom(4).hex()}"
    path.write_bytes(b"in flight")
    return path


def test_cleanup_touches_only_this_hosts_dead_temporaries(tmp_path):
    here, boot = writer_mod._HOST, writer_mod._BOOT
    other_boot = "0" * 8 if boot != "0" * 8 else "1" * 8
    dead_here = _temp(tmp_path, here, boot, DEAD_PID)
    live_here = _temp(tmp_path, here, boot, os.getpid())
    # an earlier boot of this host: dead by definition, even where its pid now names a live process
    earlier_boot = _temp(tmp_path, here, other_boot, os.getpid())
    # another node's writer: its pid means nothing here (dead here, maybe running there)
    other_node = _temp(tmp_path, f"{here}_b", boot, DEAD_PID)
    other_node_other_boot = _temp(tmp_path, "node_b", other_boot, DEAD_PID, "j.parquet")
    legacy = tmp_path / f".k.json.tmp-{DEAD_PID}-deadbeef"  # an older version: no host, so not judged
    legacy.write_text("{}")
    abandoned = _temp(tmp_path, "node_c", other_boot, DEAD_PID, "i.parquet")
    week_ago = time.time() - writer_mod.ABANDONED_AFTER_S - 60
    os.utime(abandoned, (week_ago, week_ago))

    assert remove_stale_temporaries(tmp_path) == 3
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {live_here.name, other_node.name, other_node_other_boot.name, legacy.name}
    assert dead_here.name not in left and earlier_boot.name not in left and abandoned.name not in left
    # with a shorter abandonment age the idle foreign ones go too, the live local one stays
    assert remove_stale_temporaries(tmp_path, abandoned_after_s=-1) == 3
    assert {p.name for p in tmp_path.iterdir()} == {live_here.name}


def test_cleanup_during_a_write_keeps_the_writers_temporaries(tmp_path):
    store = LabelStore(tmp_path)
    rows = make_rows(40, 49152, 8, seed=1)
    with store.writer("k", make_meta(k=8, cache_key="k"), row_group_rows=8) as w:
        w.write_many(rows[:20])
        assert any(p.name.startswith(".") for p in store.path_for("k").parent.iterdir())
        assert remove_stale_temporaries(tmp_path) == 0
        w.write_many(rows[20:])
    assert store.open("k").rows == 40
    assert sorted(p.name for p in store.path_for("k").parent.iterdir()) == ["k.json", "k.parquet"]


# --- a full disk --------------------------------------------------------------------------


def _write_under_limit(root: Path, rows: int, row_group_rows: int, limit: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.storage.fsize_worker", str(root), str(rows), str(row_group_rows), str(limit)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _committed_bytes(tmp_path: Path, rows: int) -> int:
    store = LabelStore(tmp_path / "unlimited")
    with store.writer("key", make_meta(k=8, cache_key="key")) as w:
        w.write_many(make_rows(rows, 49152, 8, seed=7))
    return w.record["bytes"]


@pytest.mark.parametrize("case", ["rows", "last rows in close", "encoding in close"])
def test_a_full_disk_names_shard_store_and_operation_and_leaves_nothing(tmp_path, case):
    """The kernel refuses the write (EFBIG past RLIMIT_FSIZE): while rows stream in, while
    ``close()`` writes the rows it buffered (the flush that ran outside any cleanup), and
    while ``close()`` encodes the final file (one row: the final file, with its id table, is
    larger than the raw one, so only it crosses the limit)."""
    root = tmp_path / "store"
    if case == "rows":
        got, phase, operation = (
            _write_under_limit(root, 200, 16, 8 << 10),
            "write",
            "writing rows to the temporary file",
        )
    elif case == "last rows in close":
        got, phase, operation = _write_under_limit(root, 30, 64, 8 << 10), "close", "writing rows to the temporary file"
    else:
        limit = _committed_bytes(tmp_path, 1) - 64
        got, phase, operation = _write_under_limit(root, 1, 64, limit), "close", "encoding the shard"
    assert got["phase"] == phase, got
    assert got["type"] == "ShardWriteError" and got["errno"] == errno.EFBIG, got
    shard = LabelStore(root).path_for("key")
    message = got["message"]
    assert f"writing shard {shard} to store {root} failed while {operation}" in message, message
    assert "File too large" in message and "free space" in message, message
    assert got["operation"].startswith(operation) and "OSError" in got["cause"]
    leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    assert leftovers == [], f"a failed writer left {leftovers}"


def test_a_failed_atomic_write_leaves_no_temporary(tmp_path):
    """A real fault at the rename (the target is a non-empty folder): the error names the
    target and the temporary is gone."""
    target = tmp_path / "manifest.json"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(IsADirectoryError, match="manifest.json"):
        atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


# --- a refused upload ---------------------------------------------------------------------


def _deny(s3_server: str, bucket: str, resource: str) -> str:
    """A bucket whose policy denies ``s3:PutObject`` on ``resource``; returns the store URI."""
    query = s3_server.split("?", 1)[1]
    endpoint = "http://" + dict(kv.split("=") for kv in query.split("&"))["endpoint_override"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(
        Bucket=bucket,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:PutObject",
                        "Resource": f"arn:aws:s3:::{bucket}/{resource}",
                    }
                ],
            }
        ),
    )
    return f"s3://{bucket}/run?{query}"


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The local scratch of remote writes, in a folder this test can inspect."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_refused_upload_names_bucket_key_and_store_and_leaves_no_scratch(s3_server, scratch):
    uri = _deny(s3_server, "denied", "run/*")
    store = LabelStore(uri)
    with pytest.raises(ShardWriteError) as info:
        with store.writer("abc", make_meta(k=8, cache_key="abc")) as w:
            w.write_many(make_rows(5, 49152, 8))
    message = str(info.value)
    assert message.startswith(
        "writing shard s3://denied/run/ab/abc.parquet to store s3://denied/run failed while "
        "uploading the shard to s3://denied/run/ab/abc.parquet: "
    ), message
    assert "PutObject" in message and "403" in message and "s3:PutObject" in message
    assert "endpoint_override" not in message  # the URI's query (which can hold keys) stays out
    assert type(info.value.__cause__).__name__ == "ClientError"
    assert list(scratch.iterdir()) == [], "the local scratch of the upload was left"
    assert not store.is_committed("abc")


def test_a_refused_record_names_the_record_and_the_object_that_stays(s3_server, scratch):
    """The shard's object goes up, its record is refused: the object stays (the PUT's answer
    may have been lost after it landed, so only a record could prove it ours), and no reader
    accepts it."""
    store = LabelStore(_deny(s3_server, "norecords", "run/*.json"))
    with pytest.raises(
        ShardWriteError,
        match=r"failed while uploading the commit record to "
        r"s3://norecords/run/ab/abc\.json \(the shard's object abc\.parquet stays",
    ):
        with store.writer("abc", make_meta(k=8, cache_key="abc")) as w:
            w.write_many(make_rows(5, 49152, 8))
    assert list(scratch.iterdir()) == []
    assert store.lookup("abc") is None
    with pytest.raises(ShardError, match="no commit record"):
        store.open("abc")


def test_an_unwritable_local_store_names_it_at_open(tmp_path):
    """A store folder that cannot be created (its parent is a file) fails when the writer opens,
    naming the shard, the store and the folder it tried to create."""
    (tmp_path / "blocked").write_text("a file where the store's folder should be")
    with pytest.raises(ShardWriteError, match=r"failed while creating the shard's folder .*blocked/ab"):
        ShardWriter(LabelStore(tmp_path / "blocked").path_for("abc"), make_meta(k=8))
