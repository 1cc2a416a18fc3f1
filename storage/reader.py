"""Verifying, streaming shard reader.

``open_shard`` accepts a shard only if its commit record exists and matches the file (size and
sha256), its schema version is known, its columns have the expected types and its provenance
matches what the caller expects (teacher, tokenizer, vocabulary, label kind and its parameters).
What the label columns hold, and how they decode, is the shard's label kind's (``storage.kinds``).
``ShardStream`` yields rows one row group at a time, in a seeded deterministic order, split across ranks without
overlap, and reports a position from which it resumes exactly.

A ``Shard`` keeps the file it verified: locally the open file (the inode stays readable even
if the name is later replaced or removed), on object stores the object its record names,
which writers never overwrite (``storage.writer``). ``Shard.parquet()`` reads from that, so
rows are never decoded against another file's id table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import codec
from storage import fs as fsmod
from storage.kinds import EXAMPLES, features, kind_of
from storage.kinds.base import flat
from storage.schema import (
    COUNTS_KEY,
    ENCODING_KEY,
    ID_TABLE_KEY,
    METADATA_KEY,
    SCHEMA_VERSION,
    ShardMeta,
    arrow_schema,
    text_columns,
)
from storage.writer import is_unique_data_name, record_path

RECORD_FIELDS = frozenset({"bytes", "sha256", "rows", "tokens", "meta"})
CHECKED_FIELDS = (
    "teacher_hash",
    "tokenizer_hash",
    "vocab_size",
    "kind",
    "kind_params",
    "mode",
    "temperature",
    "features",
    "images",
)


class ShardError(ValueError):
    """A shard is missing, incomplete, corrupt, or not the one the run expects."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


@dataclasses.dataclass
class Shard:
    path: Path
    record: dict
    meta: ShardMeta
    encoding: dict
    id_table: np.ndarray
    fs: object = None  # pyarrow filesystem for object stores; None: local
    counts: dict = dataclasses.field(default_factory=dict)  # from the footer (covered by the checksum)
    file: Path | None = (
        None  # the file or object the record names: ``path``, or a writer-unique sibling on object stores
    )
    source: object = dataclasses.field(default=None, repr=False, compare=False)  # the verified local file, open
    pin: tuple | None = dataclasses.field(default=None, repr=False, compare=False)  # its (st_dev, st_ino, size)

    def __post_init__(self):
        self.file = Path(self.file) if self.file is not None else self.path

    @property
    def rows(self) -> int:
        return int(self.counts["rows"])

    @property
    def tokens(self) -> int:
        return int(self.counts["tokens"])

    def parquet(self) -> pq.ParquetFile:
        """The verified file as Parquet (local: the same open file every time)."""
        if self.fs is not None:
            f = self.fs.open_input_file(str(self.file))
            if f.size() != self.record["bytes"]:
                raise ShardError(
                    self.file,
                    f"size {f.size()} != {self.record['bytes']} since it was verified (overwritten "
                    "by something other than a shard writer); open the shard again",
                )
            return pq.ParquetFile(f)
        if self.source is None:  # unpickled: file handles do not travel, so reopen and check it is the same file
            f = open(self.file, "rb")
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino, st.st_size) != self.pin:
                f.close()
                raise ShardError(self.file, "replaced since it was verified (relabelled); open the shard again")
            self.source = pa.PythonFile(f, mode="r")
        return pq.ParquetFile(self.source)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "source": None}


