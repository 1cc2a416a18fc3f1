"""First writer wins: two processes committing one key, locally and on a real S3-compatible
server; leftovers of a killed writer; readers keep the file they verified."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage import fs as fsmod
from storage.cache import LabelStore
from storage.reader import ShardError, ShardStream, open_shard
from storage.writer import LOCK_SUFFIX, ShardWriter, record_path, remove_stale_temporaries, temp_name
from tests.storage.test_shards import make_meta, make_rows

RACES, ROWS, VOCAB, K = 10, 6, 1000, 4
WRITERS = (0, 1)


def _rows(race: int, writer: int) -> list[dict]:
    return make_rows(ROWS, VOCAB, K, seed=1000 * writer + race)


def _meta(key: str, writer: int):
    return make_meta(vocab=VOCAB, k=K, cache_key=key, shard=f"writer-{writer}")  # the file says who wrote it


class _RacingWriter(ShardWriter):
    """Waits at the barrier with its shard encoded, so both writers commit at the same moment."""

    def __init__(self, *args, barrier, **kwargs):
        super().__init__(*args, **kwargs)
        self._barrier = barrier

    def _commit_local(self, record):
        self._barrier.wait(60)
        return super()._commit_local(record)

    def _commit_remote(self, record):
        self._barrier.wait(60)
        return super()._commit_remote(record)


def _race_worker(location: str, writer: int, barrier, results) -> None:
    """One writer process: commits keys race-00 .. race-{RACES-1}, reporting each outcome."""
    store = LabelStore(location)
    for race in range(RACES):
        key = f"race-{race:02d}"
        with _RacingWriter(store.path_for(key), _meta(key, writer), fs=store.fs, barrier=barrier) as w:
            w.write_many(_rows(race, writer))
        results.put((race, writer, w.lost_race, w.record["sha256"], w.record["meta"]["shard"]))


def _check_rows(shard, race: int) -> None:
    writer = int(shard.meta.shard.rsplit("-", 1)[1])
    got = [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]
    want = _rows(race, writer)
    assert [g["doc_id"] for g in got] == [w["doc_id"] for w in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["teacher_ids"].astype(np.int64), np.asarray(w["teacher_ids"], np.int64))
        np.testing.assert_array_equal(g["input_ids"].astype(np.int64), np.asarray(w["input_ids"], np.int64))


def _poll(store: LabelStore, stop: threading.Event, seen: dict, errors: list, interval: float) -> None:
    """A reader during the races: every shard it accepts is whole and one writer's. The races
    run in order, so it watches the first key it has not seen committed yet."""
    while not stop.is_set():
        race = next((r for r in range(RACES) if f"race-{r:02d}" not in seen), None)
        if race is None:
            return
        key = f"race-{race:02d}"
        try:
            shard = store.open(key)
            _check_rows(shard, race)
            seen[key] = (race, shard)
        except ShardError as e:
            if "no commit record" not in str(e):
                errors.append(f"{key}: {e}")
        except (OSError, AssertionError) as e:  # records are never removed here: no read may fail
            errors.append(f"{key}: {e!r}")
        time.sleep(interval)


def _run_races(location: str, poll_interval: float) -> dict[int, list[tuple]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(WRITERS)), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(location, w, barrier, results)) for w in WRITERS]
    stop, seen, errors = threading.Event(), {}, []
    reader = threading.Thread(target=_poll, args=(LabelStore(location), stop, seen, errors, poll_interval), daemon=True)
    for p in procs:
        p.start()
    reader.start()
    outcomes: dict[int, list[tuple]] = {}
    try:
        for _ in range(RACES * len(WRITERS)):
            race, *rest = results.get(timeout=120)
            outcomes.setdefault(race, []).append(tuple(rest))
    finally:
        stop.set()
        reader.join()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert not errors, errors[:5]
    assert seen, "the reader never saw a committed shard during the races"
    for race, shard in seen.values():  # what it opened mid-race still reads the same
        _check_rows(shard, race)
    return outcomes


def _check_outcomes(store: LabelStore, outcomes: dict[int, list[tuple]]) -> list[int]:
    """Exactly one winner per race, the loser reports the winner's record, the store holds it."""
    winners = []
    for race in range(RACES):
        key = f"race-{race:02d}"
        results = outcomes[race]
        assert sorted(lost for _, lost, _, _ in results) == [False, True], f"{key}: {results}"
        ((winner, _, sha, who),) = [r for r in results if not r[1]]
        assert all(r[2] == sha and r[3] == who for r in results), f"{key}: the loser did not report the winner's record"
        shard = store.open(key)
        assert shard.record["sha256"] == sha and shard.meta.shard == f"writer-{winner}"
        _check_rows(shard, race)
        winners.append(winner)
    return winners


