"""Students with their own tokenizer: byte tables, alignment by byte offsets (texts the two
tokenizers split differently), and the ULD and span-aligned losses against reference formulas."""

from __future__ import annotations

import copy
import pydoc_data.topics

import numpy as np
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distill.train.losses import cross_tokenizer_loss, uld_distance
from distill.train.xtok import CrossTokenizer, collate_cross, decodable, token_byte_table, train_bpe

TEXTS = [
    "Distillation transfers knowledge: the student imitates the teacher's distribution.",
    "naïve café, Ünïcode — and tabs\tand  double spaces; numbers 12345 and CamelCaseWords.",
    "def tokenize(text):\n    return [t for t in text.split()]  # Python code, indented\n",
]


@pytest.fixture(scope="module")
def teacher_tok(teacher_dir):
    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def cross(teacher_tok, tmp_path_factory):
    """A small BPE (400 ids) trained on other text: it splits most words differently."""
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
    return {
        "input_ids": np.asarray(ids),
        "label_start": start,
        "teacher_ids": rng.integers(0, 49152, n * k),
        "teacher_logprobs": lp.reshape(-1).astype(np.float32),
        "target_logprobs": np.zeros(n, np.float32),
    }


def test_alignment_pairs_exactly_the_positions_with_the_same_text_behind_them(teacher_tok, cross):
    table = cross.teacher_bytes
    partial = 0
    for text in TEXTS:
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        start = 3
        a = cross.align(_row(ids, start), 4)
        s_ids = a["input_ids"]
        assert len(s_ids) != len(ids), "the two tokenizers split this text differently"
        s_prefix = [len(b"".join(cross.student_bytes[i] for i in s_ids[: j + 1])) for j in range(len(s_ids))]
        t_prefix = [len(b"".join(table[i] for i in ids[: i + 1])) for i in range(len(ids))]
        want = {
            (j, m)
            for j in range(len(s_ids) - 1)
            for m in range(len(ids) - 1 - start)
            if s_prefix[j] == t_prefix[start + m]
        }
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
    batch = {
        "targets": torch.zeros(1, 2, dtype=torch.long),
        "mask": torch.ones(1, 2, dtype=torch.bool),
        "kd_mask": torch.ones(1, 2, dtype=torch.bool),
        "teacher_ids": torch.tensor(mapped),
        "matched_logprobs": torch.tensor(np.where(matched, lp, -np.inf), dtype=torch.float32),
        "teacher_logprobs": torch.tensor(lp, dtype=torch.float32),
    }
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
    row["teacher_ids"][::4] = np.nonzero(hit)[0][0]  # every position's top-1 is a token the student has
    batch = collate_cross([row, _row(ids[:10], 2, k=4)], 4, cross)
    a = cross.align(row, 4)
    assert batch["input_ids"].shape[0] == 2 and int(batch["kd_mask"][0].sum()) == len(a["kd_positions"])
    lp = row["teacher_logprobs"].reshape(-1, 4)
    pos, lab = a["kd_positions"], a["kd_labels"]
    np.testing.assert_allclose(batch["teacher_logprobs"][0, pos].numpy(), lp[lab])
    assert torch.isfinite(batch["matched_logprobs"][0, pos, 0]).all()
    assert (batch["teacher_ids"][0, pos, 0] == int(cross.teacher_to_student[np.nonzero(hit)[0][0]])).all()
    assert not batch["kd_mask"][0, ~batch["mask"][0]].any() or True
    assert torch.isinf(batch["teacher_logprobs"][~batch["kd_mask"]]).all(), "no labels where nothing is aligned"


# --- regression cases reported against other span-aligned losses -----------------------------

MULTIBYTE = "日本語 🤗 ℤ Ω ẞ 𝔘𝔫𝔦 café € — naïve"


