"""Label kinds (``storage.kinds``): every registered kind round-trips through the writer and the
reader under its own column names, refuses rows that are not its labels, and says which losses
accept it; shards of an older schema are refused with a message that says to relabel."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.kinds import EXAMPLES, KINDS, POSITIONS, kind_of
from storage.kinds.mixture import mix
from storage.kinds.sampled import row_rng, sample
from storage.reader import ShardError, ShardStream, open_shard, shard_stats
from storage.schema import METADATA_KEY, SCHEMA_VERSION, ShardMeta, arrow_schema
from storage.writer import ShardWriter, file_sha256, record_path
from tests.storage.test_shards import make_meta, make_rows

VOCAB, K = 500, 4


def _read(path):
    return [r for r, _ in ShardStream([open_shard(path)], shuffle=False).rows(epochs=1)]


def _engine_labels(row, k=K):
    """A written top-k row as the teacher's engine returns it (what other kinds are made from)."""
    n = len(row["target_logprobs"])
    return {
        "topk_ids": row["teacher_ids"].reshape(n, k),
        "topk_logprobs": row["teacher_logprobs"].reshape(n, k),
        "target_logprobs": row["target_logprobs"],
        "tail_mass": row["rest_mass"],
    }


def test_registry_names_every_kind_once_with_its_layout():
    assert sorted(KINDS) == ["candidates", "mixture", "sampled", "topk"]
    for name, kind in KINDS.items():
        assert kind.name == name and kind.layout in (POSITIONS, EXAMPLES)
    assert [n for n, k in KINDS.items() if k.layout == EXAMPLES] == ["candidates"]
    with pytest.raises(ValueError, match=r"label kind 'full' is unknown to this code \(known: \['candidates'"):
        kind_of("full")
    with pytest.raises(ValueError, match=r"label kind 'topk' takes kind_params \['k'\], got \['draws'\]"):
        make_meta(kind="topk", kind_params={"draws": 4})
    with pytest.raises(ValueError, match="mode 'score' cannot hold 'candidates' labels"):
        make_meta(kind="candidates")


def test_each_kind_stores_columns_named_for_what_they_hold():
    names = {
        name: [f.name for f in arrow_schema(make_meta(vocab=VOCAB, kind=name, kind_params=params))][4:]
        for name, params in (
            ("topk", {"k": 4}),
            ("sampled", {"draws": 8, "proposal_k": 16, "sampler": "systematic", "seed": 0}),
            ("mixture", {"k": 4, "members": 2}),
        )
    }
    assert names == {
        "topk": ["topk_ids", "topk_logprob_codes", "target_logprob_codes", "tail_mass_codes"],
        "sampled": ["draw_ids", "draw_counts", "target_logprob_codes"],
        "mixture": ["mixture_ids", "mixture_logprob_codes", "target_logprob_codes", "rest_mass_codes"],
    }


def test_sampled_labels_round_trip_exactly_and_rest_mass_is_the_undrawn_share(tmp_path):
    draws = 12
    params = {"draws": draws, "proposal_k": 16, "sampler": "systematic", "seed": 3}
    kind = kind_of("sampled")
    rows = [
        {**r, **kind.from_teacher(_engine_labels(r, 16), params, r["doc_id"], r["window_index"])}
        for r in make_rows(40, VOCAB, 16)
    ]
    # the draws depend on the row only (its doc_id and window), not on where it is labelled
    again = kind.from_teacher(
        _engine_labels(make_rows(40, VOCAB, 16)[7], 16), params, rows[7]["doc_id"], rows[7]["window_index"]
    )
    np.testing.assert_array_equal(again["teacher_ids"], rows[7]["teacher_ids"])
    path = tmp_path / "s.parquet"
    with ShardWriter(path, make_meta(vocab=VOCAB, kind="sampled", kind_params=params)) as w:
        w.write_many(rows)
    got = _read(path)
    assert open_shard(path).meta.slots == draws
    for a, b in zip(rows, got):
        np.testing.assert_array_equal(a["teacher_ids"], b["teacher_ids"])
        np.testing.assert_array_equal(a["teacher_logprobs"], b["teacher_logprobs"])  # -inf included
        n = len(a["target_logprobs"])
        counts = np.rint(np.exp(b["teacher_logprobs"].reshape(n, draws).astype(np.float64)) * draws)
        np.testing.assert_allclose(b["rest_mass"], 1 - counts.sum(1) / draws, rtol=0, atol=1e-12)
        np.testing.assert_allclose(b["rest_mass"], a["rest_mass"], atol=1e-7)
    bad = dict(rows[1], rest_mass=np.full_like(rows[1]["rest_mass"], 0.5))
    with pytest.raises(ValueError, match=r"row doc-0#1: sampled rest_mass must be the share of the 12 draws"):
        with ShardWriter(tmp_path / "bad.parquet", make_meta(vocab=VOCAB, kind="sampled", kind_params=params)) as w:
            w.write(bad)
    assert not (tmp_path / "bad.parquet").exists()


