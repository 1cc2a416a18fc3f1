"""Sampled labels (``teacher.labels: sampled``): the sampler is unbiased, the shards store the
draws exactly, the real engine's sampled targets converge to the teacher's full distribution,
and the pipeline labels train shards sampled while held-out shards stay top-k."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distill.teacher.config import SampledLabelsConfig
from storage.kinds.sampled import row_rng, sample


def _distribution(n_ids: int, proposal: int, seed: int = 0):
    """A peaked distribution over ``n_ids`` ids, returned as its top-``proposal`` + tail."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=n_ids) * 2.0
    p = np.exp(logits - np.logaddexp.reduce(logits))
    order = np.argsort(-p)
    ids = order[:proposal]
    return p, ids, np.log(p[ids]), 1.0 - p[ids].sum()


def _mean_target(labels: dict, n_ids: int) -> np.ndarray:
    """Mean over positions of the sampled target ``count / draws`` as a dense vector."""
    lp = labels["teacher_logprobs"]
    probs = np.where(np.isfinite(lp), np.exp(lp.astype(np.float64)), 0.0)
    dense = np.zeros((len(probs), n_ids))
    np.add.at(dense, (np.arange(len(probs))[:, None].repeat(probs.shape[1], 1), labels["teacher_ids"]), probs)
    return dense.mean(0)


@pytest.mark.parametrize("sampler", ["systematic", "multinomial"])
def test_sampler_is_unbiased_and_lays_out_slots(sampler):
    n_ids, proposal, draws, m = 50, 20, 16, 20000
    p, ids, lp, tail = _distribution(n_ids, proposal)
    labels = {
        "topk_ids": np.tile(ids, (m, 1)),
        "topk_logprobs": np.tile(lp, (m, 1)).astype(np.float32),
        "tail_mass": np.full(m, tail, np.float32),
        "target_logprobs": np.zeros(m, np.float32),
    }
    out = sample(labels, draws, np.random.default_rng(1), sampler)
    assert out["teacher_ids"].shape == out["teacher_logprobs"].shape == (m, draws)
    mean = _mean_target(out, n_ids)
    # every top-K' id: the mean target equals p within 5 standard errors of a mean of m draws/draws
    se = np.sqrt(p[ids] * (1 - p[ids]) / (m * draws))
    assert np.all(np.abs(mean[ids] - p[ids]) < 5 * se + 1e-12), np.abs(mean[ids] - p[ids]).max()
    assert abs(out["rest_mass"].mean() - tail) < 5 * np.sqrt(tail * (1 - tail) / (m * draws))
    # counts: most drawn first, unused slots repeat the first id at -inf, draws add up
    counts = np.where(
        np.isfinite(out["teacher_logprobs"]), np.rint(np.exp(out["teacher_logprobs"].astype(np.float64)) * draws), 0
    )
    assert np.all(np.diff(counts, axis=1) <= 0)
    assert np.allclose(counts.sum(1) + out["rest_mass"] * draws, draws)
    pad = ~np.isfinite(out["teacher_logprobs"])
    assert np.all(out["teacher_ids"][pad] == np.broadcast_to(out["teacher_ids"][:, :1], pad.shape)[pad])
    # a top-k target is biased: it puts no mass on ids outside the k it keeps
    assert np.isfinite(out["teacher_logprobs"][:, 0]).all() and pad.any()
    dense = np.zeros((m, n_ids))
    np.add.at(dense, (np.arange(m)[:, None].repeat(draws, 1), out["teacher_ids"]), counts)
    error = np.abs(dense[:, ids] - draws * p[ids])
    if sampler == "systematic":  # every id gets floor(draws p) or ceil(draws p) draws, the tail too
        assert error.max() < 1 and np.abs(out["rest_mass"] * draws - draws * tail).max() < 1
        hit = (dense[:, ids] > 0).mean(0)  # an id below 1 / draws is drawn with probability draws * p
        small = draws * p[ids] < 1
        assert np.all(np.abs(hit[small] - draws * p[ids][small]) < 5 * np.sqrt(draws * p[ids][small] / m))
    else:  # independent draws stray further
        assert error.max() >= 1


def test_unknown_sampler_is_refused():
    from distill.configbase import ConfigError, build
    from distill.teacher.config import TeacherConfig

    with pytest.raises(ValueError, match="sampler='stratified'"):
        sample(
            {"topk_ids": np.zeros((1, 2)), "topk_logprobs": np.zeros((1, 2)), "tail_mass": np.zeros(1)},
            4,
            np.random.default_rng(0),
            "stratified",
        )
    with pytest.raises(ConfigError, match="sampler='stratified' is invalid"):
        build(TeacherConfig, {"labels": "sampled", "sampled_labels": {"sampler": "stratified"}}, "teacher")


