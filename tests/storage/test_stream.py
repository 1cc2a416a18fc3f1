"""The shuffle buffer: rows mixed across many row groups and shards, still deterministic,
resumable exactly from any position and disjoint across ranks."""
from __future__ import annotations

import numpy as np
import pytest

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
    parts = [_stream_ids(ShardStream(shards, seed=3, shuffle_buffer=buffer, rank=r, world_size=2))[0] for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(full)


def test_position_from_another_buffer_size_is_refused(shards):
    _, pos = _stream_ids(ShardStream(shards, seed=3, shuffle_buffer=8), n=9)  # chunk of 1 unit: unit 1
    with pytest.raises(ValueError, match="resume with the shuffle_buffer the position was saved with"):
        next(ShardStream(shards, seed=3, shuffle_buffer=64).rows(pos))


def test_unshuffled_stream_keeps_file_order(shards):
    ordered, _ = _stream_ids(ShardStream(shards, shuffle=False, shuffle_buffer=64))
    assert [d for d, _, _ in ordered[:4]] == ["s0-d0"] * 4 and ordered[-1][0] == "s2-d9"
