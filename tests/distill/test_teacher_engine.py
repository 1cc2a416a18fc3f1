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