def _brute_force_pairs(s_ids, s_table, t_ids, t_table, start, lead=0):
    """Aligned pairs by definition: student position j and teacher label m (position start + m)
    where both have read the same bytes (counted from byte ``lead`` of the teacher's window,
    where the student's text starts) and what each predicts next is non-empty."""

    def reads(table, ids, upto):
        return b"".join(table[i] for i in ids[:upto])

    t_text = reads(t_table, t_ids, len(t_ids))
    pairs = set()
    for j in range(len(s_ids) - 1):
        s_read = t_text[:lead] + reads(s_table, s_ids, j + 1)
        for m in range(len(t_ids) - 1 - start):
            if t_table[t_ids[start + m + 1]] and reads(t_table, t_ids, start + m + 1) == s_read:
                pairs.add((j, m))
    return pairs


def _pairs(a):
    return set(zip(a["kd_positions"].tolist(), a["kd_labels"].tolist()))


def _with_bos(tokenizer, bos: str):
    """``tokenizer`` as a tokenizer whose ``__call__`` puts ``bos`` first (Llama-style), built
    from its own tokenizers pipeline."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=tokenizer.eos_token)


@pytest.fixture(scope="module")
def teacher_with_bos(teacher_tok):
    bos_tok = _with_bos(teacher_tok, "<|endoftext|>")
    assert bos_tok("hi")["input_ids"][0] == bos_tok.bos_token_id, "the variant adds a BOS, as build_corpus calls it"
    assert teacher_tok("hi")["input_ids"][0] != teacher_tok.convert_tokens_to_ids("<|endoftext|>"), (
        "the bundled one does not"
    )
    return bos_tok


@pytest.mark.parametrize("start", [0, 3])
def test_a_bos_on_the_teacher_side_only_shifts_nothing(teacher_tok, teacher_with_bos, cross, start):
    """The teacher's tokenizer adds a BOS (no bytes), the student's text has none: every pair
    is the same teacher position as without the BOS (label index + 1 when labelling starts at
    the BOS), and the BOS position itself, having read nothing, is paired with no student position."""
    assert token_byte_table(teacher_with_bos) == cross.teacher_bytes, "a BOS has no bytes"
    for text in TEXTS + [MULTIBYTE]:
        plain = teacher_tok(text, add_special_tokens=False)["input_ids"]
        with_bos = teacher_with_bos(text)["input_ids"]
        assert with_bos[1:] == plain and with_bos[0] == teacher_with_bos.bos_token_id
        a_plain, a_bos = cross.align(_row(plain, start), 4), cross.align(_row(with_bos, start + 1), 4)
        assert a_bos["input_ids"] == a_plain["input_ids"], "the student reads the same text, with no token for the BOS"
        assert (
            _pairs(a_bos)
            == _pairs(a_plain)
            == _brute_force_pairs(a_plain["input_ids"], cross.student_bytes, plain, cross.teacher_bytes, start)
        )
        np.testing.assert_array_equal(a_bos["ce_positions"], a_plain["ce_positions"])
        assert (a_bos["span_bytes"], a_bos["ce_bytes"]) == (a_plain["span_bytes"], a_plain["ce_bytes"])
        if start == 0:  # labels from the BOS on: label m + 1 is the position that was label m without it
            a0 = cross.align(_row(with_bos, 0), 4)
            assert {(j, m - 1) for j, m in _pairs(a0)} == _pairs(a_plain)
            assert 0 not in a0["kd_labels"].tolist(), "the BOS position has read nothing; no student position has"
            assert a0["span_bytes"] == len(text.encode()), "labelled from the BOS: the span is the whole text"
            assert _pairs(a0) == _brute_force_pairs(
                a0["input_ids"], cross.student_bytes, with_bos, cross.teacher_bytes, 0
            )
    # collated, the BOS row puts the same labels at the same student positions
    plain = teacher_tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    row_plain, row_bos = _row(plain, start, seed=3), _row(teacher_with_bos(TEXTS[0])["input_ids"], start + 1, seed=3)
    for name in ("teacher_ids", "teacher_logprobs"):
        row_bos[name] = row_plain[name]
    b_plain, b_bos = collate_cross([row_plain], 4, cross), collate_cross([row_bos], 4, cross)
    for name in b_plain:
        assert torch.equal(b_plain[name], b_bos[name]), name


def test_a_bos_on_the_student_side_only_shifts_nothing(teacher_tok, cross, tmp_path):
    """The student's tokenizer adds a BOS by default: alignment tokenizes without it, so pairs,
    CE positions and byte counts are those of the same student without a BOS."""
    bos_student = _with_bos(cross.tokenizer, "<|endoftext|>")
    bos_student.save_pretrained(tmp_path / "bos")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "bos")
    assert reloaded("ab")["input_ids"][0] == reloaded.bos_token_id, "the saved student adds a BOS by default"
    cross_bos = CrossTokenizer.load(teacher_tok, tmp_path / "bos")
    for text in TEXTS + [MULTIBYTE]:
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        a, a_bos = cross.align(_row(ids, 2), 4), cross_bos.align(_row(ids, 2), 4)
        assert a_bos["input_ids"] == a["input_ids"] and _pairs(a_bos) == _pairs(a)
        np.testing.assert_array_equal(a_bos["ce_positions"], a["ce_positions"])
        assert a_bos["ce_bytes"] == a["ce_bytes"]


@pytest.fixture(scope="module")
def cross_chars(teacher_tok, tmp_path_factory):
    """A BPE trained on the multi-byte characters themselves: it holds them (and whole runs of
    them) as single tokens where the teacher splits their bytes across tokens."""
    out = tmp_path_factory.mktemp("bpe-chars") / "tok"
    train_bpe(["日本語 🤗 ℤ Ω ẞ 𝔘𝔫𝔦 日本 本語"] * 20, 300, out)
    return CrossTokenizer.load(teacher_tok, out)


def _boundaries(ids, table, lead=0):
    return set((lead + np.cumsum([len(table[i]) for i in ids])).tolist())


def _char_starts(data: bytes) -> set[int]:
    return {i for i, b in enumerate(data) if (b & 0xC0) != 0x80} | {len(data)}


@pytest.mark.parametrize("student", ["cross", "cross_chars"])
def test_multibyte_characters_split_differently_align_only_where_both_have_read_the_same_bytes(
    teacher_tok, student, request
):
    """Byte-level BPE splits a character's bytes across tokens on one side only (the teacher
    splits 日, 🤗, 𝔘 where ``cross_chars`` holds them whole; ``cross`` splits é, €, — where the
    teacher holds them whole). A boundary inside a character on one side must not be paired
    with the other side's character boundary (what alignment by character offsets does); a pair
    inside a character exists only where both sides split there, having read the same bytes."""
    cross = request.getfixturevalue(student)
    data = MULTIBYTE.encode()
    ids = teacher_tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    a = cross.align(_row(ids, 0), 4)
    s_ids = a["input_ids"]
    t_off = np.concatenate([[0], np.cumsum([len(cross.teacher_bytes[i]) for i in ids])])
    s_off = np.concatenate([[0], np.cumsum([len(cross.student_bytes[i]) for i in s_ids])])
    t_bounds, s_bounds, chars = set(t_off[1:-1].tolist()), set(s_off[1:-1].tolist()), _char_starts(data)
    one_sided = (t_bounds ^ s_bounds) - chars
    assert one_sided, "some character is split on one side only"
    pairs = _pairs(a)
    assert pairs == _brute_force_pairs(s_ids, cross.student_bytes, ids, cross.teacher_bytes, 0)
    at = {int(s_off[j + 1]) for j, _ in pairs}
    assert at == t_bounds & s_bounds, "paired at exactly the boundaries both sides have"
    assert not at & one_sided
    for j, m in pairs:  # each pair predicts text from the same byte on
        assert s_off[j + 1] == t_off[m + 1]
    # byte offsets stay right: both spell the text, CE covers every student token after the first
    assert b"".join(cross.student_bytes[i] for i in s_ids) == data
    np.testing.assert_array_equal(a["ce_positions"], np.nonzero(s_off[1:-1] >= t_off[1])[0])
    assert a["span_bytes"] == len(data) - t_off[1]
    assert a["ce_bytes"] == len(data) - s_off[a["ce_positions"][0] + 1]
    if student == "cross_chars":  # on the characters it was trained on
        trained = len(MULTIBYTE.split(" café")[0].encode())
        assert not {b for b in s_bounds - chars if b < trained}, "this student splits none of them"
        assert {b for b in t_bounds - chars if b < trained}, "the teacher splits some"


@pytest.mark.parametrize("student", ["cross", "cross_chars"])
def test_a_window_cut_inside_characters_keeps_byte_offsets(teacher_tok, student, request):
    """A window that starts and ends inside characters (cut from a longer document): the
    student reads the whole characters between, its offsets count from the window's first
    byte, and pairs and byte counts follow."""
    cross = request.getfixturevalue(student)
    ids = teacher_tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    table = cross.teacher_bytes
    first = next(i for i, t in enumerate(ids) if table[t][0] & 0xC0 == 0x80)  # a token starting inside a character
    last = max(i for i, t in enumerate(ids) if table[t] in (b"\xf0\x9d", b"\x94"))  # ends inside 𝔦
    window = ids[first : last + 1]
    data = b"".join(table[i] for i in window)
    lead = next(i for i, b in enumerate(data) if b & 0xC0 != 0x80)
    end = max(i for i, b in enumerate(data) if b & 0xC0 != 0x80)  # 𝔦's first byte: the incomplete character is dropped
    assert lead > 0 and end < len(data)
    for start in (0, 2):
        a = cross.align(_row(window, start), 4)
        s_ids = a["input_ids"]
        assert b"".join(cross.student_bytes[i] for i in s_ids) == data[lead:end]
        s_ids2, s_off = cross.student_ids(data)
        assert s_ids2 == s_ids and s_off[0] == lead and s_off[-1] == end
        assert _pairs(a) == _brute_force_pairs(s_ids, cross.student_bytes, window, table, start, lead=lead) != set()
        t_off = np.concatenate([[0], np.cumsum([len(table[i]) for i in window])])
        span_from = t_off[start + 1]
        np.testing.assert_array_equal(a["ce_positions"], np.nonzero(s_off[1:-1] >= span_from)[0])
        assert a["span_bytes"] == len(data) - span_from
        assert a["ce_bytes"] == end - s_off[a["ce_positions"][0] + 1]


def test_a_window_of_only_part_of_a_character_collates_as_padding(teacher_tok, cross):
    """A document's last window can be its last two teacher tokens, the trailing bytes of an
    emoji: the student has no whole character to read. The row is padding (no CE, no KD) and
    the batch's other rows are as they would be alone."""
    ids = teacher_tok("x 🤗", add_special_tokens=False)["input_ids"]
    tail = ids[-2:]
    assert all(cross.teacher_bytes[i][0] & 0xC0 == 0x80 for i in tail), "both tokens are inside 🤗"
    a = cross.align(_row(tail, 0), 4)
    assert a["input_ids"] == [] and a["ce_bytes"] == 0 and not len(a["kd_positions"])
    full = _row(teacher_tok(TEXTS[0], add_special_tokens=False)["input_ids"], 1)
    batch, alone = collate_cross([full, _row(tail, 0)], 4, cross), collate_cross([full], 4, cross)
    assert not batch["attention_mask"][1].any() and not batch["mask"][1].any() and not batch["kd_mask"][1].any()
    for name in alone:
        assert torch.equal(batch[name][:1], alone[name]), name