def test_two_processes_racing_locally_commit_exactly_once(tmp_path):
    store = LabelStore(tmp_path)
    t0 = time.perf_counter()
    winners = _check_outcomes(store, _run_races(str(tmp_path), poll_interval=0.005))
    names = sorted(p.name for p in store.path_for("race-00").parent.iterdir())
    assert names == sorted(f"race-{r:02d}{ext}" for r in range(RACES) for ext in (".json", ".parquet")), (
        f"losers' files, temporaries or lock files were left: {names}"
    )
    print(
        f"{RACES} local races in {time.perf_counter() - t0:.1f}s, wins per writer {np.bincount(winners, minlength=2)}"
    )


def test_two_processes_racing_on_s3_commit_exactly_once(s3_server):
    location = s3_server.replace("s3://labels/run", "s3://labels/races")
    store = LabelStore(location)
    t0 = time.perf_counter()
    # the server shares this process (and its GIL) with the reader: poll it gently
    winners = _check_outcomes(store, _run_races(location, poll_interval=0.03))
    from pyarrow.fs import FileSelector

    for race in range(RACES):
        key = f"race-{race:02d}"
        shard = store.open(key)
        folder = str(store.path_for(key).parent)
        names = sorted(
            Path(i.path).name for i in store.fs.get_file_info(FileSelector(folder)) if Path(i.path).name.startswith(key)
        )
        assert names == sorted([f"{key}.json", shard.file.name]), f"{key}: the loser left {names}"
    print(f"{RACES} S3 races in {time.perf_counter() - t0:.1f}s, wins per writer {np.bincount(winners, minlength=2)}")


def _commit(store: LabelStore, key: str, writer: int, race: int = 0) -> ShardWriter:
    with store.writer(key, _meta(key, writer)) as w:
        w.write_many(_rows(race, writer))
    return w


def test_a_late_writer_loses_and_reports_a_cache_hit(tmp_path):
    store = LabelStore(tmp_path)
    first = _commit(store, "k", 0)
    record = record_path(store.path_for("k")).read_text()
    late = _commit(store, "k", 1)
    assert not first.lost_race and late.lost_race and late.record == first.record
    assert record_path(store.path_for("k")).read_text() == record
    assert store.open("k").meta.shard == "writer-0"
    assert sorted(p.name for p in store.path_for("k").parent.iterdir()) == ["k.json", "k.parquet"]


