"""Teacher ensembles: the mixture (``storage.kinds.mixture``) against a dense reference, padded
top-k storage, and the shard-level mix (alignment checks, provenance, round trip)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distill.teacher.ensemble import mix_shard
from storage import codec
from storage.cache import LabelStore
from storage.kinds.mixture import mix
from storage.reader import ShardError, ShardStream
from storage.writer import ShardWriter
from tests.storage.test_shards import make_meta, make_rows


def _teacher(rng, n, vocab, k, sharpness):
    """Full distributions (n, vocab) and their top-k labels as a shard row stores them."""
    logits = rng.normal(size=(n, vocab)) * sharpness
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(p, ids, axis=1)
    targets = rng.integers(0, vocab, n)
    return (
        p,
        targets,
        {
            "teacher_ids": ids,
            "teacher_logprobs": np.log(top),
            "rest_mass": 1 - top.sum(1),
            "target_logprobs": np.log(p[np.arange(n), targets]),
        },
    )


def test_mixture_equals_the_dense_reference_over_the_union():
    rng = np.random.default_rng(0)
    n, vocab, k = 200, 40, 5
    weights = [0.5, 0.3, 0.2]
    teachers = [_teacher(rng, n, vocab, k, s) for s in (1.0, 2.0, 3.0)]
    # the same realized tokens for every member
    targets = teachers[0][1]
    for p, _, labels in teachers:
        labels["target_logprobs"] = np.log(p[np.arange(n), targets])
    mixed = mix([t[2] for t in teachers], [w * 10 for w in weights])  # weights are normalized
    assert mixed["teacher_ids"].shape == (n, 3 * k)
    for i in range(n):
        # dense reference: each member's stored ids only; what it did not store stays in its tail
        q = np.zeros(vocab)
        for w, (_, _, labels) in zip(weights, teachers):
            q[labels["teacher_ids"][i]] += w * np.exp(labels["teacher_logprobs"][i])
        union = np.nonzero(q)[0]
        lp, ids = mixed["teacher_logprobs"][i], mixed["teacher_ids"][i]
        live = np.isfinite(lp)
        assert live.sum() == len(union) and set(ids[live]) == set(union)
        np.testing.assert_allclose(np.exp(lp[live]), q[ids[live]], rtol=1e-6)
        assert np.all(np.diff(lp[live]) <= 0), "most probable first"
        assert np.all(ids[~live] == ids[0]) and np.all(np.isneginf(lp[~live])), "padding repeats the first id with -inf"
        tail = sum(w * labels["rest_mass"][i] for w, (_, _, labels) in zip(weights, teachers))
        np.testing.assert_allclose(mixed["rest_mass"][i], tail, rtol=1e-6)
        np.testing.assert_allclose(np.exp(lp[live]).sum() + mixed["rest_mass"][i], 1.0, atol=1e-6)
        full = sum(w * p[i] for w, (p, _, _) in zip(weights, teachers))
        np.testing.assert_allclose(mixed["target_logprobs"][i], np.log(full[targets[i]]), rtol=1e-5)


def test_mixture_of_one_teacher_with_itself_is_that_teacher():
    rng = np.random.default_rng(1)
    _, _, labels = _teacher(rng, 50, 30, 4, 2.0)
    mixed = mix([labels, labels], [1, 3])
    np.testing.assert_array_equal(mixed["teacher_ids"][:, :4], labels["teacher_ids"])
    np.testing.assert_allclose(mixed["teacher_logprobs"][:, :4], labels["teacher_logprobs"], rtol=1e-6)
    assert np.isneginf(mixed["teacher_logprobs"][:, 4:]).all()
    np.testing.assert_allclose(mixed["rest_mass"], labels["rest_mass"], rtol=1e-6)


def test_padded_topk_logprobs_round_trip_through_the_codec():
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.5, 0.2, 0.1, 0.0, 0.0], [0.3, 0.3, 0.2, 0.1, 0.05]]))
    codes = codec.encode_topk_logprobs(lp)
    tail = 1 - np.exp(lp).sum(1)
    back = codec.decode_topk_logprobs(codes, tail)
    assert np.isneginf(back[0, 3:]).all() and np.isfinite(back[0, :3]).all() and np.isfinite(back[1]).all()
    np.testing.assert_allclose(np.exp(back.astype(np.float64)).sum(1), 1 - tail, rtol=1e-6)
    p, q = np.array([0.5, 0.2, 0.1]) / 0.8, np.exp(back[0, :3].astype(np.float64)) / 0.8
    assert (p * np.log(p / q)).sum() < 2e-3, "the finite slots keep the codec's accuracy"


def _padded(rows, k, pad):
    """Rows with ``pad`` extra -inf slots per position (the first id repeated)."""
    out = []
    for r in rows:
        n = len(r["rest_mass"])
        ids = r["teacher_ids"].reshape(n, k)
        lp = r["teacher_logprobs"].reshape(n, k)
        out.append(
            {
                **r,
                "teacher_ids": np.concatenate([ids, np.repeat(ids[:, :1], pad, 1)], 1).reshape(-1),
                "teacher_logprobs": np.concatenate([lp, np.full((n, pad), -np.inf, np.float32)], 1).reshape(-1),
            }
        )
    return out


def test_writer_stores_trailing_padding_and_refuses_other_infinities(tmp_path):
    rows = _padded(make_rows(20, 500, 4), 4, 3)
    with ShardWriter(tmp_path / "a.parquet", make_meta(vocab=500, k=7)) as w:
        w.write_many(rows)
    store_rows = [r for r, _ in ShardStream([_open(tmp_path / "a.parquet", 7)], shuffle=False).rows(epochs=1)]
    for a, b in zip(rows, store_rows):
        n = len(a["rest_mass"])
        got = b["teacher_logprobs"].reshape(n, 7)
        assert np.isneginf(got[:, 4:]).all() and np.isfinite(got[:, :4]).all()
    bad = _padded(make_rows(3, 500, 4, seed=3), 4, 1)
    n = len(bad[1]["rest_mass"])
    lp = bad[1]["teacher_logprobs"].reshape(n, 5)
    lp[:, 0] = -np.inf  # no finite first slot
    with pytest.raises(ValueError, match="finite but for trailing -inf padding"):
        with ShardWriter(tmp_path / "b.parquet", make_meta(vocab=500, k=5)) as w:
            w.write_many(bad)
    assert not (tmp_path / "b.parquet").exists()


def _open(path, k):
    from storage.reader import open_shard

    return open_shard(path, expect={"slots": k})


def _member_store(tmp_path, name, rows, k, teacher_hash):
    store = LabelStore(tmp_path / name)
    key = f"{name}0000000000000000000000000000"[:32]
    with store.writer(key, make_meta(vocab=500, k=k, teacher_hash=teacher_hash, cache_key=key)) as w:
        w.write_many(rows)
    return store.open(key)


def test_mix_shard_writes_the_mixture_and_refuses_misaligned_members(tmp_path):
    rows_a = make_rows(30, 500, 4, seed=0)
    rows_b = [
        {**r, **{c: v for c, v in s.items() if c in ("teacher_ids", "teacher_logprobs", "rest_mass")}}
        for r, s in zip(rows_a, make_rows(30, 500, 4, seed=0))
    ]
    rng = np.random.default_rng(5)
    for r in rows_b:  # another teacher on the same windows: other ids
        r["teacher_ids"] = rng.permutation(500)[: len(r["teacher_ids"])] if len(r["teacher_ids"]) else r["teacher_ids"]
    a = _member_store(tmp_path, "aa", rows_a, 4, "wa")
    b = _member_store(tmp_path, "bb", rows_b, 4, "wb")
    out = LabelStore(tmp_path / "mix")
    meta = make_meta(
        vocab=500,
        kind="mixture",
        kind_params={"k": 4, "members": 2},
        teacher_hash="ens",
        cache_key="e" * 32,
        settings={"ensemble": [{"model": "a"}, {"model": "b"}]},
    )
    result = mix_shard(out, "e" * 32, meta, [a, b], [0.25, 0.75], batch_rows=7)
    assert not result["cache_hit"] and result["rows"] == 30
    mixed = out.open("e" * 32, expect={"kind": "mixture", "slots": 8, "teacher_hash": "ens"})
    assert mixed.meta.settings["ensemble"][1]["model"] == "b"
    got = [r for r, _ in ShardStream([mixed], shuffle=False).rows(epochs=1)]
    ra = [r for r, _ in ShardStream([a], shuffle=False).rows(epochs=1)]
    rb = [r for r, _ in ShardStream([b], shuffle=False).rows(epochs=1)]
    for x, y, m in zip(ra, rb, got):
        n = len(x["rest_mass"])
        if not n:
            continue
        want = mix(
            [
                {c: x[c] for c in ("teacher_ids", "teacher_logprobs", "rest_mass", "target_logprobs")},
                {c: y[c] for c in ("teacher_ids", "teacher_logprobs", "rest_mass", "target_logprobs")},
            ],
            [0.25, 0.75],
        )
        np.testing.assert_array_equal(m["input_ids"], x["input_ids"])
        live = np.isfinite(want["teacher_logprobs"])
        np.testing.assert_array_equal(np.isfinite(m["teacher_logprobs"].reshape(n, 8)), live)
        np.testing.assert_allclose(m["rest_mass"], want["rest_mass"], rtol=codec.TAIL_MAX_REL_ERROR)
        np.testing.assert_allclose(m["target_logprobs"], want["target_logprobs"], atol=1e-3)
    assert mix_shard(out, "e" * 32, meta, [a, b], [0.25, 0.75])["cache_hit"], "a committed mixture is reused"
    # members that did not label the same windows
    rows_c = [dict(r) for r in rows_b]
    rows_c[4] = {**rows_c[4], "input_ids": rows_c[4]["input_ids"][::-1].copy()}
    c = _member_store(tmp_path, "cc", rows_c, 4, "wc")
    with pytest.raises(ShardError, match="input_ids or label_start"):
        mix_shard(out, "f" * 32, dataclasses.replace(meta, cache_key="f" * 32), [a, c], [0.5, 0.5])
    assert not out.is_committed("f" * 32), "no half-written mixture"
