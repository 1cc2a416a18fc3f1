"""Shard writer/reader round trip, crash safety of commits, validation errors, streaming order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import codec
from storage.cache import LabelStore, content_key
from storage.reader import ShardError, ShardStream, StreamPosition, open_shard
from storage.schema import ShardMeta
from storage.writer import ShardWriter, record_path


def make_meta(vocab=49152, k=4, **kw):
    """Metadata of a test shard: top-``k`` labels unless ``kind``/``kind_params`` (or candidates mode) say otherwise."""
    kind = kw.pop("kind", "candidates" if kw.get("mode") == "candidates" else "topk")
    base = dict(
        teacher="t",
        teacher_hash="w1",
        tokenizer_hash="tok1",
        vocab_size=vocab,
        kind=kind,
        kind_params=kw.pop("kind_params", {"k": k} if kind == "topk" else {}),
        temperature=1.0,
        mode="score",
        engine="test",
        data_fingerprint="fp",
        shard="train-00000",
        split="train",
        cache_key="key",
        code_version="test",
    )
    base.update(kw)
    return ShardMeta(**base)


def make_rows(n_rows, vocab, k, seed=0, length=(3, 20)):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        L = int(rng.integers(*length))
        label_start = int(rng.integers(0, L - 1))
        n = L - 1 - label_start
        logits = rng.normal(size=(n, 64)) * 2.5
        full_lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        lp = -np.sort(-full_lp, axis=1)[:, :k].astype(np.float32)
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]) if n else np.zeros((0, k), np.int64)
        rows.append(
            {
                "doc_id": f"doc-{i // 3}",
                "window_index": i % 3,
                "input_ids": rng.integers(0, vocab, L),
                "label_start": label_start,
                "teacher_ids": ids.reshape(-1),
                "teacher_logprobs": lp.reshape(-1),
                "target_logprobs": full_lp[:, 5].astype(np.float32),
                "rest_mass": (1 - np.exp(lp.astype(np.float64)).sum(1)).astype(np.float32),
            }
        )
    return rows


@pytest.mark.parametrize("vocab", [49152, 151_936])  # uint16 ids, and a Qwen-size vocabulary (uint32)
def test_round_trip(tmp_path, vocab):
    k = 4
    rows = make_rows(150, vocab, k)
    path = tmp_path / "s.parquet"
    with ShardWriter(path, make_meta(vocab, k), row_group_rows=64) as w:
        w.write_many(rows)
    shard = open_shard(path, expect={"vocab_size": vocab, "kind": "topk", "kind_params": {"k": k}, "slots": k})
    assert shard.rows == 150
    assert shard.tokens == sum(len(r["target_logprobs"]) for r in rows)
    assert shard.parquet().metadata.num_row_groups == 3
    got = [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]
    assert len(got) == len(rows)
    for a, b in zip(rows, got):
        assert a["doc_id"] == b["doc_id"] and a["label_start"] == b["label_start"]
        for col in ("input_ids", "teacher_ids"):
            np.testing.assert_array_equal(np.asarray(a[col], np.int64), b[col].astype(np.int64))
        np.testing.assert_allclose(b["target_logprobs"], a["target_logprobs"], atol=1e-3)
        tail = a["rest_mass"].astype(np.float64)
        np.testing.assert_allclose(b["rest_mass"], tail, rtol=codec.TAIL_MAX_REL_ERROR, atol=0)
        np.testing.assert_allclose(1 - b["rest_mass"], 1 - tail, rtol=codec.TAIL_MAX_REL_ERROR, atol=0)
        n = len(a["rest_mass"])
        if n:
            p = np.exp(a["teacher_logprobs"].reshape(n, k).astype(np.float64))
            q = np.exp(b["teacher_logprobs"].reshape(n, k).astype(np.float64))
            assert np.all(np.diff(q, axis=1) <= 1e-12), "top-k order preserved"
            p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
            assert (p * np.log(p / q)).sum(1).mean() <= 1e-3
    # plain pyarrow reads it too
    assert pq.read_table(path).num_rows == 150


def test_tail_code_relative_error():
    """The tail mass code keeps the relative error of the tail AND of the top-k mass 1 - tail
    within ``codec.TAIL_MAX_REL_ERROR`` (9.8e-4) from tails of 1e-12 to 1 - 1e-7 (log-spaced at
    both ends, 20,000 values), and stores 0 and 1 exactly. The linear code it replaced stored
    every tail below 2.4e-4 as 0 (relative error 1) and 1 - tail near 1 to 2.4e-4 absolute."""
    small = np.logspace(-12, np.log10(0.5), 10_000)
    tails = np.concatenate([small, 1 - small[small >= 1e-7]])
    decoded = codec.decode_tail(codec.encode_tail(tails))
    assert decoded.dtype == np.float64
    rel_tail = np.abs(decoded - tails) / tails
    rel_mass = np.abs((1 - decoded) - (1 - tails)) / (1 - tails)
    assert rel_tail.max() <= codec.TAIL_MAX_REL_ERROR and rel_mass.max() <= codec.TAIL_MAX_REL_ERROR
    assert rel_tail.max() > 0.9 * codec.TAIL_MAX_REL_ERROR  # the bound is tight, not loose
    edges = np.array([0.0, 1.0])
    np.testing.assert_array_equal(codec.decode_tail(codec.encode_tail(edges)), edges)
    # float32 inputs (what the teacher writes) keep the bound against their own value
    tails32 = tails.astype(np.float32)
    tails32 = tails32[(tails32 > 0) & (tails32 < 1)].astype(np.float64)
    decoded32 = codec.decode_tail(codec.encode_tail(tails32))
    assert (np.abs(decoded32 - tails32) <= codec.TAIL_MAX_REL_ERROR * tails32).all()
    assert (np.abs(decoded32 - tails32) <= codec.TAIL_MAX_REL_ERROR * (1 - tails32)).all()
    # the decoded top-k carry 1 - tail to the same relative error
    lp = np.log(np.array([[0.6, 0.3, 0.1]]))
    for tail in (1e-9, 1e-4, 0.5, 1 - 1e-6):
        got = codec.decode_topk_logprobs(
            codec.encode_topk_logprobs(lp), codec.decode_tail(codec.encode_tail(np.array([tail])))
        )
        assert (
            abs(np.exp(got.astype(np.float64)).sum() / (1 - tail) - 1) <= codec.TAIL_MAX_REL_ERROR + 1e-6
        )  # + float32 logprobs
    with pytest.raises(ValueError, match="NaN"):
        codec.encode_tail(np.array([0.1, np.nan]))


def test_inconsistent_row_is_rejected(tmp_path):
    row = make_rows(1, 100, 4)[0]
    row["rest_mass"] = row["rest_mass"][:-1] if len(row["rest_mass"]) else np.ones(1, np.float32)
    with pytest.raises(ValueError, match="inconsistent lengths"):
        with ShardWriter(tmp_path / "s.parquet", make_meta(100, 4)) as w:
            w.write(row)
    assert not list(tmp_path.iterdir()), "an aborted writer leaves nothing behind"


def test_uncommitted_shard_is_invisible(tmp_path):
    path = tmp_path / "s.parquet"
    w = ShardWriter(path, make_meta())
    w.write_many(make_rows(10, 49152, 4))
    # "crash" before close: neither the final file nor a record exists
    assert not path.exists() and not record_path(path).exists()
    with pytest.raises(ShardError, match="no commit record"):
        open_shard(path)
    w.abort()
    assert not list(tmp_path.iterdir())


def _committed(tmp_path, **meta):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "s.parquet"
    with ShardWriter(path, make_meta(**meta)) as w:
        w.write_many(make_rows(20, meta.get("vocab", 49152), 4))
    return path


def test_truncated_file_is_rejected(tmp_path):
    path = _committed(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated"):
        open_shard(path)


def test_flipped_byte_is_rejected(tmp_path):
    path = _committed(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        open_shard(path)


@pytest.mark.parametrize(
    "field,value",
    [
        ("teacher_hash", "other"),
        ("tokenizer_hash", "other"),
        ("kind", "sampled"),
        ("kind_params", {"k": 8}),
        ("vocab_size", 32000),
    ],
)
def test_shard_from_another_run_is_rejected(tmp_path, field, value):
    path = _committed(tmp_path)
    with pytest.raises(ShardError, match=field):
        open_shard(path, expect={field: value})


def test_bad_values_are_rejected_at_write(tmp_path):
    rows = make_rows(5, 500, 4)
    rows[2]["teacher_ids"] = rows[2]["teacher_ids"] * 0 + 999
    with pytest.raises(ValueError, match=r"doc-0#2: teacher_ids outside \[0, vocab_size=500\)"):
        with ShardWriter(tmp_path / "a.parquet", make_meta(vocab=500, k=4)) as w:
            w.write_many(rows)
    rows = make_rows(5, 100, 4, seed=1)
    rows[1]["teacher_logprobs"] = rows[1]["teacher_logprobs"][::-1].copy()
    with pytest.raises(ValueError, match="sorted descending"):
        with ShardWriter(tmp_path / "b.parquet", make_meta(vocab=100, k=4)) as w:
            w.write_many(rows)
    rows = make_rows(5, 100, 4, seed=2)
    rows[0]["teacher_logprobs"] = np.abs(rows[0]["teacher_logprobs"]) + 0.5
    with pytest.raises(ValueError, match="<= 0"):
        with ShardWriter(tmp_path / "c.parquet", make_meta(vocab=100, k=4)) as w:
            w.write_many(rows)
    assert not list(tmp_path.iterdir()), "rejected shards leave no files"


def _rewrite(path, name, fn):
    """Replace one column with fn(column), keeping metadata, and re-seal the record (a bad writer)."""
    from storage.writer import file_sha256

    pf = pq.ParquetFile(path)
    table = pf.read()
    i = table.schema.get_field_index(name)
    new = fn(table.column(i))
    table = table.set_column(i, pa.field(name, new.type), new)
    with pq.ParquetWriter(path, table.schema) as w:
        w.add_key_value_metadata(pf.metadata.metadata)
        w.write_table(table)
    rec = json.loads(record_path(path).read_text())
    rec.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    record_path(path).write_text(json.dumps(rec))


def test_bad_values_are_rejected_at_read(tmp_path):
    path = _committed(tmp_path)
    _rewrite(
        path,
        "topk_ids",
        lambda col: pa.ListArray.from_arrays(
            col.combine_chunks().offsets, pa.array(np.full(len(col.combine_chunks().flatten()), 65000, np.uint16))
        ),
    )
    with pytest.raises(ShardError, match="beyond the id table"):
        list(ShardStream([open_shard(path)]).rows(epochs=1))
    path2 = _committed(tmp_path / "b")
    _rewrite(
        path2,
        "topk_logprob_codes",
        lambda col: pa.ListArray.from_arrays(
            col.combine_chunks().offsets, pa.array(np.full(len(col.combine_chunks().flatten()), 200, np.uint8))
        ),
    )
    with pytest.raises(ShardError, match="exceed the encoding's levels"):
        list(ShardStream([open_shard(path2)]).rows(epochs=1))


def test_wrong_column_type_is_rejected(tmp_path):
    path = _committed(tmp_path)
    _rewrite(path, "tail_mass_codes", lambda col: col.cast(pa.list_(pa.float64())))
    with pytest.raises(ShardError, match="tail_mass_codes"):
        open_shard(path)


def _stream_ids(stream, start=StreamPosition(), n=None):
    out = []
    for row, pos in stream.rows(start, epochs=1 if n is None else None):
        out.append((row["doc_id"], row["window_index"], int(row["input_ids"][0])))
        if n is not None and len(out) == n:
            return out, pos
    return out, None


def test_stream_is_deterministic_resumable_and_rank_disjoint(tmp_path):
    shards = []
    for s in range(3):
        path = tmp_path / f"s{s}.parquet"
        with ShardWriter(path, make_meta(shard=f"train-{s:05d}"), row_group_rows=8) as w:
            w.write_many(make_rows(30, 49152, 4, seed=s))
        shards.append(open_shard(path))
    full, _ = _stream_ids(ShardStream(shards, seed=3))
    assert full == _stream_ids(ShardStream(shards, seed=3))[0]
    assert full != _stream_ids(ShardStream(shards, seed=4))[0]
    assert len(full) == 90
    # resume exactly from any position
    for cut in (1, 7, 8, 45, 89):
        head, pos = _stream_ids(ShardStream(shards, seed=3), n=cut)
        tail, _ = _stream_ids(ShardStream(shards, seed=3), start=pos)
        assert head + tail[: 90 - cut] == full
    # ranks: disjoint and equal (row groups of 8, 8, 8, 6 per shard: shares differ, each rank
    # yields the smallest; tests/storage/test_stream.py checks the rule)
    parts = [_stream_ids(ShardStream(shards, seed=3, rank=r, world_size=3))[0] for r in range(3)]
    merged = sum(parts, [])
    assert len({len(p) for p in parts}) == 1 and len(set(merged)) == len(merged) and set(merged) <= set(full)


def test_label_store_lookup(tmp_path):
    store = LabelStore(tmp_path)
    key = content_key({"a": 1})
    assert key == content_key({"a": 1}) and key != content_key({"a": 2})
    assert store.lookup(key) is None
    with ShardWriter(store.path_for(key), make_meta(cache_key=key)) as w:
        w.write_many(make_rows(4, 49152, 4))
    assert store.lookup(key).rows == 4
    # a corrupted committed shard is not reused: its record is dropped so it gets relabelled
    data = bytearray(store.path_for(key).read_bytes())
    data[10] ^= 1
    store.path_for(key).write_bytes(bytes(data))
    assert store.lookup(key) is None
    assert not store.is_committed(key)


def test_workers_within_ranks_split_without_overlap(tmp_path):
    path = tmp_path / "s.parquet"
    with ShardWriter(path, make_meta(), row_group_rows=4) as w:
        w.write_many(make_rows(40, 49152, 4))
    shard = open_shard(path)
    full = sorted(_stream_ids(ShardStream([shard], seed=1))[0])
    parts = [
        _stream_ids(ShardStream([shard], seed=1, rank=r, world_size=2, worker=w, num_workers=2))[0]
        for r in range(2)
        for w in range(2)
    ]
    # 10 row groups over 4 (rank, worker) pairs: 3, 3, 2, 2; each yields 2 groups' rows
    merged = sum(parts, [])
    assert [len(p) for p in parts] == [8] * 4 and len(set(merged)) == 32 and set(merged) <= set(full)


def test_generate_and_candidates_shards_round_trip(tmp_path):
    from storage.reader import shard_stats

    # generate: token labels plus the prompt and answer text
    rows = [
        {**r, "prompt_text": f"prompt {i}", "response_text": f"answer {i}", "finish_reason": "stop"}
        for i, r in enumerate(make_rows(10, 49152, 4))
    ]
    meta = make_meta(mode="generate", settings={"sampling": {"n": 1, "temperature": 0.7}})
    with ShardWriter(tmp_path / "g.parquet", meta) as w:
        w.write_many(rows)
    shard = open_shard(tmp_path / "g.parquet", expect={"mode": "generate"})
    assert shard.meta.settings == {"sampling": {"n": 1, "temperature": 0.7}}
    got = [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]
    assert [(g["prompt_text"], g["response_text"]) for g in got] == [
        (r["prompt_text"], r["response_text"]) for r in rows
    ]
    with pytest.raises(ShardError, match="field 'mode' is 'generate' but the run expects 'score'"):
        open_shard(tmp_path / "g.parquet", expect={"mode": "score"})

    # candidates: one example per row, stored plain
    examples = [
        {
            "doc_id": f"c{i}",
            "prompt_text": "p",
            "prompt_ids": [1, 2],
            "candidates": ["a", "bb", "c"][: 2 + i % 2],
            "candidate_ids": [[3], [4, 5], [6]][: 2 + i % 2],
            "answer": i % 2 - (i == 4),
            "candidate_scores": np.array([-1.0, -2.0, -3.0][: 2 + i % 2], np.float32),
        }
        for i in range(6)
    ]
    for e in examples:
        s = e["candidate_scores"].astype(np.float64)
        e["teacher_logprobs"] = (s - np.log(np.exp(s).sum())).astype(np.float32)
    with ShardWriter(tmp_path / "c.parquet", make_meta(mode="candidates")) as w:
        w.write_many(examples)
    shard = open_shard(tmp_path / "c.parquet", expect={"mode": "candidates"})
    assert shard.rows == shard.tokens == 6
    got = [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]
    for g, e in zip(got, examples):
        assert (
            g["candidates"] == e["candidates"]
            and g["candidate_ids"] == e["candidate_ids"]
            and g["answer"] == e["answer"]
        )
        np.testing.assert_array_equal(g["teacher_logprobs"], e["teacher_logprobs"])
    assert shard_stats(shard)["problems"] == [] and shard_stats(shard)["rows"] == shard_stats(shard)["tokens"] == 6
    from storage.export import export_axolotl

    with pytest.raises(ValueError, match="candidates shards hold a distribution"):
        export_axolotl([shard], tmp_path / "x.parquet")
    bad = [
        ({**examples[0], "answer": 2}, "answer 2 is not -1 or an index"),
        ({**examples[0], "candidates": ["only"], "candidate_ids": [[1]]}, "needs >= 2 candidates"),
        ({**examples[0], "teacher_logprobs": np.array([0.0, 0.0], np.float32)}, "normalized log-distribution"),
    ]
    for row, match in bad:
        with (
            pytest.raises(ValueError, match=match),
            ShardWriter(tmp_path / "bad.parquet", make_meta(mode="candidates")) as w,
        ):
            w.write(row)
        assert not (tmp_path / "bad.parquet").exists() and not record_path(tmp_path / "bad.parquet").exists()