def test_a_writer_killed_between_its_links_is_replaced_by_a_relabel(tmp_path):
    """A SIGKILL after ``<key>.parquet`` is linked but before the record: the file (and its
    temporary name, record temporary and lock file) stay; nothing is accepted; the next writer
    replaces the file, and cleanup removes the rest."""
    store = LabelStore(tmp_path)
    path = store.path_for("k")
    path.parent.mkdir(parents=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    path.write_bytes(b"half of someone else's shard")
    here = temp_name(path).name.rsplit("-", 2)[0]  # this host and boot: ".k.parquet.tmp-<host>-<boot>"
    os.link(path, path.with_name(f"{here}-{dead}-deadbeef"))
    record_path(path).with_name(f"{here.replace('.parquet', '.json')}-{dead}-deadbeef").write_text("{}")
    path.with_name(f".{path.name}{LOCK_SUFFIX}").touch()
    assert store.lookup("k") is None
    with pytest.raises(ShardError, match="no commit record"):
        store.open("k")
    w = _commit(store, "k", 1)
    assert not w.lost_race and store.open("k").meta.shard == "writer-1"
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.json", "k.parquet"]


def test_an_s3_writer_killed_before_its_record_is_never_overwritten(s3_server):
    """On S3 a writer killed after its upload leaves ``<key>.parquet`` without a record: the
    next writer cannot tell it from one in flight, so it commits under a unique name."""
    store = LabelStore(s3_server.replace("s3://labels/run", "s3://labels/stale"))
    stale = b"an upload whose writer died before its record"
    assert fsmod.put_if_absent(store.fs, str(store.path_for("k")), stale)
    assert store.lookup("k") is None
    w = _commit(store, "k", 1)
    shard = store.open("k")
    assert not w.lost_race and shard.file.name == w.record["file"] != "k.parquet"
    _check_rows(shard, 0)
    assert fsmod.read_bytes(store.fs, str(store.path_for("k"))) == stale
    late = _commit(store, "k", 0)
    assert late.lost_race and late.record == w.record
    assert pickle.loads(pickle.dumps(shard)).parquet().metadata.num_rows == ROWS


def test_a_verified_shard_keeps_its_bytes_when_the_name_is_replaced(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for path, writer in ((a, 0), (b, 1)):
        with ShardWriter(path, _meta(path.stem, writer)) as w:
            w.write_many(_rows(0, writer))
    shard = open_shard(a)
    os.replace(b, a)  # a relabel (or anything) swaps the name under the reader
    os.replace(record_path(b), record_path(a))
    _check_rows(shard, 0)  # still writer 0's rows, decoded with writer 0's id table
    assert shard.parquet().metadata.num_rows == ROWS
    assert open_shard(a).meta.shard == "writer-1"
    # a pickled shard cannot carry the open file: unpickled, it refuses a replaced one
    with pytest.raises(ShardError, match="replaced since it was verified"):
        pickle.loads(pickle.dumps(shard)).parquet()
    fresh = open_shard(a)
    copy = pickle.loads(pickle.dumps(fresh))
    _check_rows(copy, 0)


def test_label_shard_reports_a_lost_race_as_a_cache_hit(tmp_path):
    """Another run commits the key while this one labels: the teacher's work is discarded and
    the result is the other run's shard, reported as a cache hit."""
    import pyarrow as pa

    from distill.teacher.config import TeacherConfig
    from distill.teacher.labels import label_shard

    store = LabelStore(tmp_path)
    theirs = _rows(0, 0)

    class Engine:
        def score(self, input_ids, label_starts, k=None):
            if not store.is_committed("k"):
                _commit(store, "k", 0)  # the other run finishes first
            for row in _rows(0, 1)[: len(input_ids)]:
                n = len(row["target_logprobs"])
                yield {
                    "topk_ids": row["teacher_ids"].reshape(n, K),
                    "topk_logprobs": row["teacher_logprobs"].reshape(n, K),
                    "target_logprobs": row["target_logprobs"],
                    "tail_mass": row["rest_mass"],
                }

    mine = _rows(0, 1)
    windows = pa.table(
        {
            "doc_id": [r["doc_id"] for r in mine],
            "window_index": [r["window_index"] for r in mine],
            "input_ids": [r["input_ids"].tolist() for r in mine],
            "label_start": [r["label_start"] for r in mine],
        }
    )
    result = label_shard(Engine, store, "k", _meta("k", 1), windows, TeacherConfig(k=K), progress=False)
    assert result["cache_hit"] and result["lost_race"]
    assert result["rows"] == len(theirs) and result["tokens"] == sum(len(r["target_logprobs"]) for r in theirs)
    assert store.open("k").meta.shard == "writer-0"
