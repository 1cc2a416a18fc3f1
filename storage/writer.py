"""Crash-safe shard writer.

Rows, checked by the shard's label kind (``storage.kinds``), stream into a hidden raw file
(plain float32 columns, fast zstd) while the shard's id frequencies are counted; ``close()``
re-encodes it one row group at a time into the kind's compact columns, fsyncs, puts it in
place, then creates the commit record ``<name>.json`` (size, sha256, rows, tokens, metadata).
Readers accept a shard only when the record exists and matches the file, so a crash at any
moment leaves either nothing a reader accepts or a whole shard. Memory is bounded by one row
group.

First writer wins: the record is created only if absent, and it is the commit point. Two
writers of one key (two runs, two nodes) get exactly one commit; the other deletes its own
file and reports the winner's record (``ShardWriter.lost_race``). A committed file is never
replaced or overwritten, so a reader that verified it keeps reading those bytes.

- Locally: the shard is written under a writer-unique temporary name, then, holding a
  per-key ``flock`` (``.<name>.parquet.commit-lock``), hard-linked to ``<name>.parquet``
  (exclusive), and the record, written whole to its own temporary, is hard-linked to
  ``<name>.json`` (exclusive). Under the lock with no record, an existing ``<name>.parquet``
  can only be a leftover of a writer killed between those two links, and only then is it
  replaced. The kernel drops the lock of a killed writer.
- S3: the record is a conditional PUT (``If-None-Match: *``, ``storage.fs.put_if_absent``).
  The shard is uploaded first with the same condition to ``<name>.parquet``; if that key is
  taken (a writer in flight, or one killed before its record), to a writer-unique
  ``<name>.<32 hex>.parquet`` instead, and the record names the object it describes. No
  object a record names is ever overwritten. (An S3-compatible server that ignores
  ``If-None-Match`` gives none of this: racing writers then overwrite each other, which
  readers catch as a size or sha256 mismatch.)
- Other object stores (gs://, hdfs://... through pyarrow, which has no conditional put): the
  shard always goes to a writer-unique object and the record is a plain PUT, so the last
  record wins; each record still names a whole object that is never overwritten, so readers
  stay consistent, but two racing writers both report a commit and one object is orphaned.

Temporaries are named for their writer's host, boot and pid (``temp_name``), so that on a
folder several nodes share, stale-temporary cleanup judges only this host's writers
(``remove_stale_temporaries``). A failure to write raises ``ShardWriteError`` naming the shard,
the store and the operation, after the writer removed its temporaries and local scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import codec
from storage import fs as fsmod
from storage.kinds import POSITIONS, features, kind_of
from storage.schema import (
    COUNTS_KEY,
    ENCODING_KEY,
    ID_TABLE_KEY,
    METADATA_KEY,
    ROW_GROUP_ROWS,
    ZSTD_LEVEL,
    ShardMeta,
    arrow_schema,
    decoded_schema,
    text_columns,
)

RECORD_SUFFIX = ".json"
TMP_MARK = ".tmp-"
LOCK_SUFFIX = ".commit-lock"


def record_path(shard_path: str | os.PathLike) -> Path:
    return Path(shard_path).with_suffix(RECORD_SUFFIX)


def unique_data_path(shard_path: Path) -> Path:
    """A writer-unique object name next to ``<name>.parquet``: ``<name>.<32 hex>.parquet``."""
    return shard_path.with_name(f"{shard_path.stem}.{uuid.uuid4().hex}{shard_path.suffix}")


def is_unique_data_name(shard_path: Path, name: object) -> bool:
    """Whether ``name`` is one of ``shard_path``'s writer-unique names (what a record may name)."""
    return (
        isinstance(name, str)
        and re.fullmatch(rf"{re.escape(shard_path.stem)}\.[0-9a-f]{{32}}{re.escape(shard_path.suffix)}", name)
        is not None
    )


ABANDONED_AFTER_S = 7 * 24 * 3600
"""A temporary of another host (or of unknown origin) untouched this long counts as abandoned.
Its writer cannot be asked whether it lives, so only an age far beyond any write is proof: a
writer touches its temporary at every row group and writes its final one within ``close()``."""


def _host_tag() -> str:
    """This host's name as it appears in temporary names (``-`` is the field separator)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname())[:63] or "unknown"


def _boot_tag() -> str:
    """The first 8 hex digits of this boot's id (Linux), or ``x`` where the system has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8] or "x"
    except OSError:
        return "x"


_HOST, _BOOT = _host_tag(), _boot_tag()


