"""Losses against reference formulas on the full vocabulary, invariants and a golden value.

Tolerances: 1e-5 absolute on fp32 values of order 1.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.configbase import ConfigError
from distill.train import config
from distill.train.config import TrainConfig
from distill.train.losses import (
    DIVERGENCES,
    LossSpec,
    candidate_kl,
    candidate_loss,
    candidate_scores,
    cross_entropy,
    distillation_loss,
    kd_loss,
    sparse_log_distributions,
)
from distill.train.trainer import BatchKind, StepLoss, collate_candidates, micro_batch_loss
from storage import codec

B, T, V = 2, 5, 11
TOL = 1e-5


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    student_logits = torch.randn(B, T, V, generator=g) * 2
    teacher_logits = torch.randn(B, T, V, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    return student_logits, teacher_logits, mask


def full_topk(teacher_logits, k):
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    lp, ids = teacher_lp.topk(k, -1)
    return ids, lp


def akl_weights(p, q, mu=0.5, bucket=False):
    """AKL's head weight g_head / (g_head + g_tail) per position, written out position by position
    in float64 numpy: walk the teacher's outcomes from the most probable, an outcome is head while
    the mass already walked is below ``mu``; with ``bucket`` the last outcome is tail. (B, T)."""
    p, q = p.double().numpy(), q.double().numpy()
    out = np.zeros(p.shape[:-1])
    for index in np.ndindex(*p.shape[:-1]):
        pi, qi = p[index], q[index]
        ranked = len(pi) - 1 if bucket else len(pi)
        g_head = g_tail = walked = 0.0
        for j in sorted(range(ranked), key=lambda j: -pi[j]):
            if walked < mu:
                g_head += abs(pi[j] - qi[j])
            else:
                g_tail += abs(pi[j] - qi[j])
            walked += pi[j]
        if bucket:
            g_tail += abs(pi[-1] - qi[-1])
        out[index] = g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5
    return torch.from_numpy(out)


def reference(name, p, q, beta=0.5, alpha=0.1, mu=0.5, bucket=False):
    """Explicit formulas over whole distributions (B, T, V) -> (B, T). ``bucket``: the last
    outcome is the tail bucket (AKL counts it as tail)."""

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":  # Wu et al., COLING 2025
        w = akl_weights(p, q, mu, bucket).to(p.dtype)
        return w * kl(p, q) + (1 - w) * kl(q, p)
    raise KeyError(name)


def masked(values, mask):
    return (values * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_full_vocabulary_matches_reference(tensors, name, tail):
    """With K = V both tail treatments are exact and must equal the plain formulas."""
    student_logits, teacher_logits, mask = tensors
    ids, lp = full_topk(teacher_logits, V)
    got = kd_loss(student_logits, ids, lp, mask, LossSpec(name, tail=tail))
    want = masked(reference(name, teacher_logits.softmax(-1), student_logits.softmax(-1)), mask)
    assert abs(got.item() - want.item()) < 1e-4


def test_forward_kl_equals_torch_kl_div(tensors):
    student_logits, teacher_logits, mask = tensors
    ids, lp = full_topk(teacher_logits, V)
    got = kd_loss(student_logits, ids, lp, torch.ones(B, T, dtype=torch.bool))
    want = F.kl_div(
        torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1), log_target=True, reduction="sum"
    ) / (B * T)
    assert abs(got.item() - want.item()) < TOL


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_reference(tensors, tail):
    """K < V: renormalized top-k, or top-k plus one tail outcome, on both sides."""
    student_logits, teacher_logits, mask = tensors
    k = 4
    ids, lp = full_topk(teacher_logits, k)
    q_full = student_logits.softmax(-1)
    p_k, q_k = lp.exp(), q_full.gather(-1, ids)
    if tail == "renormalize":
        p, q = p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)
    else:
        p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    want = masked(reference("forward_kl", p, q), mask)
    got = kd_loss(student_logits, ids, lp, mask, LossSpec(tail=tail))
    assert abs(got.item() - want.item()) < TOL


def test_temperature(tensors):
    student_logits, teacher_logits, mask = tensors
    k, temp = 4, 2.0
    ids, lp = full_topk(teacher_logits, k)
    p = torch.softmax(lp / temp, -1)
    q = torch.softmax(torch.log_softmax(student_logits / temp, -1).gather(-1, ids), -1)
    want = masked(reference("forward_kl", p, q), mask) * temp**2
    got = kd_loss(student_logits, ids, lp, mask, LossSpec(temperature=temp))
    assert abs(got.item() - want.item()) < TOL
    with pytest.raises(ValueError, match="bucket"):
        kd_loss(student_logits, ids, lp, mask, LossSpec(tail="bucket", temperature=temp))


# ---- tail: bucket with K < V, against explicit (K+1)-outcome distributions ---------------------

BUCKET_V, BUCKET_K = 50, 8
BUCKET_RTOL = 1e-5  # relative (+ 1e-7 absolute), float32 loss against a float64 reference (measured: <= 5e-7)


def bucket_case(tiny_tails=(1e-6, 1e-4), seed=0):
    """Teacher distributions (2, 4, V=50) in float64 and student logits (2, 4, V) in float32.

    The last position of row 0 and of row 1 is confident: its top-K hold exactly
    ``1 - tiny_tails[i]``; the teacher's ids are shuffled so that the top-K are not ids 0..K-1.
    At the second confident position the student equals the teacher (a correct student).
    """
    g = torch.Generator().manual_seed(seed)
    teacher = torch.softmax(torch.randn(2, 4, BUCKET_V, generator=g, dtype=torch.float64) * 2, -1)
    student_logits = torch.randn(2, 4, BUCKET_V, generator=g) * 2
    for row, tiny in enumerate(tiny_tails):
        boost = torch.zeros(BUCKET_K, dtype=torch.float64)
        boost[0] = 6.0
        top = torch.softmax(torch.randn(BUCKET_K, generator=g, dtype=torch.float64) + boost, -1) * (1 - tiny)
        rest = torch.softmax(torch.randn(BUCKET_V - BUCKET_K, generator=g, dtype=torch.float64), -1) * tiny
        teacher[row, -1] = torch.cat([top, rest])[torch.randperm(BUCKET_V, generator=g)]
    student_logits[1, -1] = teacher[1, -1].log().float()
    return teacher, student_logits


def bucket_reference(name, teacher_logprobs, ids, student_logits):
    """The divergence on K+1 outcomes, written out in float64: the teacher's top-K probabilities
    (as the loss receives them, float32 logprobs) plus the rest of its mass, and the student's
    probabilities of the same ids plus its mass outside them."""
    q_full = torch.softmax(student_logits.double(), -1)
    p_k = teacher_logprobs.double().exp()
    outside = torch.ones_like(q_full, dtype=torch.bool).scatter(-1, ids, False)
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_full.gather(-1, ids), (q_full * outside).sum(-1, keepdim=True)], -1)
    return reference(name, p, q, bucket=True)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bucket_topk_reference(name):
    """Every divergence with ``tail: bucket`` and K=8 < V=50, position by position, including
    confident positions whose tails are 1e-6 and 1e-4."""
    teacher, student_logits = bucket_case()
    p_k, ids = teacher.topk(BUCKET_K, -1)
    teacher_logprobs = p_k.log().float()  # (2, 4, K)
    # float32 logprobs carry a tail of 1e-6 to ~sum(p |log p|) * 2^-24 absolute (here 0.11%): a
    # limit of the input; the reference uses the same input, so it checks the loss's arithmetic
    # (a float32 sum of the teacher's top-K mass would be off by 1% in reverse KL here)
    true_tail = teacher.sum(-1) - p_k.sum(-1)
    implied_tail = 1 - teacher_logprobs.double().exp().sum(-1)
    assert ((implied_tail - true_tail).abs() <= 0.01 * true_tail).all()
    want = bucket_reference(name, teacher_logprobs, ids, student_logits)  # (2, 4)
    for b in range(2):
        for t in range(4):
            one = torch.zeros(2, 4, dtype=torch.bool)
            one[b, t] = True
            got = kd_loss(student_logits, ids, teacher_logprobs, one, LossSpec(name, tail="bucket"))
            assert abs(got.item() - want[b, t].item()) <= BUCKET_RTOL * abs(want[b, t].item()) + 1e-7, (b, t)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bucket_loss_with_decoded_tiny_tail(name):
    """A confident position's tail through the shard codec moves the loss by at most
    ``TAIL_MAX_REL_ERROR`` nats: every teacher probability is off by a factor within
    ``1 +- eps`` (eps = TAIL_MAX_REL_ERROR: the tail directly, the top-K through ``1 - tail``), so
    KL(student || teacher) moves by at most ``-log(1 - eps) ~ eps`` and the other divergences,
    which weight the teacher's log-probabilities by less or mix them, by less. Both sides use the
    same decoded top-K shape, so only the tail code differs.
    """
    teacher, student_logits = bucket_case()
    for b, tiny in enumerate((1e-6, 1e-4)):
        p_k, ids = teacher[b, -1].topk(BUCKET_K)
        tail = np.array([(teacher[b, -1].sum() - p_k.sum()).item()])
        assert abs(tail[0] - tiny) < 1e-15
        diffs = codec.encode_topk_logprobs(p_k.log()[None].numpy())

        def loss(tail_mass):
            teacher_logprobs = torch.from_numpy(codec.decode_topk_logprobs(diffs, tail_mass))[None]  # (1, 1, K)
            one = torch.ones(1, 1, dtype=torch.bool)
            return kd_loss(
                student_logits[b : b + 1, -1:], ids[None, None], teacher_logprobs, one, LossSpec(name, tail="bucket")
            ).item()

        decoded = codec.decode_tail(codec.encode_tail(tail))
        assert abs(decoded[0] - tiny) <= codec.TAIL_MAX_REL_ERROR * tiny
        assert abs(loss(decoded) - loss(tail)) <= codec.TAIL_MAX_REL_ERROR, (b, tiny)


# ---- temperature: which power of T keeps gradients comparable -----------------------------------

GRADIENT_POWER = {"tvd": -1}  # measured exponent of |grad| in T (see below); -2 for all others


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_temperature_factor_matches_gradient_scaling(name):
    """|d D(softmax(t/T), softmax(s/T)) / ds| for a student close to the teacher, at T = 1, 2, 4.

    Smooth divergences (the KL family) are second order in ``q - p ~ J (s - t) / T`` with
    ``J = diag(q) - q q^T``, so their gradient goes as 1/T^2 and ``kd_loss`` multiplies by T^2
    (Hinton et al., 2015). Total variation is first order (|q - p|): its gradient is
    ``J sign(q - p) / (2T)``, which goes as 1/T, so ``kd_loss`` multiplies it by T; T^2 would
    make its gradient grow as T. Measured in the high-temperature regime Hinton's argument
    assumes (logits of scale 0.1, so ``J`` hardly changes with T): exponents -2 and -1.
    Tolerances: 0.05 on the exponent, 5% on the flatness of the scaled gradient.
    """
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(4, 16, V, generator=g, dtype=torch.float64) * 0.1
    student_logits = (teacher_logits + 1e-3 * torch.randn(4, 16, V, generator=g, dtype=torch.float64)).float()
    ids, lp = full_topk(teacher_logits, V)
    mask = torch.ones(4, 16, dtype=torch.bool)
    temps = (1.0, 2.0, 4.0)
    raw, scaled = [], []
    for temp in temps:
        s = student_logits.clone().requires_grad_(True)
        divergence = DIVERGENCES[name](
            torch.log_softmax(teacher_logits.float() / temp, -1), torch.log_softmax(s / temp, -1)
        )
        (grad,) = torch.autograd.grad(masked(divergence, mask), s)
        raw.append(grad.norm().item())
        s = student_logits.clone().requires_grad_(True)
        kd_loss(s, ids, lp.float(), mask, LossSpec(name, tail="renormalize", temperature=temp)).backward()
        scaled.append(s.grad.norm().item())
    exponents = [math.log(raw[i + 1] / raw[i]) / math.log(2) for i in range(2)]
    want = GRADIENT_POWER.get(name, -2)
    assert all(abs(e - want) < 0.05 for e in exponents), exponents
    assert max(scaled) / min(scaled) < 1.05, scaled
    # and the value is the divergence of the tempered distributions times T^(-want), here for a
    # student far enough from the teacher that float32 rounding is small against the loss
    temp, far = 2.0, student_logits + torch.randn(4, 16, V, generator=g)
    p, q = (
        torch.softmax(lp / temp, -1),
        torch.softmax(far.double() / temp, -1).gather(-1, ids),
    )  # K = V, teacher's order
    got = kd_loss(far, ids, lp.float(), mask, LossSpec(name, tail="renormalize", temperature=temp))
    assert abs(got.item() - masked(reference(name, p, q), mask).item() * temp**-want) <= 1e-4 * abs(got.item())


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_invariants(tensors, name, tail):
    student_logits, teacher_logits, mask = tensors
    ids, lp = full_topk(teacher_logits, 4)
    # zero when the student equals the teacher
    same = kd_loss(teacher_logits, ids, lp, mask, LossSpec(name, tail=tail))
    assert abs(same.item()) < 1e-5
    # never negative
    assert kd_loss(student_logits, ids, lp, mask, LossSpec(name, tail=tail)).item() >= -1e-6
    # masked positions have no effect
    noisy = student_logits.clone()
    noisy[~mask] = 1e3 * torch.randn_like(noisy[~mask])
    a = kd_loss(student_logits, ids, lp, mask, LossSpec(name, tail=tail))
    b = kd_loss(noisy, ids, lp, mask, LossSpec(name, tail=tail))
    assert abs(a.item() - b.item()) < TOL
    # everything masked: 0, not NaN
    none = torch.zeros_like(mask)
    assert kd_loss(student_logits, ids, lp, none, LossSpec(name, tail=tail)).item() == 0.0


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_finite_gradients_with_inf_padding(tensors, name, tail):
    student_logits, teacher_logits, mask = tensors
    ids, lp = full_topk(teacher_logits, 4)
    lp = lp.clone()
    lp[0, 0, 2:] = -math.inf  # a position with only two valid labels
    lp[1] = -math.inf  # a whole row of padding
    mask = mask.clone()
    mask[1] = False
    logits = student_logits.clone().requires_grad_(True)
    loss = kd_loss(logits, ids, lp, mask, LossSpec(name, tail=tail))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() == 0


def test_cross_entropy_and_mix(tensors):
    student_logits, teacher_logits, mask = tensors
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    want = F.cross_entropy(student_logits[mask], targets[mask])
    assert abs(cross_entropy(student_logits, targets, mask).item() - want.item()) < TOL
    ids, lp = full_topk(teacher_logits, 4)
    loss, parts = distillation_loss(student_logits, targets, ids, lp, mask, LossSpec(kd_weight=0.3))
    assert abs(loss.item() - (0.3 * parts["kd"] + 0.7 * parts["ce"]).item()) < TOL
    ce_only, parts = distillation_loss(student_logits, targets, ids, lp, mask, LossSpec(kd_weight=0.0))
    assert abs(ce_only.item() - want.item()) < TOL and parts["kd"].item() == 0.0


@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
def test_kd_only_positions_take_no_cross_entropy(tensors, kd_weight):
    """On-policy rows (``kd_only``): per token, ``kd_weight * KD + (1 - kd_weight) * CE`` on the
    teacher's text and KD alone on the student's own tokens, every token over one denominator."""
    student_logits, teacher_logits, mask = tensors
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    own = torch.zeros(B, T, dtype=torch.bool)
    own[0] = True  # the first row is the student's own answer
    p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
    kd_t = reference("forward_kl", p, q)
    ce_t = F.cross_entropy(student_logits.reshape(-1, V), targets.reshape(-1), reduction="none").reshape(B, T)
    per_token = torch.where(own, kd_t, kd_weight * kd_t + (1 - kd_weight) * ce_t)
    want = (per_token * mask).sum() / mask.sum()
    ids, lp = full_topk(teacher_logits, V)
    got, parts = distillation_loss(
        student_logits, targets, ids, lp, mask, LossSpec(tail="bucket", kd_weight=kd_weight), kd_only=own & mask
    )
    assert abs(got.item() - want.item()) < 1e-4
    assert abs(parts["ce"].item() - ((ce_t * (mask & ~own)).sum() / mask.sum()).item()) < 1e-4
    # without own tokens, the plain mix
    plain, _ = distillation_loss(student_logits, targets, ids, lp, mask, LossSpec(tail="bucket", kd_weight=kd_weight))
    none, _ = distillation_loss(
        student_logits,
        targets,
        ids,
        lp,
        mask,
        LossSpec(tail="bucket", kd_weight=kd_weight),
        kd_only=torch.zeros_like(mask),
    )
    assert torch.equal(plain, none)


def test_golden_value():
    """A hand-computed forward KL: p = (0.5, 0.5) over top-2, q = softmax(0, log 3) restricted = (0.25, 0.75)."""
    student_logits = torch.tensor([[[0.0, math.log(3.0), -1e9]]])
    ids = torch.tensor([[[0, 1]]])
    lp = torch.log(torch.tensor([[[0.4, 0.4]]]))  # renormalizes to (0.5, 0.5)
    got = kd_loss(student_logits, ids, lp, torch.ones(1, 1, dtype=torch.bool))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(got.item() - want) < 1e-6


def test_candidate_kl_reference_and_invariants():
    g = torch.Generator().manual_seed(3)
    student_scores = torch.randn(4, 5, generator=g) * 3
    teacher_lp = torch.log_softmax(torch.randn(4, 5, generator=g), -1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False  # an example with three candidates
    got = candidate_kl(student_scores, teacher_lp, mask)
    want = []
    for b in range(4):
        m = mask[b]
        p = torch.softmax(teacher_lp[b][m], -1)
        q = torch.softmax(student_scores[b][m], -1)
        want.append(F.kl_div(q.log(), p, reduction="sum"))
    assert abs(got.item() - torch.stack(want).mean().item()) < TOL
    assert abs(candidate_kl(teacher_lp, teacher_lp, mask).item()) < 1e-6
    assert candidate_kl(student_scores, teacher_lp, torch.zeros_like(mask)).item() == 0.0
    scores = student_scores.clone().requires_grad_(True)
    padded = teacher_lp.clone()
    padded[1, 3:] = -math.inf
    candidate_kl(scores, padded, mask).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[1, 3:].abs().sum() == 0


def test_candidate_scores_and_loss_by_hand():
    rows = [
        {"prompt_ids": [5, 6], "candidate_ids": [[1], [2, 3]], "teacher_logprobs": np.log([0.8, 0.2]), "answer": 1},
        {
            "prompt_ids": [7],
            "candidate_ids": [[4], [0], [3, 3]],
            "teacher_logprobs": np.log([0.1, 0.3, 0.6]),
            "answer": -1,
        },
    ]
    batch = collate_candidates(rows)
    assert batch["input_ids"].shape == (5, 4) and batch["index"].tolist() == [[0, 1, -1], [2, 3, 4]]
    # candidate tokens are predicted from the last prompt position on
    assert batch["mask"][1].tolist() == [False, True, True, False] and batch["targets"][1, :3].tolist() == [6, 2, 3]
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 8, requires_grad=True)
    for normalize in (False, True):
        scores = candidate_scores(logits, batch["targets"], batch["mask"], batch["index"], normalize)
        lp = torch.log_softmax(logits.detach(), -1)
        by_hand = []
        for seq in range(5):
            toks = [lp[seq, t, batch["targets"][seq, t]] for t in range(4) if batch["mask"][seq, t]]
            by_hand.append(sum(toks) / (len(toks) if normalize else 1))
        assert torch.allclose(scores[0, :2], torch.stack(by_hand[:2])) and scores[0, 2] == 0
        assert torch.allclose(scores[1], torch.stack(by_hand[2:]))
    loss, terms = candidate_loss(
        scores, batch["teacher_logprobs"], batch["candidate_mask"], batch["answer"], kd_weight=0.3
    )
    # CE only over the example with a gold answer (index 1 of the first example's two candidates)
    ce = -torch.log_softmax(scores[0, :2], -1)[1]
    kd = candidate_kl(scores, batch["teacher_logprobs"], batch["candidate_mask"])
    assert torch.allclose(terms["ce"], ce) and torch.allclose(loss, 0.3 * kd + 0.7 * ce)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().sum() > 0


# ---- AKL (adaptive KL, Wu et al., COLING 2025) ---------------------------------------------------

AKL_V = 50


def akl_dense_case(seed=0):
    """Teacher (2, 4, V=50) float64 probabilities, some peaked, some flat, and float32 student logits."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)[None, :, None]
    teacher = torch.softmax(torch.randn(2, 4, AKL_V, generator=g, dtype=torch.float64) * scale, -1)
    student_logits = torch.randn(2, 4, AKL_V, generator=g) * 2
    return teacher, student_logits


