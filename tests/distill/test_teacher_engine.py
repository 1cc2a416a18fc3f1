"""The real vLLM engine on the bundled teacher against a plain transformers forward pass."""

from __future__ import annotations

import numpy as np
import pytest

from distill.teacher.reference import reference_labels
from tests.conftest import TINY_K, TINY_WINDOW


@pytest.fixture(scope="module")
def windows(teacher_dir):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    texts = [topics[name] for name in sorted(topics)[20:26]]
    ids = [tok(t)["input_ids"] for t in texts]
    # full windows, a short one, and label_starts that skip shared context
    return [(np.array(i[:TINY_WINDOW]), s) for i, s in zip(ids, [0, 0, 5, 17, 0, 30])] + [(np.array(ids[0][3:12]), 2)]


def test_vllm_labels_match_transformers(engine, hf_teacher, windows):
    got = list(engine.score([w for w, _ in windows], [s for _, s in windows]))
    positions = near_ties = 0
    for (ids, start), labels in zip(windows, got):
        ref = reference_labels(hf_teacher, ids, start, TINY_K)
        n = len(ids) - 1 - start
        assert labels["topk_ids"].shape == (n, TINY_K) and labels["target_logprobs"].shape == (n,)
        # the realized token's logprob: position t is the distribution of token t + 1
        np.testing.assert_allclose(labels["target_logprobs"], ref["target_logprobs"], atol=1e-3)
        np.testing.assert_allclose(labels["tail_mass"], ref["tail_mass"], atol=1e-3)
        for t in range(n):
            positions += 1
            if not np.array_equal(labels["topk_ids"][t], ref["topk_ids"][t]):
                # only acceptable where neighbouring logprobs are tied within tolerance
                gaps = np.abs(np.diff(ref["topk_logprobs"][t]))
                assert gaps.min() < 1e-3, f"top-k ids differ at position {t} without a near-tie"
                near_ties += 1
            np.testing.assert_allclose(labels["topk_logprobs"][t], ref["topk_logprobs"][t], atol=1e-3)
            assert np.all(np.diff(labels["topk_logprobs"][t]) <= 1e-6), "top-k sorted descending"
    assert positions > 300 and near_ties <= positions * 0.01


def test_alignment_is_checked(engine, windows):
    """Off-by-one would show: the realized token must be the next input token at every position."""
    ids, start = windows[0]
    labels = next(engine.score([ids], [start]))
    # the realized token's logprob is in the top-k whenever its id is there, with the same value
    for t in range(len(ids) - 1):
        hit = np.nonzero(labels["topk_ids"][t] == ids[t + 1])[0]
        if hit.size:
            assert abs(labels["topk_logprobs"][t][hit[0]] - labels["target_logprobs"][t]) < 1e-4
        else:
            assert labels["target_logprobs"][t] <= labels["topk_logprobs"][t][-1] + 1e-4


# ---- the device labeller (teacher.engine.labeller: device, the session engine's) against the logprobs path ----


def _exact_reference(hf_teacher, ids, start: int, k: int) -> dict:
    """A transformers float32 forward with float64 log-softmax and tails summed over the ids
    outside the top k (no ``1 - sum`` cancellation)."""
    import torch

    with torch.no_grad():
        logits = hf_teacher(input_ids=torch.as_tensor(np.asarray(ids, np.int64))[None]).logits[0, :-1]
    logprobs = torch.log_softmax(logits.double(), -1)[start:]
    top_ids = logprobs.topk(k, -1).indices
    rest = logprobs.scatter(-1, top_ids, float("-inf"))
    return {"tail_mass": torch.logsumexp(rest, -1).exp().numpy(), "logprobs": logprobs.numpy()}


def test_device_labels_equal_the_logprobs_path_and_tails_are_exact(engine, answering_engine, hf_teacher, windows):
    from storage.codec import TAIL_MAX_REL_ERROR, TARGET_STEP

    assert engine.labeller == "device" and answering_engine.labeller == "logprobs"
    ids, starts = [w for w, _ in windows], [s for _, s in windows]
    device, logprobs = list(engine.score(ids, starts)), list(answering_engine.score(ids, starts))
    worst_lp = worst_tail = worst_host_tail = 0.0
    for (w, start), d, h in zip(windows, device, logprobs):
        for t in np.nonzero((d["topk_ids"] != h["topk_ids"]).any(axis=1))[0]:  # only at near-ties
            assert np.abs(np.diff(d["topk_logprobs"][t])).min() < 1e-4, f"top-k ids differ at {t} without a near-tie"
        same = (d["topk_ids"] == h["topk_ids"]).all(axis=1)
        worst_lp = max(worst_lp, np.abs(d["topk_logprobs"][same] - h["topk_logprobs"][same]).max(initial=0))
        worst_lp = max(worst_lp, np.abs(d["target_logprobs"] - h["target_logprobs"]).max(initial=0))
        ref = _exact_reference(hf_teacher, w, start, TINY_K)
        worst_tail = max(worst_tail, (np.abs(d["tail_mass"] - ref["tail_mass"]) / ref["tail_mass"]).max(initial=0))
        resolved = ref["tail_mass"] > 1e-2  # where one minus a float32 sum resolves the tail to the codec's step
        host_err = np.abs(h["tail_mass"] - ref["tail_mass"]) / ref["tail_mass"]
        worst_host_tail = max(worst_host_tail, host_err[resolved].max(initial=0))
    print(
        f"device vs logprobs: largest logprob difference {worst_lp:.2e}; tail relative error vs float64 "
        f"{worst_tail:.2e} (device, every position), {worst_host_tail:.2e} (logprobs path, tails > 1e-2)"
    )
    assert worst_lp < TARGET_STEP / 4  # well inside the codec's own rounding
    assert worst_tail < TAIL_MAX_REL_ERROR and worst_host_tail < TAIL_MAX_REL_ERROR