def temp_name(path: Path, tag: str = "") -> Path:
    """Hidden sibling name ``.<name><tag>.tmp-<host>-<boot>-<pid>-<8 hex>``: the writer's host,
    boot and pid, so that on a folder shared by several nodes (NFS) a stale temporary is
    recognized by the one host that can tell whether its writer still runs."""
    return path.with_name(f".{path.name}{tag}{TMP_MARK}{_HOST}-{_BOOT}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@dataclasses.dataclass(frozen=True)
class TempOwner:
    host: str
    boot: str
    pid: int


def temp_owner(name: str) -> TempOwner | None:
    """Who wrote a temporary named by ``temp_name``; None for any other name (older versions
    named only the pid, which says nothing on a shared folder)."""
    if TMP_MARK not in name:
        return None
    fields = name.rsplit(TMP_MARK, 1)[1].split("-")
    if len(fields) != 4 or not fields[2].isdigit():
        return None
    return TempOwner(fields[0], fields[1], int(fields[2]))


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
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a full disk names no file
            raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)


class ShardWriteError(OSError):
    """A shard could not be written. The message names the shard, the store and the operation;
    the original error is chained (``__cause__``) and its ``errno`` kept; nothing of the shard
    is left behind but, on S3, an object whose record PUT failed (invisible without it)."""

    def __init__(self, message: str, shard: str, store: str, operation: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.shard, self.store, self.operation = shard, store, operation


def _write_errors() -> tuple[type[BaseException], ...]:
    try:
        # optional (only S3 through boto raises these): a lazy import of an optional dependency
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, ClientError, BotoCoreError)


def _hint(cause: BaseException, store: str, remote: bool) -> str:
    code = getattr(cause, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f"the local scratch folder ({tempfile.gettempdir()}, set TMPDIR to move it)" if remote else store
        return f"; free space (or raise the quota or file-size limit) on {where} and label again"
    status = getattr(cause, "response", None) or {}
    if (
        status.get("Error", {}).get("Code") in ("AccessDenied", "403")
        or status.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403
        or "ACCESS_DENIED" in str(cause)
    ):
        return f"; check that these credentials may write (s3:PutObject) under {store}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"; check that this process may write under {store}"
    return ""


def _discard_parquet_writer(writer: pq.ParquetWriter | None) -> None:
    """Release a Parquet writer's file without writing a footer (its file is being thrown away,
    perhaps because the disk is full); ``__del__`` must not try the footer again either."""
    if writer is None:
        return
    writer.is_open = False
    if writer.file_handle is not None:
        with contextlib.suppress(OSError):
            writer.file_handle.close()


def _list_array(values: list, value_type: pa.DataType) -> pa.ListArray:
    lengths = [len(v) for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v) for v in values]) if values and offsets[-1] else np.array([])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, value_type))


def _parquet_writer(
    path: Path, schema: pa.Schema, level: int, byte_stream_split: list[str] | bool = False
) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        compression_level=level,
        use_dictionary=["doc_id"],
        use_byte_stream_split=byte_stream_split,
        write_statistics=["doc_id", "window_index", "label_start"],
        store_schema=False,  # Parquet logical types carry the schema; the Arrow copy would duplicate the id table
    )