@pytest.mark.parametrize("mu", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_akl_full_vocabulary_reference(mu, tail):
    """K = V (the bucket is empty): position by position, against the formula over the whole vocabulary."""
    teacher, student_logits = akl_dense_case()
    lp, ids = teacher.log().topk(AKL_V, -1)
    want = reference("akl", teacher, torch.softmax(student_logits.double(), -1), mu=mu)
    for b in range(2):
        for t in range(4):
            one = torch.zeros(2, 4, dtype=torch.bool)
            one[b, t] = True
            got = kd_loss(student_logits, ids, lp.float(), one, LossSpec("akl", {"mu": mu}, tail=tail))
            assert abs(got.item() - want[b, t].item()) <= 1e-5 * abs(want[b, t].item()) + 1e-6, (b, t)


@pytest.mark.parametrize("mu", [0.2, 0.5, 0.8])
def test_akl_topk_reference(mu):
    """K = 8 < V = 50, position by position, including confident positions whose tails are 1e-6 and
    1e-4: with the tail bucket (K+1 outcomes, the bucket counted as tail) and renormalized (K)."""
    teacher, student_logits = bucket_case()
    p_k, ids = teacher.topk(BUCKET_K, -1)
    lp = p_k.log().float()
    q_full = torch.softmax(student_logits.double(), -1)
    q_k = q_full.gather(-1, ids)
    outside = torch.ones_like(q_full, dtype=torch.bool).scatter(-1, ids, False)
    p_b = torch.cat([lp.double().exp(), 1 - lp.double().exp().sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_k, (q_full * outside).sum(-1, keepdim=True)], -1)
    want = {
        "bucket": reference("akl", p_b, q_b, mu=mu, bucket=True),
        "renormalize": reference("akl", p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True), mu=mu),
    }
    for tail, ref in want.items():
        for b in range(2):
            for t in range(4):
                one = torch.zeros(2, 4, dtype=torch.bool)
                one[b, t] = True
                got = kd_loss(student_logits, ids, lp, one, LossSpec("akl", {"mu": mu}, tail=tail))
                assert abs(got.item() - ref[b, t].item()) <= BUCKET_RTOL * abs(ref[b, t].item()) + 1e-7, (tail, b, t)