@pytest.mark.parametrize("sampler", ["systematic", "multinomial"])
def test_forward_kl_on_sampled_targets_estimates_the_full_loss(sampler):
    """E[forward-KL loss on sampled targets] = the full cross-entropy to the teacher (up to the
    teacher's entropy), gradient included: the expectation of the sampled gradient is the full one."""
    from distill.train.losses import LossSpec, kd_loss

    n_ids, draws, m = 40, 8, 4000
    p, ids, lp, tail = _distribution(n_ids, n_ids)  # proposal = whole vocabulary: no tail
    student = torch.randn(n_ids, dtype=torch.float64) * 1.5
    labels = {
        "topk_ids": np.tile(ids, (m, 1)),
        "topk_logprobs": np.tile(lp, (m, 1)).astype(np.float32),
        "tail_mass": np.zeros(m, np.float32),
        "target_logprobs": np.zeros(m, np.float32),
    }
    out = sample(labels, draws, np.random.default_rng(2), sampler)
    logits = student.float().expand(1, m, n_ids).clone().requires_grad_(True)
    loss = kd_loss(
        logits,
        torch.from_numpy(out["teacher_ids"])[None],
        torch.from_numpy(out["teacher_logprobs"])[None],
        torch.ones(1, m, dtype=torch.bool),
        LossSpec("forward_kl", tail="bucket"),
    )
    loss.backward()
    sampled_grad = logits.grad[0].sum(0).double()  # mean over positions (the loss averages)
    q = torch.softmax(student, -1)
    full_grad = q - torch.from_numpy(p)  # d CE(p, softmax(s)) / ds
    assert torch.allclose(sampled_grad, full_grad, atol=4e-3), (sampled_grad - full_grad).abs().max()


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_other_divergences_are_biased_on_sampled_targets(divergence):
    """Why the config refuses them: on the same draws, the mean gradient over sampled targets
    stays far from the gradient on the full distribution for these losses (nonlinear in the
    target), while forward KL's comes within the tolerance of the test above."""
    from distill.train.losses import LossSpec, kd_loss

    n_ids, draws, m = 40, 8, 16000
    p, ids, lp, _ = _distribution(n_ids, n_ids)
    student = torch.randn(n_ids, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1.5
    labels = {
        "topk_ids": np.tile(ids, (m, 1)),
        "topk_logprobs": np.tile(lp, (m, 1)).astype(np.float32),
        "tail_mass": np.zeros(m, np.float32),
        "target_logprobs": np.zeros(m, np.float32),
    }
    out = sample(labels, draws, np.random.default_rng(2), "systematic")

    def grad(name, target_ids, target_logprobs):
        logits = student.float().expand(1, len(target_ids), n_ids).clone().requires_grad_(True)
        kd_loss(
            logits,
            torch.from_numpy(target_ids)[None],
            torch.from_numpy(target_logprobs)[None],
            torch.ones(1, len(target_ids), dtype=torch.bool),
            LossSpec(name, tail="bucket"),
        ).backward()
        return logits.grad[0].sum(0).double()

    def bias(name):
        return float(
            (
                grad(name, out["teacher_ids"], out["teacher_logprobs"])
                - grad(name, ids[None], lp[None].astype(np.float32))
            )
            .abs()
            .max()
        )

    unbiased, biased = bias("forward_kl"), bias(divergence)
    assert unbiased < 2e-3 and biased > 4 * unbiased, (divergence, biased, unbiased)


def test_config_refuses_losses_biased_on_sampled_labels():
    """Sampled labels train only with forward KL, tail: bucket, temperature 1 and the teacher's
    tokenizer; the error names the field, its value and what to use instead."""
    from distill.config import from_mapping
    from distill.configbase import ConfigError

    sampled = {"teacher": {"labels": "sampled"}}
    for train, match in [
        (
            {"divergence": "reverse_kl"},
            r"sampled labels \(teacher\.mode: score, teacher\.labels: sampled\) with train\.divergence='reverse_kl' "
            r"are refused: expected forward_kl; sampled labels are an unbiased target only for forward KL",
        ),
        ({"divergence": "jsd"}, r"train\.divergence='jsd'"),
        ({"divergence": "akl"}, r"train\.divergence='akl'"),
        ({"divergence": "tvd"}, r"train\.divergence='tvd'"),
        ({"divergence": "skew_kl"}, r"train\.divergence='skew_kl'"),
        ({"divergence": "skew_reverse_kl"}, r"train\.divergence='skew_reverse_kl'"),
        ({"tail": "renormalize"}, r"train\.tail='renormalize' are refused: expected bucket"),
        ({"tail": "renormalize", "temperature": 2.0}, r"train\.tail='renormalize'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_mapping({**sampled, "train": train})
    with pytest.raises(
        ConfigError, match=r"student\.tokenizer='bpe:8000' are refused: expected the teacher's tokenizer"
    ):
        from_mapping({**sampled, "student": {"tokenizer": "bpe:8000", "init": "random"}})
    # accepted: forward KL with the bucket, and any loss when the KD term is off (CE only)
    assert (
        from_mapping({**sampled, "train": {"divergence": "forward_kl", "tail": "bucket"}}).teacher.labels == "sampled"
    )
    assert from_mapping({**sampled, "train": {"divergence": "reverse_kl", "kd_weight": 0.0}}).train.kd_weight == 0.0
    assert from_mapping({"train": {"divergence": "reverse_kl"}}).train.divergence == "reverse_kl"  # top-k: any loss


def test_row_rng_is_per_row():
    a = row_rng(0, "doc-1", 3).integers(1 << 30, size=4)
    assert np.array_equal(a, row_rng(0, "doc-1", 3).integers(1 << 30, size=4))
    assert not np.array_equal(a, row_rng(0, "doc-1", 4).integers(1 << 30, size=4))
    assert not np.array_equal(a, row_rng(1, "doc-1", 3).integers(1 << 30, size=4))


def _sampled_meta(draws):
    from tests.storage.test_shards import make_meta

    params = dataclasses.asdict(SampledLabelsConfig(draws=draws))
    return make_meta(kind="sampled", kind_params=params)


def test_sampled_shard_stores_counts_exactly(tmp_path):
    from storage.reader import ShardStream, StreamPosition, open_shard
    from storage.writer import ShardWriter
    from tests.storage.test_shards import make_rows

    draws = 12
    rows = make_rows(6, 49152, 40, seed=3)
    for i, row in enumerate(rows):
        n = len(row["target_logprobs"])
        labels = sample(
            {
                "topk_ids": np.asarray(row["teacher_ids"]).reshape(n, 40),
                "topk_logprobs": np.asarray(row["teacher_logprobs"]).reshape(n, 40),
                "tail_mass": row["rest_mass"],
                "target_logprobs": row["target_logprobs"],
            },
            draws,
            np.random.default_rng(i),
        )
        row.update(
            teacher_ids=labels["teacher_ids"].reshape(-1),
            teacher_logprobs=labels["teacher_logprobs"].reshape(-1),
            rest_mass=labels["rest_mass"],
        )
    path = tmp_path / "s.parquet"
    with ShardWriter(path, _sampled_meta(draws)) as w:
        w.write_many(rows)
    shard = open_shard(path)
    assert shard.meta.kind == "sampled" and shard.meta.slots == draws
    back = [r for r, _ in ShardStream([shard], shuffle=False).rows(StreamPosition(), epochs=1)]
    for a, b in zip(rows, back):
        assert np.array_equal(np.asarray(a["teacher_logprobs"]), b["teacher_logprobs"])  # -inf included
        assert np.array_equal(np.asarray(a["teacher_ids"]), b["teacher_ids"])
        np.testing.assert_allclose(b["rest_mass"], a["rest_mass"], atol=1e-7)  # exact: draws not on teacher_ids
    # a row that is not counts of at most `draws` draws is refused, naming it
    bad = dict(rows[0], teacher_logprobs=np.full_like(rows[0]["teacher_logprobs"], np.log(0.3)))
    with pytest.raises(ValueError, match=r"row doc-0#0: sampled teacher_logprobs must be log\(count / 12\)"):
        with ShardWriter(tmp_path / "bad.parquet", _sampled_meta(draws)) as w:
            w.write(bad)
    assert not (tmp_path / "bad.parquet").exists()


def test_config_checks():
    from distill.configbase import ConfigError, build
    from distill.teacher.config import TeacherConfig

    with pytest.raises(ConfigError, match="labels='full' is invalid"):
        build(TeacherConfig, {"labels": "full"}, "teacher")
    with pytest.raises(ConfigError, match="draws=300 is invalid"):
        build(TeacherConfig, {"labels": "sampled", "sampled_labels": {"draws": 300}}, "teacher")
    with pytest.raises(ConfigError, match="labels='sampled' is invalid: expected topk in candidates mode"):
        build(TeacherConfig, {"labels": "sampled", "mode": "candidates"}, "teacher")
    with pytest.raises(ConfigError, match="sampler='multinomial' is invalid: expected systematic with engine.labeller"):
        build(TeacherConfig, {"labels": "sampled", "sampled_labels": {"sampler": "multinomial"}}, "teacher")
    host = {"labeller": "logprobs"}
    chosen = build(
        TeacherConfig, {"labels": "sampled", "sampled_labels": {"sampler": "multinomial"}, "engine": host}, "t"
    )
    assert chosen.sampled_labels.sampler == "multinomial" and chosen.labeller == "logprobs"
    with pytest.raises(ConfigError, match="labeller='gpu' is invalid"):
        build(TeacherConfig, {"engine": {"labeller": "gpu"}}, "teacher")


def test_engine_sampled_targets_converge_to_the_full_distribution(engine, hf_teacher, tiny_config):
    """The real engine's top-K' + tail (the default proposal), sampled many times with either
    sampler, against transformers' full softmax: the mean target matches the full distribution on
    every id within sampling noise, and what it misses is exactly the mass beyond the K' (the
    sampler's stated bias)."""
    from distill.data import read_corpus_shard
    from distill.run import labelling, paths

    hashes = paths.teacher_hashes(tiny_config)
    labelling.prepare_corpus(tiny_config)
    _, windows = read_corpus_shard(tiny_config.root, tiny_config.corpus, hashes["tokenizer"], "heldout-00000", "score")
    ids = windows.column("input_ids").to_pylist()[0][:24]
    proposal = SampledLabelsConfig().proposal_k
    labels = next(engine.score([ids], [0], k=proposal))
    with torch.no_grad():
        full = torch.softmax(hf_teacher(torch.tensor([ids])).logits[0, :-1].double(), -1).numpy()  # (23, V)
    m, draws = 3000, 16
    n = len(labels["tail_mass"])
    for t, sampler in ((0, "systematic"), (n // 2, "multinomial"), (n - 1, "systematic")):
        one = {
            name: np.repeat(np.asarray(labels[name])[t : t + 1], m, axis=0)
            for name in ("topk_ids", "topk_logprobs", "tail_mass", "target_logprobs")
        }
        out = sample(one, draws, np.random.default_rng(t), sampler)
        mean = _mean_target(out, full.shape[1])
        p = full[t]
        in_proposal = np.zeros(len(p), bool)
        in_proposal[labels["topk_ids"][t]] = True
        # on the engine's K' ids: unbiased (engine fp32 vs transformers fp32: 1e-4 relative). The
        # draws of an id number about m * draws * p = lam, Poisson-like for the small ids (lam of
        # a few): |count - lam| < 6 sqrt(lam) + 6 holds with probability > 1 - 1e-7 per id
        lam = m * draws * p
        bad = np.abs(mean - p) * m * draws >= 6 * np.sqrt(lam) + 6 + 2e-4 * lam
        assert not bad[in_proposal].any(), (t, sampler, mean[in_proposal & bad], p[in_proposal & bad])
        # beyond them: no id is drawn; their total is the tail the draws put in the bucket
        assert mean[~in_proposal].sum() == 0.0
        assert (
            abs(out["rest_mass"].mean() - p[~in_proposal].sum())
            < 5 * np.sqrt(max(p[~in_proposal].sum(), 1e-12) / (m * draws)) + 1e-4
        )


def test_pipeline_labels_train_sampled_and_heldout_topk(engine, tiny_config, tmp_path):
    from distill.run import labelling, paths
    from distill.train.config import StudentConfig, TrainConfig
    from distill.train.trainer import train

    cfg = dataclasses.replace(
        tiny_config,
        teacher=dataclasses.replace(tiny_config.teacher, labels="sampled", sampled_labels=SampledLabelsConfig(draws=6)),
    )
    labelling.prepare_corpus(cfg)
    names = cfg.corpus.shard_names()
    topk_keys, sampled_keys = paths.shard_keys(tiny_config, names), paths.shard_keys(cfg, names)
    for name in names:  # held-out labels are shared by both configs; train labels are not
        assert (topk_keys[name] == sampled_keys[name]) == name.startswith("heldout")
    labelling.label_shards(cfg, names, engine_factory=lambda: engine)
    assert not labelling.check_shards(cfg, names)["problems"]
    train_shards, heldout = labelling.open_split(cfg, "train"), labelling.open_split(cfg, "heldout")
    assert {(s.meta.kind, s.meta.slots) for s in train_shards} == {("sampled", 6)}
    assert {s.meta.kind for s in heldout} == {"topk"} and heldout[0].meta.kind_params == {"k": tiny_config.teacher.k}
    # labelling again is all cache hits; the draws are the same in any batch
    again = labelling.label_shards(cfg, names, engine_factory=lambda: engine)
    assert all(r["cache_hit"] for r in again.values())
    student = StudentConfig(
        init="random", num_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    summary = train(
        student,
        TrainConfig(steps=2, batch_size=2, progress=False),
        paths.teacher_dir(cfg),
        train_shards,
        tmp_path / "s",
        49152,
    )
    assert summary["finished"] and summary["final_kd"] > 0