class ShardWriter:
    """Streams rows into one Parquet shard and commits it atomically on ``close()``.

    Use as a context manager: an exception inside the block removes the temporary files and
    commits nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: ShardMeta,
        row_group_rows: int = ROW_GROUP_ROWS,
        fs=None,
        store: str | None = None,
    ):
        """``fs``: a ``pyarrow.fs`` filesystem for object stores (``path`` is then its path);
        None writes locally. Remote shards are built in a local temporary folder and uploaded
        whole, then the commit record is uploaded last. ``store``: how errors name the store
        (``LabelStore`` passes its location); by default the shard's folder.

        Any failure to write (disk full, permission, a refused upload) raises ``ShardWriteError``
        naming the shard, the store and the operation, after removing this writer's temporaries
        and local scratch."""
        self.fs = fs
        self.path = Path(path)
        self.url = str(self.path) if fs is None else f"{fs.type_name}://{self.path}"
        self.store = store or str(self.path.parent if fs is None else f"{fs.type_name}://{self.path.parent}")
        if not meta.created:
            meta = dataclasses.replace(meta, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.meta = meta
        self.kind = kind_of(meta.kind)
        self.row_group_rows = row_group_rows
        self._closed = False
        self._raw = None
        self._scratch = None
        self._raw_path = self._tmp = None
        self._step = (
            f"creating the shard's folder {self.path.parent}" if fs is None else "creating a local scratch folder"
        )
        try:
            if fs is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                local = self.path
            else:
                self._scratch = Path(tempfile.mkdtemp(prefix="distill-shard-"))
                local = self._scratch / self.path.name
            self._raw_path = temp_name(local, ".raw")
            self._tmp = temp_name(local)
            self._raw_schema = decoded_schema(meta)
            self._step = f"creating the temporary file {self._raw_path}"
            self._raw = _parquet_writer(self._raw_path, self._raw_schema, level=1)
        except BaseException as e:
            self._fail(e)
        self._id_counts = np.zeros(meta.vocab_size, np.int64)
        self._buffer: list[Mapping[str, object]] = []
        self.rows = 0
        self.tokens = 0  # labelled positions
        self.record: dict | None = None  # after close(): the record committed under this key
        self.lost_race = False  # after close(): another writer committed this key first

    def write(self, row: Mapping[str, object]) -> None:
        """Add one row: every ``decoded_schema`` column (arrays for list columns), checked by the
        shard's label kind (``storage.kinds``)."""
        if self._closed:
            raise RuntimeError(f"{self.url}: writer already closed (or discarded after a failure)")
        positions = self.kind.layout == POSITIONS
        where = (
            f"{self.path.name}: row {row['doc_id']}#{row['window_index']}"
            if positions
            else f"{self.path.name}: example {row['doc_id']}"
        )
        labelled = self.kind.check_row(row, self.meta.kind_params, self.meta.vocab_size, where)
        if self.meta.features:
            features.check_row(row, self.meta.features, labelled, where)
        if positions:
            np.add.at(self._id_counts, np.asarray(row["teacher_ids"], np.int64), 1)
        self._buffer.append(row)
        self.rows += 1
        self.tokens += labelled  # positions, or one per example
        if len(self._buffer) >= self.row_group_rows:
            self._flush_raw()

    def write_many(self, rows: Iterable[Mapping[str, object]]) -> None:
        for row in rows:
            self.write(row)

    def _flush_raw(self) -> None:
        if not self._buffer:
            return
        self._step = f"writing rows to the temporary file {self._raw_path}"
        try:
            self._write_buffer()
        except BaseException as e:
            self._fail(e)

    def _fail(self, cause: BaseException):
        """Remove everything this writer made, then raise: an I/O error as ``ShardWriteError``
        naming shard, store and operation (chained); anything else as it is."""
        self._discard()
        if isinstance(cause, _write_errors()) and not isinstance(cause, ShardWriteError):
            hint = _hint(cause, self.store, remote=self.fs is not None)
            message = f"writing shard {self.url} to store {self.store} failed while {self._step}: {cause}{hint}"
            raise ShardWriteError(message, self.url, self.store, self._step, getattr(cause, "errno", None)) from cause
        raise cause

    def _write_buffer(self) -> None:
        cols = {}
        for field in self._raw_schema:
            values = [r[field.name] for r in self._buffer]
            fast = pa.types.is_list(field.type) and (
                pa.types.is_integer(field.type.value_type) or pa.types.is_floating(field.type.value_type)
            )
            cols[field.name] = _list_array(values, field.type.value_type) if fast else pa.array(values, field.type)
        self._raw.write_table(pa.Table.from_pydict(cols, schema=self._raw_schema))
        self._buffer.clear()

    def _encode(self, raw: pa.Table, table: np.ndarray) -> pa.Table:
        labels = self.kind.encode(raw, self.meta.kind_params, table, self.meta.vocab_size)
        if self.kind.layout != POSITIONS:
            return pa.table(labels, schema=self.schema_without_metadata)
        return pa.table(
            {
                "doc_id": raw.column("doc_id"),
                "window_index": raw.column("window_index"),
                "input_ids": raw.column("input_ids"),
                "label_start": raw.column("label_start"),
                **{name: raw.column(name) for name in text_columns(self.meta.mode, self.meta.images)},
                **labels,
                **(features.encode(raw) if self.meta.features else {}),
            },
            schema=self.schema_without_metadata,
        )

    @property
    def schema_without_metadata(self) -> pa.Schema:
        return arrow_schema(self.meta)

    def close(self) -> dict:
        """Encode, fsync, put in place, then create the commit record. Returns the record now
        committed under this key: this shard's, or, if another writer committed the key first
        (``lost_race``), that writer's, this shard being discarded."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer already closed")
        try:
            self._flush_raw()
            self._step = f"finishing the temporary file {self._raw_path}"
            self._raw.close()
            self._raw = None
            winner, record = self._encode_and_commit()
        except BaseException as e:
            self._fail(e)
        self.lost_race = winner is not None
        self.record = winner if winner is not None else record
        return self.record

    def _encode_and_commit(self) -> tuple[dict | None, dict]:
        table = codec.id_table(self._id_counts)
        encoding = {**self.kind.encoding(self.meta.kind_params), "id_table_size": len(table)}
        footer = {
            METADATA_KEY: self.meta.to_json().encode(),
            ENCODING_KEY: json.dumps(encoding).encode(),
            ID_TABLE_KEY: codec.pack_table(table, self.meta.vocab_size),
            COUNTS_KEY: json.dumps({"rows": self.rows, "tokens": self.tokens}).encode(),
        }
        schema = self.schema_without_metadata
        self._step = f"reading the temporary file {self._raw_path}"
        raw = pq.ParquetFile(self._raw_path)
        self._step = f"encoding the shard into the temporary file {self._tmp}"
        split_columns = [*self.kind.byte_stream_split, *(features.BYTE_STREAM_SPLIT if self.meta.features else ())]
        split = [f"{name}.list.element" for name in split_columns]
        out = _parquet_writer(self._tmp, schema, ZSTD_LEVEL, byte_stream_split=split or False)
        try:
            out.add_key_value_metadata(footer)
            for rg in range(raw.metadata.num_row_groups):
                out.write_table(self._encode(raw.read_row_group(rg), table))
            out.close()
        finally:
            _discard_parquet_writer(out)  # only after a failure is it still open
        self._step = f"syncing and hashing the temporary file {self._tmp}"
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
        winner = self._commit_local(record) if self.fs is None else self._commit_remote(record)
        self._closed = True
        self._raw_path.unlink(missing_ok=True)
        self._cleanup_scratch()
        return winner, record

    def _commit_local(self, record: dict) -> dict | None:
        """Place the shard and create its record, both exclusively. None: committed; else the
        record of the writer that committed this key first (this shard is then discarded)."""
        rec = record_path(self.path)
        rec_tmp = temp_name(rec)
        try:
            self._step = f"writing the commit record to its temporary file {rec_tmp}"
            with open(rec_tmp, "w") as f:
                f.write(json.dumps(record, indent=1, sort_keys=True))
                f.flush()
                os.fsync(f.fileno())
            self._step = f"placing the shard at {self.path} and its record at {rec}"
            with _commit_lock(self.path):
                if rec.exists():
                    return _read_winner(None, rec)
                try:
                    os.link(self._tmp, self.path)
                except FileExistsError:
                    # no record and the lock held: a writer killed between its two links left it
                    os.replace(self._tmp, self.path)
                _fsync_dir(self.path.parent)
                try:
                    os.link(rec_tmp, rec)  # the commit point
                except FileExistsError:
                    # only a writer that does not take the lock (an older version) gets here
                    return _read_winner(None, rec)
                _fsync_dir(self.path.parent)
            return None
        finally:
            rec_tmp.unlink(missing_ok=True)
            self._tmp.unlink(missing_ok=True)

    def _commit_remote(self, record: dict) -> dict | None:
        """Upload the shard, then create its record (conditionally where the store can).
        None: committed; else the winner's record (this shard's object is then deleted)."""
        rec = str(record_path(self.path))
        scheme = f"{self.fs.type_name}://"
        self._step = f"checking for a commit record at {scheme}{rec}"
        if fsmod.exists(self.fs, rec):  # committed while we labelled: skip the upload
            return _read_winner(self.fs, rec)
        if not fsmod.has_conditional_put(self.fs):
            data = unique_data_path(self.path)
            self._step = f"uploading the shard to {scheme}{data}"
            fsmod.upload(self._tmp, self.fs, str(data))
            record["file"] = data.name
            self._step = (
                f"uploading the commit record to {scheme}{rec} "
                f"(the shard's object {data.name} stays, unnamed by any record)"
            )
            with self.fs.open_output_stream(rec) as f:
                f.write(json.dumps(record, indent=1, sort_keys=True).encode())
            return None
        data = self.path
        self._step = f"uploading the shard to {scheme}{data}"
        if not fsmod.put_if_absent(self.fs, str(data), self._tmp):
            # taken by a writer in flight or by one killed before its record: never overwrite it
            data = unique_data_path(self.path)
            self._step = f"uploading the shard to {scheme}{data}"
            if not fsmod.put_if_absent(self.fs, str(data), self._tmp):
                raise FileExistsError(f"{data}: a fresh unique object name is already taken")
        record["file"] = data.name
        # an error here (not a 412) leaves our object behind without a record, as a kill would:
        # the PUT may have landed with only its answer lost, so the object must stay
        self._step = (
            f"uploading the commit record to {scheme}{rec} "
            f"(the shard's object {data.name} stays, unnamed by any record)"
        )
        if fsmod.put_if_absent(self.fs, rec, json.dumps(record, indent=1, sort_keys=True).encode()):
            return None
        winner = _read_winner(self.fs, rec)
        if winner.get("file") == record["file"] and winner.get("sha256") == record["sha256"]:
            return None  # our own record: the SDK retried a PUT whose first attempt had landed
        # lost: our object is named by no record, and only we ever delete it
        self._step = f"deleting this writer's object {scheme}{data} after another writer committed the key"
        self.fs.delete_file(str(data))
        return winner

    def _cleanup_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def abort(self) -> None:
        """Discard this shard: remove its temporaries and local scratch, commit nothing."""
        self._discard()

    def _discard(self) -> None:
        if self._closed:
            return
        self._closed = True
        _discard_parquet_writer(self._raw)
        self._raw = None
        for path in (self._raw_path, self._tmp):
            if path is not None:
                path.unlink(missing_ok=True)
        self._cleanup_scratch()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_winner(fs, rec: str | os.PathLike) -> dict:
    try:
        return json.loads(fsmod.read_bytes(fs, str(rec)))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{rec}: another writer committed this key first, but its record was removed "
            "(found invalid) before it could be read; label the shard again"
        ) from e


def _lock_path(shard_path: Path) -> Path:
    return shard_path.with_name(f".{shard_path.name}{LOCK_SUFFIX}")


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file named ``path`` (lock files are unlinked by their holder)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


@contextlib.contextmanager
def _commit_lock(shard_path: Path):
    """Hold the per-key commit lock (``flock``, which NFS maps onto its own locks, so it holds
    across nodes). The holder unlinks the file on release so no lock files pile up; a waiter
    that then finds its locked file unlinked or replaced retries on the current one."""
    lock = _lock_path(shard_path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_current(fd, lock):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # still ours: nobody unlinks a lock file without holding it
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, on_wait=None):
    """Hold an exclusive lock on ``folder`` (``<folder>/.lock``, ``flock``) while the block runs.

    A second holder waits until the first is done (``on_wait(pid)`` is called once, naming the
    process that holds it); the kernel releases the lock when its holder dies, so a killed run
    never blocks the next one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if on_wait is not None:
                on_wait(f"{what} is in progress in process {holder} ({folder}); waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def remove_stale_temporaries(folder: str | os.PathLike, abandoned_after_s: float = ABANDONED_AFTER_S) -> int:
    """Delete temporaries left by writers that no longer run (crashed), and commit-lock files
    nobody holds (a writer killed inside its commit). Returns how many.

    Only this host can tell whether a writer lives, so on a shared folder a temporary is
    removed when it is this host's and its writer is dead: one from an earlier boot of this
    host (its process is gone by definition), or one of this boot whose pid no longer runs.
    Another host's temporaries, and names without a host (older versions), are left alone
    unless nothing touched them for ``abandoned_after_s`` (default seven days): a node that
    crashed and never came back should not hold its share of the disk for ever.
    """
    removed = 0
    now = time.time()
    for path in Path(folder).rglob(f".*{TMP_MARK}*"):
        if _temp_is_stale(path, now, abandoned_after_s):
            path.unlink(missing_ok=True)
            removed += 1
    for path in Path(folder).rglob(f".*{LOCK_SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_current(fd, path):
                path.unlink(missing_ok=True)
                removed += 1
        except BlockingIOError:
            pass  # a writer is committing: its lock is not stale
        finally:
            os.close(fd)
    return removed


def _temp_is_stale(path: Path, now: float, abandoned_after_s: float) -> bool:
    owner = temp_owner(path.name)
    if owner is not None and owner.host == _HOST:
        if owner.boot != _BOOT and "x" not in (owner.boot, _BOOT):
            return True  # written before this host's last reboot
        return not _pid_alive(owner.pid)
    try:
        return now - path.lstat().st_mtime > abandoned_after_s
    except FileNotFoundError:
        return False  # renamed or removed by its writer meanwhile


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