def _limit_case():
    """One position over V = 50: the teacher's head at mu = 0.5 is ids 0, 1, 2 (masses 0.25, 0.2,
    0.15: the mass above id 3 is 0.6); ids 3..49 share 0.4 unevenly. Students that move mass only
    inside the head, or only inside the tail."""
    g = torch.Generator().manual_seed(5)
    rest = torch.softmax(torch.randn(AKL_V - 3, generator=g, dtype=torch.float64), -1) * 0.4
    assert rest.max() < 0.15
    p = torch.cat([torch.tensor([0.25, 0.2, 0.15], dtype=torch.float64), rest])
    head_only = p.clone()
    head_only[:3] = torch.tensor([0.3, 0.15, 0.15])  # not a swap: a swap makes forward KL = reverse KL
    tail_only = p.clone()
    tail_only[3:] = rest.roll(1)  # a cycle, not an involution, for the same reason
    return p, head_only, tail_only


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_akl_limits(tail):
    p, head_only, tail_only = _limit_case()
    ids, lp = full_topk(p.log()[None, None], AKL_V)
    one = torch.ones(1, 1, dtype=torch.bool)

    def loss(student, divergence):
        logits = student.log().float()[None, None].clone().requires_grad_(True)
        value = kd_loss(logits, ids, lp.float(), one, LossSpec(divergence, tail=tail))
        value.backward()
        return value.item(), logits.grad

    # student == teacher: 0 and no gradient
    value, grad = loss(p, "akl")
    assert abs(value) < 1e-6 and grad.abs().max() < 1e-6
    # all the gap in the head: forward KL, value and gradient
    assert akl_weights(p[None], head_only[None])[0] == 1.0
    (akl, g_akl), (fkl, g_fkl), (rkl, _) = (
        loss(head_only, "akl"),
        loss(head_only, "forward_kl"),
        loss(head_only, "reverse_kl"),
    )
    assert abs(akl - fkl) <= 1e-6 * fkl and abs(fkl - rkl) > 1e-3 * fkl
    assert torch.allclose(g_akl, g_fkl, atol=1e-7)
    # all the gap in the tail: reverse KL
    assert akl_weights(p[None], tail_only[None])[0] == 0.0
    (akl, g_akl), (rkl, g_rkl), (fkl, _) = (
        loss(tail_only, "akl"),
        loss(tail_only, "reverse_kl"),
        loss(tail_only, "forward_kl"),
    )
    assert abs(akl - rkl) <= 1e-6 * rkl and abs(fkl - rkl) > 1e-3 * rkl
    assert torch.allclose(g_akl, g_rkl, atol=1e-7)


