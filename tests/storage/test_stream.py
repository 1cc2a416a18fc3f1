"""The shuffle buffer: rows mixed across many row groups and shards, still deterministic,
resumable exactly from any position and disjoint across ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.reader import ShardStream, open_shard
from storage.writer import ShardWriter
from tests.storage.test_shards import _stream_ids, make_meta, make_rows


@pytest.fixture
def shards(tmp_path):
    """3 shards of 40 consecutive windows of 10 documents (4 windows each), 8 rows per row group:
    the layout of a real corpus, where a row group holds consecutive windows of few documents."""
    out = []
    for s in range(3):
        rows = make_rows(40, 49152, 4, seed=s)
        for i, r in enumerate(rows):
            r["doc_id"], r["window_index"] = f"s{s}-d{i // 4}", i % 4
        path = tmp_path / f"s{s}.parquet"
        with ShardWriter(path, make_meta(shard=f"train-{s:05d}"), row_group_rows=8) as w:
            w.write_many(rows)
        out.append(open_shard(path))
    return out


def _docs_per_batch(ids, batch=8):
    return np.mean([len({d for d, _, _ in ids[i : i + batch]}) for i in range(0, len(ids) - batch + 1, batch)])


def test_buffer_mixes_documents_across_row_groups_and_shards(shards):
    one_group, _ = _stream_ids(ShardStream(shards, seed=0))
    mixed, _ = _stream_ids(ShardStream(shards, seed=0, shuffle_buffer=64))
    assert sorted(one_group) == sorted(mixed) and len(mixed) == 120  # the same rows, once each
    # a row group holds 2 documents, so a batch of 8 from one row group sees 2; 64 rows of buffer
    # (8 row groups, 16 documents, all 3 shards) give a batch of 8 about 6 distinct documents
    assert _docs_per_batch(one_group) == 2.0
    assert _docs_per_batch(mixed) >= 5.0
    first_chunk_shards = {d.split("-")[0] for d, _, _ in mixed[:64]}
    assert len(first_chunk_shards) == 3


@pytest.mark.parametrize("buffer", [16, 64, 1000])
def test_buffer_resumes_exactly_and_splits_ranks(shards, buffer):
    full, _ = _stream_ids(ShardStream(shards, seed=3, shuffle_buffer=buffer))
    assert full == _stream_ids(ShardStream(shards, seed=3, shuffle_buffer=buffer))[0]
    assert full != _stream_ids(ShardStream(shards, seed=4, shuffle_buffer=buffer))[0]
    for cut in (1, 7, 8, 63, 64, 65, 119):
        head, pos = _stream_ids(ShardStream(shards, seed=3, shuffle_buffer=buffer), n=cut)
        tail, _ = _stream_ids(ShardStream(shards, seed=3, shuffle_buffer=buffer), start=pos)
        assert head + tail[: 120 - cut] == full, f"resume after {cut} rows differs"
    # 15 row groups over 2 ranks: 8 and 7; each rank yields the smaller share (56 rows)
    parts = [_stream_ids(ShardStream(shards, seed=3, shuffle_buffer=buffer, rank=r, world_size=2))[0] for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 56
    assert not set(parts[0]) & set(parts[1]) and set(parts[0] + parts[1]) <= set(full)


def _epochs(stream, epochs, start=None):
    """Rows of ``epochs`` epochs, grouped by the epoch the stream says they belong to."""
    from storage.reader import StreamPosition

    out, pos = {}, start or StreamPosition()
    epoch = pos.epoch
    for row, nxt in stream.rows(pos, epochs=epochs):
        out.setdefault(epoch, []).append((row["doc_id"], row["window_index"]))
        epoch = nxt.epoch
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_get_equal_shares_when_row_groups_do_not_divide(shards, world):
    """Ragged row groups (8 per group, a shard's last one short) over ranks they do not divide:
    every rank yields the same rows per epoch, so ranks cross epoch boundaries together; the
    rows skipped change from epoch to epoch, and a resumed rank continues exactly."""
    import dataclasses

    # 3 x 40 rows = 15 groups of 8, and a 4th shard of 13 rows: groups of 8 and 5 (133 rows)
    path = shards[0].path.parent / "s3.parquet"
    rows = make_rows(13, 49152, 4, seed=9)
    for i, r in enumerate(rows):
        r["doc_id"], r["window_index"] = f"s3-d{i}", 0
    with ShardWriter(path, make_meta(shard="train-00003"), row_group_rows=8) as w:
        w.write_many(rows)
    short = [*shards, open_shard(path)]
    streams = [ShardStream(short, seed=5, shuffle_buffer=16, rank=r, world_size=world) for r in range(world)]
    per_rank = [_epochs(s, 3) for s in streams]
    skipped = []
    for epoch in range(3):
        counts = [len(p[epoch]) for p in per_rank]
        assert len(set(counts)) == 1, f"epoch {epoch}: ranks yield {counts} rows"
        assert counts[0] == streams[0].rows_per_epoch(epoch) > 0
        seen = [x for p in per_rank for x in p[epoch]]
        assert len(seen) == len(set(seen)), "ranks overlap"
        skipped.append(133 - len(seen))
        assert 0 <= skipped[-1] < 8 * world
    # resume rank 1 from the middle of epoch 1 and from an epoch boundary
    for cut in (streams[1].rows_per_epoch(0) + 3, streams[1].rows_per_epoch(0)):
        head, pos = _stream_ids(ShardStream(short, seed=5, shuffle_buffer=16, rank=1, world_size=world), n=cut)
        tail, _ = _stream_ids(ShardStream(short, seed=5, shuffle_buffer=16, rank=1, world_size=world), start=pos, n=5)
        whole, _ = _stream_ids(ShardStream(short, seed=5, shuffle_buffer=16, rank=1, world_size=world), n=cut + 5)
        assert head + tail == whole, f"resume after {cut} rows differs"
        assert dataclasses.asdict(pos)["epoch"] == 1
    # the skipped rows are not the same every epoch: over 3 epochs more rows are read than in one
    every = {x for p in per_rank for e in range(3) for x in p[e]}
    assert max(skipped) > 0 and len(every) > 133 - min(skipped)


def test_fewer_row_groups_than_ranks_is_a_clear_error(shards):
    with pytest.raises(ValueError, match=r"hold 15 row group\(s\), fewer than the 16 ranks x workers"):
        ShardStream(shards, rank=0, world_size=16)


def test_position_from_another_buffer_size_is_refused(shards):
    _, pos = _stream_ids(ShardStream(shards, seed=3, shuffle_buffer=8), n=9)  # chunk of 1 unit: unit 1
    with pytest.raises(ValueError, match="resume with the shuffle_buffer the position was saved with"):
        next(ShardStream(shards, seed=3, shuffle_buffer=64).rows(pos))


def test_unshuffled_stream_keeps_file_order(shards):
    ordered, _ = _stream_ids(ShardStream(shards, shuffle=False, shuffle_buffer=64))
    assert [d for d, _, _ in ordered[:4]] == ["s0-d0"] * 4 and ordered[-1][0] == "s2-d9"


def _mixed(stream, n, start=None):
    from storage.reader import MixPosition

    out, pos = [], start or MixPosition()
    if n == 0:
        return out, pos
    for row, pos in stream.rows(pos):
        out.append((row["doc_id"], row["window_index"]))
        if len(out) == n:
            break
    return out, pos


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_mix_stream_draws_its_share_and_resumes_exactly(shards, share):
    """GKD's lambda: each row comes from the extra stream (the student's answers) with
    probability ``share``; both streams loop over their own epochs and resume exactly."""
    from storage.reader import MixPosition, MixStream

    def make():
        return MixStream(
            ShardStream(shards[:2], seed=1, shuffle_buffer=16), ShardStream(shards[2:], seed=2), share, seed=5
        )

    full, _ = _mixed(make(), 300)  # past an epoch of either stream
    extra = [d for d, _ in full if d.startswith("s2-")]
    assert len(extra) == sum(make().takes_extra(i) for i in range(300))
    if share in (0.0, 1.0):
        assert len(extra) == 300 * share
    else:
        assert abs(len(extra) / 300 - share) < 0.08, len(extra)
    # the rows of each stream are that stream's own order, unaffected by the mixing
    main_rows = [r for r in full if not r[0].startswith("s2-")]
    alone, _ = _mixed(
        MixStream(ShardStream(shards[:2], seed=1, shuffle_buffer=16), ShardStream(shards[2:], seed=2), 0.0),
        len(main_rows),
    )
    assert main_rows == alone
    for cut in (1, 37, 80, 201):
        head, pos = _mixed(make(), cut)
        restored = MixPosition.from_dict(pos.to_dict())  # as a checkpoint stores it
        assert restored == pos
        tail, _ = _mixed(make(), 300 - cut, restored)
        assert head + tail == full, f"resume after {cut} rows differs"
    # rows of the extra stream say so; the trainer's collate turns that into kd_only positions
    from distill.train.trainer import collate

    rows = [row for row, _ in zip((r for r, _ in make().rows()), range(16))]
    assert all(bool(r.get("from_extra")) == r["doc_id"].startswith("s2-") for r in rows)
    batch = collate(rows, shards[0].meta.slots)
    own = torch.tensor([r["doc_id"].startswith("s2-") for r in rows])
    if own.any():
        assert torch.equal(batch["kd_only"], batch["mask"] & own[:, None])
    else:
        assert "kd_only" not in batch
    with pytest.raises(ValueError, match="share"):
        MixStream(ShardStream(shards), ShardStream(shards), 1.5)