def test_device_labels_do_not_depend_on_the_batch(engine, windows):
    """A window labelled alone and as one of 64 (one engine step) gets the same labels and draws."""
    from distill.teacher.vllm_labeller import width

    assert engine.cfg.batch_windows >= 64 and 64 * TINY_WINDOW <= engine.cfg.max_num_batched_tokens
    ids = [w for w, _ in windows]
    batch = (ids * 10)[:63] + [ids[2]]
    alone = next(engine.score([ids[2]], [0], draws=16, seeds=[11]))
    together = list(engine.score(batch, [0] * 64, draws=16, seeds=list(range(63)) + [11]))[-1]
    differ = {name: np.abs(alone[name].astype(np.float64) - together[name]).max() for name in alone}
    print(f"alone vs inside a batch of 64: largest differences {differ} ({width(TINY_K, 16)} columns)")
    assert differ["topk_ids"] == 0 and differ["draw_ids"] == 0 and differ["draw_counts"] == 0
    assert max(differ["topk_logprobs"], differ["target_logprobs"]) < 1e-5 and differ["tail_mass"] < 1e-6


def test_device_draws_come_from_the_whole_vocabulary(engine, hf_teacher, windows):
    """Sampled labels drawn on the device: every id's count within one of ``draws * p`` (p from a
    transformers forward), and over many seeds the mean target is ``p`` on every id, the ids
    beyond any top-2048 proposal included: no bucket bias left."""
    import torch

    window = windows[3][0][:24]
    draws, m = 40, 300
    rows = list(engine.score([window] * m, [0] * m, k=1, draws=draws, seeds=list(range(m))))
    with torch.no_grad():
        p = torch.softmax(hf_teacher(torch.as_tensor(window[None])).logits[0, :-1].double(), -1).numpy()
    n, vocab = p.shape
    mean = np.zeros_like(p)
    for row in rows:
        counts = np.zeros_like(p)
        np.add.at(counts, (np.repeat(np.arange(n), draws), row["draw_ids"].reshape(-1)), row["draw_counts"].reshape(-1))
        assert (counts.sum(-1) == draws).all()
        assert np.abs(counts - draws * p).max() < 1 + 1e-3 * draws  # engine fp32 vs transformers fp32
        mean += counts / draws / m
    # systematic draws: each run's error per id is at most 1 / draws, so the mean's is about 1 / (draws sqrt(m))
    assert np.abs(mean - p).max() < 5 / (draws * np.sqrt(m)) + 1e-3
    beyond = np.argsort(-p, axis=-1)[:, 2048:]  # what a top-2048 proposal would pool into its bucket
    far = np.take_along_axis(mean, beyond, -1).sum(-1)
    assert np.abs(far - np.take_along_axis(p, beyond, -1).sum(-1)).max() < 5 / np.sqrt(draws * m) * 0.2 + 1e-3
    assert far.max() > 0, "ids beyond a top-2048 proposal are drawn"


def test_device_engine_scores_sequences_like_the_logprobs_engine(engine, answering_engine, windows):
    seqs = [w for w, _ in windows]
    starts = [1, 5, 17, 30, 2, 40, 3]
    device = engine.sequence_logprobs(seqs, starts, greedy=True)
    host = answering_engine.sequence_logprobs(seqs, starts, greedy=True)
    np.testing.assert_allclose(device[:, 0], host[:, 0], atol=1e-3)
    assert np.array_equal(device[:, 1:], host[:, 1:])
    cands = [[list(seqs[0][10:13]), list(seqs[1][:4])], [list(seqs[2][5:6])]]
    for d, h in zip(
        engine.score_candidates([seqs[0][:10], seqs[2][:5]], cands),
        answering_engine.score_candidates([seqs[0][:10], seqs[2][:5]], cands),
    ):
        np.testing.assert_allclose(d, h, atol=1e-3)