def test_akl_bucket_counts_as_tail():
    """K = 8 < V: a student that only moves mass between the top-8's tail ids and the ids outside
    the top-8 has all its gap in the tail (the bucket included): AKL is reverse KL on the K+1 outcomes."""
    p, _, _ = _limit_case()
    k = 8
    ids, lp = full_topk(p.log()[None, None], k)
    top = ids[0, 0]
    assert top[:3].tolist() == [0, 1, 2]  # the head
    outside = torch.ones(AKL_V, dtype=torch.bool).scatter(0, top, False)
    student = p.clone()
    student[top[3:]] *= 0.5  # the top-8's tail ids lose mass ...
    student[outside] *= 1 + p[top[3:]].sum() * 0.5 / p[outside].sum()  # ... to the ids outside the top-8 (the bucket)
    assert abs(student.sum().item() - 1) < 1e-12
    one = torch.ones(1, 1, dtype=torch.bool)
    logits = student.log().float()[None, None]
    akl = kd_loss(logits, ids, lp.float(), one, LossSpec("akl", tail="bucket")).item()
    rkl = kd_loss(logits, ids, lp.float(), one, LossSpec("reverse_kl", tail="bucket")).item()
    fkl = kd_loss(logits, ids, lp.float(), one, LossSpec("forward_kl", tail="bucket")).item()
    assert abs(akl - rkl) <= 1e-5 * rkl and abs(fkl - rkl) > 1e-2 * rkl