def _sha256(f, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def _open_verified(fs, data: Path, record: dict, verify_checksum: bool, where) -> tuple[object, object, tuple | None]:
    """Open the data file once, check its size (and sha256) against the record, and return
    ``(parquet source, local source or None, pin)``: what was checked is what gets read."""
    if fs is not None:
        if not fsmod.exists(fs, str(data)):
            raise ShardError(where, "listed by its commit record but the file is missing")
        size = fsmod.size(fs, str(data))
        if size != record.get("bytes"):
            raise ShardError(
                where, f"size {size} != {record.get('bytes')} in the commit record (truncated or replaced)"
            )
        if verify_checksum:
            with fs.open_input_stream(str(data)) as f:
                if _sha256(f) != record.get("sha256"):
                    raise ShardError(where, "sha256 does not match the commit record (corrupt file)")
        return fs.open_input_file(str(data)), None, None
    try:
        f = open(data, "rb")
    except FileNotFoundError:
        raise ShardError(where, "listed by its commit record but the file is missing") from None
    try:
        st = os.fstat(f.fileno())
        if st.st_size != record.get("bytes"):
            raise ShardError(
                where, f"size {st.st_size} != {record.get('bytes')} in the commit record (truncated or replaced)"
            )
        if verify_checksum:
            if _sha256(f) != record.get("sha256"):
                raise ShardError(where, "sha256 does not match the commit record (corrupt file)")
            f.seek(0)
    except BaseException:
        f.close()
        raise
    source = pa.PythonFile(f, mode="r")  # one wrapper, one lock: safe to share between readers
    return source, source, (st.st_dev, st.st_ino, st.st_size)


def open_shard(
    path: str | os.PathLike,
    expect: Mapping[str, object] | None = None,
    verify_checksum: bool = True,
    fs=None,
) -> Shard:
    """Open and validate one committed shard; raise ``ShardError`` naming the file and problem.

    ``fs``: a ``pyarrow.fs`` filesystem when ``path`` lives on an object store.
    """
    path = Path(path)
    rec_path = str(record_path(path))
    where = path if fs is None else f"{type(fs).__name__}:{path}"
    if not fsmod.exists(fs, rec_path):
        raise ShardError(where, "no commit record (the shard was never completed); relabel its partition")
    try:
        record = json.loads(fsmod.read_bytes(fs, rec_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(rec_path, f"unreadable commit record ({e}); relabel its partition") from e
    if not isinstance(record, dict) or not RECORD_FIELDS <= set(record):
        raise ShardError(
            rec_path,
            f"not a commit record (expected a JSON object with {sorted(RECORD_FIELDS)}); relabel its partition",
        )
    # a record names its own file, or on object stores a writer-unique sibling; any other name
    # (a record copied from another key) is ignored, and the footer's cache key then disagrees
    data = path.with_name(record["file"]) if is_unique_data_name(path, record.get("file")) else path
    if data != path:
        where = f"{where} ({data.name})"
    parquet_source, source, pin = _open_verified(fs, data, record, verify_checksum, where)
    try:
        pf = pq.ParquetFile(parquet_source)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(where, f"not a readable Parquet file ({e})") from e
    raw = (pf.metadata.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(path, "no shard metadata in the Parquet footer (not written by this tool)")
    meta_dict = json.loads(raw)
    version = meta_dict.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(
            path,
            f"schema_version {version} but this code reads {SCHEMA_VERSION} (written by "
            f"{'an older' if isinstance(version, int) and version < SCHEMA_VERSION else 'another'} version of this "
            "tool); relabel its partition with this version (materialize teacher_logits again)",
        )
    try:
        meta = ShardMeta.from_dict(meta_dict)
    except (TypeError, ValueError) as e:
        raise ShardError(path, str(e)) from e
    expected_schema = arrow_schema(meta)
    for field in expected_schema:
        idx = pf.schema_arrow.get_field_index(field.name)
        if idx < 0:
            raise ShardError(path, f"column {field.name!r} is missing")
        actual = pf.schema_arrow.field(idx).type
        if actual != field.type:
            raise ShardError(path, f"column {field.name!r} has type {actual}, expected {field.type}")
    try:
        encoding = json.loads(pf.metadata.metadata[ENCODING_KEY])
        table = codec.unpack_table(pf.metadata.metadata[ID_TABLE_KEY], encoding["id_table_size"], meta.vocab_size)
    except (KeyError, ValueError) as e:
        raise ShardError(path, f"missing or unreadable encoding metadata ({e})") from e
    if table.size and int(table.max()) >= meta.vocab_size:
        raise ShardError(path, f"id table holds id {int(table.max())} >= vocab_size {meta.vocab_size}")
    counts = _footer_counts(path, pf)
    # The record's counts and metadata are plain JSON anyone can edit; the footer is covered by
    # the checksum. Readers use the footer and accept the record only if it agrees.
    for field in ("rows", "tokens"):
        if record[field] != counts[field]:
            raise ShardError(
                rec_path,
                f"field {field!r} is {record[field]!r} but the file holds {counts[field]} "
                "(edited or foreign commit record); relabel its partition",
            )
    if record["meta"] != meta_dict:
        changed = sorted(k for k in set(meta_dict) | set(record["meta"]) if meta_dict.get(k) != record["meta"].get(k))
        raise ShardError(
            rec_path,
            f"metadata field(s) {changed} differ from the file's footer (edited or foreign commit record); "
            "relabel its partition",
        )
    for key, value in (expect or {}).items():
        got = getattr(meta, key)
        if got != value:
            raise ShardError(
                path, f"field {key!r} is {got!r} but the run expects {value!r} (shard from another run or key)"
            )
    return Shard(
        path=path,
        record=record,
        meta=meta,
        encoding=encoding,
        id_table=table,
        fs=fs,
        counts=counts,
        file=data,
        source=source,
        pin=pin,
    )


def _footer_counts(path: Path, pf: pq.ParquetFile) -> dict:
    try:
        counts = json.loads(pf.metadata.metadata[COUNTS_KEY])
        rows, tokens = int(counts["rows"]), int(counts["tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(path, f"missing or unreadable row/token counts in the footer ({e})") from e
    if rows != pf.metadata.num_rows:
        raise ShardError(path, f"footer counts {rows} rows but the Parquet file holds {pf.metadata.num_rows}")
    return {"rows": rows, "tokens": tokens}


def decode_table(shard: Shard, table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode one row group of a ``positions`` shard: ``{column: (flat values, row offsets)}``
    with plain ids and float32 logprobs (``input_ids`` and the label kind's decoded columns)."""
    kind = kind_of(shard.meta.kind)
    try:
        labels = kind.decode(table, shard.meta.kind_params, shard.encoding, shard.id_table)
        if shard.meta.features:
            positions = np.diff(labels["target_logprobs"][1])
            labels.update(features.decode(table, shard.meta.features, positions))
    except ValueError as e:
        raise ShardError(shard.path, f"{e}; relabel its partition") from e
    return {"input_ids": flat(table, "input_ids"), **labels}


def decode_row_group(shard: Shard, table: pa.Table) -> list[dict]:
    """One row group as per-row dicts of numpy arrays (decoded, validated)."""
    kind = kind_of(shard.meta.kind)
    if kind.layout == EXAMPLES:
        try:
            return kind.rows(table)
        except ValueError as e:
            raise ShardError(shard.path, str(e)) from e
    cols = decode_table(shard, table)
    names = ["doc_id", "window_index", "label_start", *text_columns(shard.meta.mode, shard.meta.images)]
    scalars = {name: table.column(name).to_pylist() for name in names}
    rows = []
    for i in range(table.num_rows):
        row = {name: values[i] for name, values in scalars.items()}
        for name, (values, offsets) in cols.items():
            row[name] = values[offsets[i] : offsets[i + 1]]
        rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: the next row is row ``row`` (in the chunk's shuffled order) of
    the chunk that starts at unit ``unit`` of this rank's units in epoch ``epoch``."""

    epoch: int = 0
    unit: int = 0
    row: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamPosition":
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class MixPosition:
    """Where a ``MixStream`` stands: rows yielded so far and each of its streams' positions."""

    index: int = 0
    main: StreamPosition = StreamPosition()
    extra: StreamPosition = StreamPosition()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MixPosition":
        return cls(int(data["index"]), StreamPosition(**data["main"]), StreamPosition(**data["extra"]))

    def with_new_extra(self) -> "MixPosition":
        """Where a mix of the same ``main`` stream with a new ``extra`` stream continues this one:
        the next coin and main row, the new extra stream from its first row (an on-policy round
        after the last one: the same teacher rows go on, the round's own answers are new)."""
        return MixPosition(self.index, self.main, StreamPosition())


class MixStream:
    """Rows of two streams: row ``i`` comes from ``extra`` with probability ``share`` (a coin
    seeded by ``seed`` and ``i``, so a resumed stream flips the same coins), else from ``main``.
    Each stream goes through its own epochs; the position holds both, so resume is exact.
    Rows of ``extra`` carry ``from_extra: True``.
    (GKD's lambda: ``extra`` holds the student's own answers, ``main`` the fixed data.)"""

    def __init__(self, main: "ShardStream", extra: "ShardStream", share: float, seed: int = 0):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share={share} must be in [0, 1]")
        self.main, self.extra, self.share, self.seed = main, extra, share, seed
        self.shards = main.shards

    def takes_extra(self, index: int) -> bool:
        return bool(np.random.default_rng([self.seed, 0x6D6978, index]).random() < self.share)

    def rows(self, start: MixPosition = MixPosition()) -> Iterator[tuple[dict, MixPosition]]:
        """Yield ``(row, position_after_row)`` forever, starting at ``start``."""
        main_rows, extra_rows = (
            self.main.rows(start.main),
            self.extra.rows(start.extra),
        )  # lazy: a stream never drawn is never read
        index, main_pos, extra_pos = start.index, start.main, start.extra
        while True:
            if self.takes_extra(index):
                row, extra_pos = next(extra_rows)
                row = {**row, "from_extra": True}
            else:
                row, main_pos = next(main_rows)
            index += 1
            yield row, MixPosition(index, main_pos, extra_pos)


class ShardStream:
    """Streams rows from a list of shards, mixed across many row groups and shards.

    The unit of work is a row group. Each epoch the units are ordered (shuffled with ``seed`` if
    ``shuffle``), then rank ``rank`` of ``world_size`` takes every ``world_size``-th unit, so
    ranks never overlap. Every rank yields the same number of rows per epoch: the smallest
    rank's share (row groups rarely divide evenly by the world size, and the last row group of a
    shard is short). The few rows past that on the other ranks are skipped for that epoch; the
    order is reshuffled each epoch, so it is different rows each time. With one rank (or when
    the shares are equal) every row is read once per epoch. Ranks therefore reach every epoch
    boundary together and no rank ever repeats data another has not. A rank reads its units in
    chunks of about ``shuffle_buffer`` rows (whole row groups) and yields each chunk's rows in a
    random order seeded by (seed, epoch, first unit): consecutive rows then come from every row
    group and shard of the chunk, not from one or two documents.

    This is a block shuffle rather than a reservoir: the position of the next row is just
    (epoch, chunk, row), so a resumed stream yields exactly what an uninterrupted one would,
    without storing the buffer's contents. Memory: the chunk's row groups, kept encoded (about
    the shard's bytes per token) and decoded one row at a time.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        shuffle_buffer: int = 0,
    ):
        """``rank``/``world_size``: distributed ranks; ``worker``/``num_workers``: dataloader
        workers inside a rank. Each (rank, worker) pair reads a disjoint share of row groups.
        ``shuffle_buffer``: rows mixed at once (rounded up to whole row groups; 0: one row group)."""
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} is outside num_workers {num_workers}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0")
        self.shards = list(shards)
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank * num_workers + worker, world_size * num_workers
        self._units, unit_rows = [], []
        for si, s in enumerate(self.shards):
            meta = s.parquet().metadata
            for rg in range(meta.num_row_groups):
                self._units.append((si, rg))
                unit_rows.append(meta.row_group(rg).num_rows)
        self._unit_rows = dict(zip(self._units, unit_rows))
        if len(self._units) < self.world_size:
            raise ValueError(
                f"{self.shards[0].path} and {len(self.shards) - 1} other shard(s) hold {len(self._units)} row "
                f"group(s), fewer than the {self.world_size} ranks x workers reading them: every rank needs at "
                "least one; use fewer processes or more (smaller) shards"
            )
        rows_per_unit = max(1.0, sum(unit_rows) / max(1, len(unit_rows)))
        self.units_per_chunk = max(1, math.ceil(shuffle_buffer / rows_per_unit)) if shuffle else 1

    def _order(self, epoch: int) -> list[tuple[int, int]]:
        """Every unit of ``epoch``, in the order ranks deal them out."""
        order = list(self._units)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        return order

    def units(self, epoch: int) -> list[tuple[int, int]]:
        return self._order(epoch)[self.rank :: self.world_size]

    def rows_per_epoch(self, epoch: int) -> int:
        """Rows every rank yields in ``epoch``: the smallest rank's share of that epoch's order."""
        order = self._order(epoch)
        return min(sum(self._unit_rows[u] for u in order[r :: self.world_size]) for r in range(self.world_size))

    def rows(
        self, start: StreamPosition = StreamPosition(), epochs: int | None = None
    ) -> Iterator[tuple[dict, StreamPosition]]:
        """Yield ``(row, position_after_row)`` forever (or for ``epochs``), starting at ``start``."""
        epoch = start.epoch
        unit_i, row_i = start.unit, start.row
        files: dict[int, pq.ParquetFile] = {}
        while epochs is None or epoch < start.epoch + epochs:
            units = self.units(epoch)
            if not units:
                raise ValueError(f"rank {self.rank} of {self.world_size} has no row groups to read")
            if unit_i % self.units_per_chunk:
                raise ValueError(
                    f"stream position unit {unit_i} is not the start of a chunk of {self.units_per_chunk} "
                    "units: resume with the shuffle_buffer the position was saved with"
                )
            quota = self.rows_per_epoch(epoch)
            done = sum(self._unit_rows[u] for u in units[:unit_i])  # rows of the chunks before this one
            while unit_i < len(units) and done < quota:
                chunk = units[unit_i : unit_i + self.units_per_chunk]
                tables = []
                for si, rg in chunk:
                    pf = files.get(si) or files.setdefault(si, self.shards[si].parquet())
                    tables.append((self.shards[si], pf.read_row_group(rg)))
                index = [(t, r) for t, (_, table) in enumerate(tables) for r in range(table.num_rows)]
                order = np.arange(len(index))
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch, *chunk[0]]).permutation(len(index))
                decoded = None if len(tables) > 1 else decode_row_group(*tables[0])  # one row group: decode it whole
                end = min(len(index), quota - done)
                for j in range(row_i, end):
                    t, r = index[order[j]]
                    row = (
                        decoded[r]
                        if decoded is not None
                        else decode_row_group(tables[t][0], tables[t][1].slice(r, 1))[0]
                    )
                    if j + 1 < end:
                        nxt = StreamPosition(epoch, unit_i, j + 1)
                    elif end < len(index) or done + end >= quota:
                        nxt = StreamPosition(epoch + 1, 0, 0)  # this rank's share of the epoch is done
                    else:
                        nxt = StreamPosition(epoch, unit_i + len(chunk), 0)
                    yield row, nxt
                unit_i, row_i, done = unit_i + len(chunk), 0, done + len(index)
            epoch, unit_i, row_i = epoch + 1, 0, 0


def shard_stats(shard: Shard) -> dict:
    """Scan a shard once: counts and label sanity, as its label kind reports them (``rows``,
    ``tokens``, ``mean_topk_mass``, ``max_logprob``, ``problems``). Memory: one row group."""
    pf = shard.parquet()
    kind = kind_of(shard.meta.kind)

    def groups():
        for rg in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(rg)
            yield (
                decode_row_group(shard, table)
                if kind.layout == EXAMPLES
                else (table.num_rows, decode_table(shard, table))
            )

    return kind.stats(groups(), shard.meta.kind_params)
