"""Students with their own tokenizer: byte tables, alignment by byte offsets (texts the two
tokenizers split differently), and the ULD and span-aligned losses against reference formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.losses import cross_tokenizer_loss, uld_distance
from distill.xtok import CrossTokenizer, collate_cross, decodable, token_byte_table, train_bpe

TEXTS = [
    "Distillation transfers knowledge: the student imitates the teacher's distribution.",
    "naïve café, Ünïcode — and tabs\tand  double spaces; numbers 12345 and CamelCaseWords.",
    "def tokenize(text):\n    return [t for t in text.split()]  # Python code, indented\n",
]


@pytest.fixture(scope="module")
def teacher_tok(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def cross(teacher_tok, tmp_path_factory):
    """A small BPE (400 ids) trained on other text: it splits most words differently."""
    import pydoc_data.topics

    out = tmp_path_factory.mktemp("bpe") / "tok"
    train_bpe(list(pydoc_data.topics.topics.values())[:40], 400, out)
    return CrossTokenizer.load(teacher_tok, out)


def test_byte_tables_spell_the_text(teacher_tok, cross):
    table = token_byte_table(teacher_tok)
    for text in TEXTS:
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode()
        s_ids, offsets = cross.student_ids(text.encode())
        assert b"".join(cross.student_bytes[i] for i in s_ids) == text.encode() and offsets[-1] == len(text.encode())
    assert table[teacher_tok.convert_tokens_to_ids("<|im_start|>")] == b"", "special tokens are empty"
    assert 0 < cross.matched_fraction < 0.05, "a 400-id BPE holds few of the teacher's 49k tokens exactly"


def test_decodable_skips_split_characters():
    data = "é".encode() + b"abc" + "ü".encode()
    assert decodable(data[1:]) == (1, len(data) - 1)
    assert decodable(data[:-1]) == (0, len(data) - 2)


def _row(ids, start, k=4, seed=0):
    n = len(ids) - 1 - start
    rng = np.random.default_rng(seed)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 2), n)[:, :k]), axis=1)[:, ::-1]
    return {"input_ids": np.asarray(ids), "label_start": start, "topk_ids": rng.integers(0, 49152, n * k),
            "topk_logprobs": lp.reshape(-1).astype(np.float32), "target_logprobs": np.zeros(n, np.float32)}


def test_alignment_pairs_exactly_the_positions_with_the_same_text_behind_them(teacher_tok, cross):
    table = cross.teacher_bytes
    partial = 0
    for text in TEXTS:
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        start = 3
        a = cross.align(_row(ids, start), 4)
        s_ids = a["input_ids"]
        assert len(s_ids) != len(ids), "the two tokenizers split this text differently"
        s_prefix = [len(b"".join(cross.student_bytes[i] for i in s_ids[:j + 1])) for j in range(len(s_ids))]
        t_prefix = [len(b"".join(table[i] for i in ids[:i + 1])) for i in range(len(ids))]
        want = {(j, m) for j in range(len(s_ids) - 1) for m in range(len(ids) - 1 - start)
                if s_prefix[j] == t_prefix[start + m]}
        got = set(zip(a["kd_positions"].tolist(), a["kd_labels"].tolist()))
        assert got == want and len(got) > 0, "aligned where, and only where, both have read the same bytes"
        partial += len(got) < len(ids) - 1 - start
        # CE covers the student tokens that start inside the labelled span, and their bytes
        span_from = t_prefix[start]
        assert all(s_prefix[j] >= span_from for j in a["ce_positions"])
        assert a["ce_bytes"] == len(text.encode()) - min(s_prefix[j] for j in a["ce_positions"])
    assert partial, "somewhere the two tokenizations have no common boundary, and nothing is aligned there"


def _sorted_l1(p: np.ndarray, q: np.ndarray) -> float:
    n = max(len(p), len(q))
    p = np.sort(np.pad(p, (0, n - len(p))))[::-1]
    q = np.sort(np.pad(q, (0, n - len(q))))[::-1]
    return float(np.abs(p - q).sum())


def test_uld_is_the_sorted_l1_distance_and_needs_no_vocabulary_mapping():
    rng = np.random.default_rng(0)
    V = 12
    logits = torch.tensor(rng.normal(size=(2, 3, V)) * 2, dtype=torch.float32)
    q = torch.softmax(logits, -1).numpy()
    p = rng.dirichlet(np.ones(V), (2, 3))
    full = torch.tensor(np.log(-np.sort(-p, -1)), dtype=torch.float32)  # the teacher's whole distribution, sorted
    got = uld_distance(logits, full).numpy()
    want = np.array([[_sorted_l1(p[b, t], q[b, t]) for t in range(3)] for b in range(2)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a permuted vocabulary is the same distribution to ULD
    perm = torch.randperm(V)
    np.testing.assert_allclose(uld_distance(logits[..., perm], full).numpy(), got, atol=1e-6)
    # from the top 4 plus the tail: a lower bound of the full distance, equal to the formula
    k = 4
    top = full[..., :k]
    trunc = uld_distance(logits, top).numpy()
    qs = -np.sort(-q, -1)[..., :k]
    ps = np.exp(top.numpy().astype(np.float64))
    want_trunc = np.abs(qs - ps).sum(-1) + np.abs((1 - qs.sum(-1)) - (1 - ps.sum(-1)))
    np.testing.assert_allclose(trunc, want_trunc, atol=1e-5)
    assert np.all(trunc <= got + 1e-6)
    # a student equal to the teacher (in any id order) is at distance 0
    same = torch.log(torch.tensor(p, dtype=torch.float32))[..., perm]
    np.testing.assert_allclose(uld_distance(same, full).numpy(), 0.0, atol=1e-5)


def test_span_kl_compares_the_exactly_matching_tokens_with_the_rest_as_one_bucket():
    rng = np.random.default_rng(1)
    V, K = 10, 4
    logits = torch.tensor(rng.normal(size=(1, 2, V)), dtype=torch.float32)
    teacher_p = np.sort(rng.dirichlet(np.ones(8), 2)[:, :K], axis=1)[:, ::-1]
    mapped = np.array([[[3, 0, 7, 0], [1, 2, 0, 0]]])  # student ids of the teacher's top-k
    matched = np.array([[[True, False, True, False], [True, True, False, False]]])
    lp = np.log(teacher_p)[None]
    batch = {"targets": torch.zeros(1, 2, dtype=torch.long), "mask": torch.ones(1, 2, dtype=torch.bool),
             "kd_mask": torch.ones(1, 2, dtype=torch.bool), "topk_ids": torch.tensor(mapped),
             "matched_logprobs": torch.tensor(np.where(matched, lp, -np.inf), dtype=torch.float32),
             "teacher_logprobs": torch.tensor(lp, dtype=torch.float32)}
    loss, parts = cross_tokenizer_loss(logits, batch, kd_weight=1.0, loss="span_kl")
    q = torch.softmax(logits, -1).numpy()[0].astype(np.float64)
    want = []
    for t in range(2):
        ids = mapped[0, t][matched[0, t]]
        pt = teacher_p[t][matched[0, t]]
        qt = q[t][ids]
        rest_p, rest_q = 1 - pt.sum(), 1 - qt.sum()
        want.append((pt * np.log(pt / qt)).sum() + rest_p * np.log(rest_p / rest_q))
    assert abs(float(parts["kd"]) - np.mean(want)) < 1e-5
    # kd_weight 0: plain cross-entropy, no KD term
    ce_only, parts = cross_tokenizer_loss(logits, batch, kd_weight=0.0)
    assert float(parts["kd"]) == 0.0 and abs(float(ce_only) - float(parts["ce"])) < 1e-7


def test_collate_cross_places_labels_at_aligned_positions(teacher_tok, cross):
    ids = teacher_tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    row = _row(ids, 0, k=4)
    hit = cross.teacher_to_student >= 0
    row["topk_ids"][::4] = np.nonzero(hit)[0][0]  # every position's top-1 is a token the student has
    batch = collate_cross([row, _row(ids[:10], 2, k=4)], 4, cross)
    a = cross.align(row, 4)
    assert batch["input_ids"].shape[0] == 2 and int(batch["kd_mask"][0].sum()) == len(a["kd_positions"])
    lp = row["topk_logprobs"].reshape(-1, 4)
    pos, lab = a["kd_positions"], a["kd_labels"]
    np.testing.assert_allclose(batch["teacher_logprobs"][0, pos].numpy(), lp[lab])
    assert torch.isfinite(batch["matched_logprobs"][0, pos, 0]).all()
    assert (batch["topk_ids"][0, pos, 0] == int(cross.teacher_to_student[np.nonzero(hit)[0][0]])).all()
    assert not batch["kd_mask"][0, ~batch["mask"][0]].any() or True
    assert torch.isinf(batch["teacher_logprobs"][~batch["kd_mask"]]).all(), "no labels where nothing is aligned"