def test_akl_weights_are_constants_for_the_gradient():
    """The gradient is w * grad(forward KL) + (1 - w) * grad(reverse KL) with w taken as a constant
    (detached), as in the authors' code; differentiating through w would add a term."""
    teacher, student_logits = akl_dense_case(seed=3)
    lp, ids = teacher.log().topk(AKL_V, -1)
    w = akl_weights(teacher, torch.softmax(student_logits.double(), -1)).float()  # (2, 4)
    assert ((w > 0.05) & (w < 0.95)).any()

    def grad(divergence, weights=None):
        s = student_logits.clone().requires_grad_(True)
        log_p, log_q = sparse_log_distributions(s, ids, lp.float(), "renormalize")
        per_position = DIVERGENCES[divergence](log_p, log_q)
        (per_position * (1.0 if weights is None else weights)).sum().backward()
        return s.grad

    got = grad("akl")
    want = grad("forward_kl", w) + grad("reverse_kl", 1 - w)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_token_weighted_denominator(tensors, name):
    """Two micro-batches, each divided by the step's labelled-token count, add up (value and
    gradient) to the whole batch's mean: for every divergence, AKL included."""
    student_logits, teacher_logits, mask = tensors
    ids, lp = full_topk(teacher_logits, 4)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))

    def run(rows, denominator):
        s = student_logits[rows].clone().requires_grad_(True)
        loss, parts = distillation_loss(
            s, targets[rows], ids[rows], lp[rows], mask[rows], LossSpec(name, tail="bucket"), num_tokens=denominator
        )
        loss.backward()
        return loss, parts["kd"], s.grad

    whole, whole_kd, whole_grad = run(slice(0, 2), None)
    count = mask.sum().float()
    (a, a_kd, a_grad), (b, b_kd, b_grad) = run(slice(0, 1), count), run(slice(1, 2), count)
    assert abs((a + b).item() - whole.item()) < TOL and abs((a_kd + b_kd).item() - whole_kd.item()) < TOL
    assert torch.allclose(torch.cat([a_grad, b_grad]), whole_grad, atol=1e-6)
    # a micro-batch's own mean would weigh its 5 tokens like the other's 3
    own = run(slice(1, 2), None)[0]
    assert abs(own.item() - b.item() * count.item() / mask[1].sum().item()) < TOL