def test_mixture_round_trips_its_padded_union(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for x in make_rows(30, VOCAB, K):
        n = len(x["target_logprobs"])
        other = rng.permutation(VOCAB)[: n * K] if n else x["teacher_ids"]  # another teacher: other ids
        members = [
            {**{c: x[c] for c in ("target_logprobs", "rest_mass")}, "teacher_ids": ids.reshape(n, K)}
            | {"teacher_logprobs": x["teacher_logprobs"].reshape(n, K)}
            for ids in (x["teacher_ids"], other)
        ]
        mixed = mix(members, [1, 3])
        rows.append({**x, **{c: v.reshape(-1) for c, v in mixed.items()}})
    params = {"k": K, "members": 2}
    with ShardWriter(tmp_path / "m.parquet", make_meta(vocab=VOCAB, kind="mixture", kind_params=params)) as w:
        w.write_many(rows)
    for x, y in zip(rows, _read(tmp_path / "m.parquet")):
        np.testing.assert_array_equal(np.isfinite(x["teacher_logprobs"]), np.isfinite(y["teacher_logprobs"]))
        live = np.isfinite(x["teacher_logprobs"])
        np.testing.assert_array_equal(x["teacher_ids"][live], y["teacher_ids"][live])
        np.testing.assert_allclose(y["rest_mass"], x["rest_mass"], rtol=1e-3)
    assert shard_stats(open_shard(tmp_path / "m.parquet"))["problems"] == []


def test_sampler_draws_are_seeded_by_the_row():
    rng_a, rng_b = row_rng(0, "doc", 3), row_rng(0, "doc", 3)
    assert rng_a.random() == rng_b.random() and row_rng(0, "doc", 4).random() != row_rng(0, "doc", 3).random()
    labels = {"topk_ids": np.arange(4)[None], "topk_logprobs": np.log([[0.4, 0.3, 0.2, 0.05]]), "tail_mass": [0.05]}
    labels["target_logprobs"] = np.zeros(1)
    out = sample(labels, 20, np.random.default_rng(0))
    assert out["teacher_ids"].shape == (1, 20) and np.isclose(
        np.exp(out["teacher_logprobs"]).sum() + out["rest_mass"][0], 1
    )


def test_loss_rules_name_what_each_kind_refuses():
    assert KINDS["topk"].rules.refusals("reverse_kl", "renormalize", 2.0, True) == []
    assert KINDS["mixture"].rules.refusals("jsd", "bucket", 1.0, False) == []
    assert KINDS["sampled"].rules.refusals("reverse_kl", "renormalize", 2.0, True) == [
        ("divergence", "forward_kl"),
        ("tail", "bucket"),
        ("temperature", "1.0"),
        ("tokenizer", "the teacher's tokenizer"),
    ]
    assert KINDS["sampled"].rules.refusals("forward_kl", "bucket", 1.0, False) == []
    assert KINDS["candidates"].rules.refusals("jsd", "bucket", 1.0, False) == [("divergence", "forward_kl")]


def test_each_kind_describes_itself():
    assert KINDS["topk"].describe({"k": 32}) == "top-32 logprobs and the tail mass"
    sampled = {"draws": 64, "proposal_k": 2048, "sampler": "systematic", "seed": 0}
    assert KINDS["sampled"].describe(sampled) == (
        "sampled ids with counts (64 systematic draws per position from the top-2048 + tail)"
    )
    assert "mixture of 3 teachers' top-8" in KINDS["mixture"].describe({"k": 8, "members": 3})


def test_a_shard_of_schema_5_is_refused_with_what_to_do(tmp_path):
    """A shard written before label kinds (schema 5: ``k`` in its metadata, no ``kind``) is
    refused naming the file, its version and what to do; its columns alone would read fine."""
    path = tmp_path / "old.parquet"
    with ShardWriter(path, make_meta(vocab=VOCAB)) as w:
        w.write_many(make_rows(10, VOCAB, K))
    pf = pq.ParquetFile(path)
    meta = json.loads(pf.metadata.metadata[METADATA_KEY])
    del meta["kind"], meta["kind_params"]
    old = {**meta, "k": K, "schema_version": 5}
    footer = {**pf.metadata.metadata, METADATA_KEY: json.dumps(old, sort_keys=True).encode()}
    table = pf.read()
    with pq.ParquetWriter(path, table.schema) as out:
        out.add_key_value_metadata(footer)
        out.write_table(table)
    record = json.loads(record_path(path).read_text())
    record.update(bytes=path.stat().st_size, sha256=file_sha256(path), meta=old)
    record_path(path).write_text(json.dumps(record))
    assert SCHEMA_VERSION == 6
    with pytest.raises(ShardError, match=r"old\.parquet: schema_version 5 but this code reads 6 \(written by an older"):
        open_shard(path)
    with pytest.raises(ShardError, match="relabel its partition"):
        open_shard(path)
    with pytest.raises(ValueError, match=r"lacks fields \['kind', 'kind_params'\]"):
        ShardMeta.from_dict(old)