def test_akl_mu_validation_and_trainer_plumbing():
    student_logits, _ = akl_dense_case()
    teacher, _ = akl_dense_case(seed=1)
    lp, ids = teacher.log().topk(8, -1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for mu in (0.0, 1.0):
        with pytest.raises(ValueError, match="mu"):
            kd_loss(student_logits, ids, lp.float(), mask, LossSpec("akl", {"mu": mu}))
        with pytest.raises(ConfigError, match="akl_mu"):
            TrainConfig(divergence="akl", akl_mu=mu)
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "targets": torch.zeros(2, 4, dtype=torch.long),
        "mask": mask,
        "teacher_ids": ids,
        "teacher_logprobs": lp.float(),
    }

    def model(**_):  # a student whose logits are given
        return SimpleNamespace(logits=student_logits)

    counts = torch.tensor([8.0, 8.0])
    values = {}
    for mu in (0.2, 0.8):
        cfg = TrainConfig(divergence="akl", akl_mu=mu, tail="bucket")
        step_loss = StepLoss.from_config(cfg, BatchKind.WINDOWS)
        loss, _ = micro_batch_loss(model, batch, step_loss, counts, torch.device("cpu"))
        want, _ = distillation_loss(
            student_logits, batch["targets"], ids, lp.float(), mask, LossSpec("akl", {"mu": mu}, tail="bucket")
        )
        assert abs(loss.item() - want.item()) < TOL
        values[mu] = loss.item()
    assert abs(values[0.2] - values[0.8]) > 1e-4  # mu reaches the loss


def test_divergence_names_are_the_configs():
    """``train.divergence`` is validated against the config's tuple: every name there has a loss
    here and the other way round (a name only one side knows would be accepted and fail in the
    first step, or refused although it exists)."""
    assert tuple(DIVERGENCES) == config.DIVERGENCES
    for name in config.DIVERGENCES:
        TrainConfig(divergence=name, tail="bucket")  # accepted by the config
        LossSpec.from_config(TrainConfig(divergence=name, tail="bucket"))  # and bound by the loss


def test_loss_spec_binds_each_divergences_own_options_and_refuses_others():
    """Options are bound once: the config's value reaches the divergence that reads it, and a
    misspelled option or another divergence's option fails when the spec is built."""
    cfg = TrainConfig(beta=0.3, alpha=0.2, akl_mu=0.7, tail="bucket")
    bound = {
        name: LossSpec.from_config(TrainConfig(**{**vars(cfg), "divergence": name})).options for name in DIVERGENCES
    }
    assert bound == {
        "forward_kl": {},
        "reverse_kl": {},
        "jsd": {"beta": 0.3},
        "skew_kl": {"alpha": 0.2},
        "skew_reverse_kl": {"alpha": 0.2},
        "tvd": {},
        "akl": {"mu": 0.7},
    }
    with pytest.raises(TypeError, match=r"divergence 'jsd' has no option 'betta': it takes \['beta'\]"):
        LossSpec("jsd", {"betta": 0.5})
    with pytest.raises(TypeError, match="divergence 'forward_kl' has no option 'mu'"):
        LossSpec("forward_kl", {"mu": 0.5})
    with pytest.raises(TypeError, match="no option 'bucket'"):  # set by the loss from the tail, not an option
        LossSpec("akl", {"bucket": True})
    with pytest.raises(ValueError, match="divergence='kl'"):
        LossSpec("kl")
    # the bound option changes the value: JSD(beta) at two betas on the same tensors
    g = torch.Generator().manual_seed(5)
    logits, teacher = torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 6, generator=g)
    ids, lp = full_topk(teacher, 6)
    one = torch.ones(1, 3, dtype=torch.bool)
    values = [kd_loss(logits, ids, lp, one, LossSpec("jsd", {"beta": b})).item() for b in (0.2, 0.8)]
    want = [masked(reference("jsd", teacher.softmax(-1), logits.softmax(-1), beta=b), one).item() for b in (0.2, 0.8)]
    assert abs(values[0] - want[0]) < TOL and abs(values[1] - want[1]) < TOL and abs(values[0] - values[1]) > 1e-3
