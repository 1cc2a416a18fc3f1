"""Distillation losses over sparse (top-k) teacher labels. Pure functions.

Shapes: ``student_logits`` (B, T, V); ``teacher_ids`` (B, T, K) int64; ``teacher_logprobs``
(B, T, K), the teacher's log-probabilities of ``teacher_ids`` under its full distribution at
temperature 1 (entries may be ``-inf`` for padding); ``mask`` (B, T) bool, True where a
position is labelled. Every loss upcasts to fp32, averages over labelled positions and
returns 0 (not NaN) when nothing is labelled.

The missing tail (mass outside the teacher's top-k) is treated one of two ways:

- ``renormalize``: both distributions are restricted to the teacher's top-k ids and
  renormalized (DistillKit ``zero``, axolotl).
- ``bucket``: a (K+1)-th outcome holds the remaining mass on each side, so the student is also
  taught how much mass the teacher leaves outside its top-k. The tail mass of a tempered
  teacher is not recoverable from top-k logprobs, so ``bucket`` requires temperature 1. The
  teacher's tail ``1 - sum(exp(teacher_logprobs))`` is summed in float64: float32 cannot
  resolve the tail of a confident position (a top-k mass of nearly 1).

Temperature ``T`` divides the student logits and the teacher logprobs (renormalized over the
top-k), and the divergence is scaled by ``T**TEMPERATURE_POWER[divergence]`` so that gradient
magnitudes stay comparable across T (Hinton et al., 2015, "Distilling the Knowledge in a
Neural Network", sec. 2). With ``p = softmax(t / T)``, ``q = softmax(s / T)`` and
``J = diag(q) - q q^T``, the gradient w.r.t. the student logits ``s`` is ``J g / T`` with
``g = dD/dq``. For the KL family (forward and reverse KL, JSD, skew KL) D is smooth and zero at
``q = p``, so ``g`` is first order in ``q - p ~ J (s - t) / T``: the gradient goes as ``1/T^2``
and the factor is ``T^2`` (also for AKL, a mix of forward and reverse KL with detached
weights). Total variation is not smooth at ``q = p``: ``g = sign(q - p) / 2`` does not shrink
with T, so its gradient goes as ``1/T`` and the factor is ``T`` (``T^2`` would make it grow as T).
``tests/distill/test_losses.py`` measures both exponents.

A ``LossSpec`` binds a step's options once (divergence and its own options, tail, temperature,
KD weight), so a misspelled option fails when the spec is built, not silently in a step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Mapping

import torch

from distill.train.config import CROSS_TOKENIZER_LOSSES, TAILS, TrainConfig
from distill.train.config import DIVERGENCES as DIVERGENCE_NAMES

NEG = -1e4  # stands in for -inf: exp(NEG) == 0 in fp32 yet NEG * 0 == 0 (no NaN in gradients)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable; mass is clamped to at least 1e-8."""
    x = x.clamp(max=-1e-8)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))).clamp(min=-18.42)


def sparse_log_distributions(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor,
    tail: str = "renormalize",
    temperature: float = 1.0,
    student_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-distributions on a common support: (B, T, K) or (B, T, K+1).

    ``student_lse`` (B, T, 1) may pass a precomputed ``logsumexp(student_logits / T)`` to share
    it with the cross-entropy term. ``teacher_ids=None``: ``teacher_logprobs`` (B, T, V) cover the
    whole vocabulary (an online teacher's log-softmax); both sides are then full (B, T, V)
    distributions at temperature T, with no tail to treat (``tail`` is ignored).
    """
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r}: expected one of {TAILS}")
    logits = student_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if teacher_ids is None:
        teacher_lp = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)  # (B, T, V)
        return teacher_lp, logits - (
            torch.logsumexp(logits, dim=-1, keepdim=True) if student_lse is None else student_lse
        )
    if tail == "bucket" and temperature != 1.0:
        raise ValueError("tail='bucket' needs temperature 1: the tempered tail mass is unknown from top-k labels")
    if student_lse is None:
        student_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, T, 1)
    valid = torch.isfinite(teacher_logprobs)  # (B, T, K)
    student_lp = torch.where(valid, logits.gather(-1, teacher_ids) - student_lse, NEG)  # (B, T, K)
    teacher_lp = torch.where(valid, teacher_logprobs.float(), NEG)
    if tail == "renormalize":
        teacher_lp = torch.log_softmax(teacher_lp / temperature, dim=-1)
        student_lp = torch.log_softmax(student_lp, dim=-1)
        return teacher_lp, student_lp
    # float64: the top-k mass of a confident position is 1 - 1e-6, beyond float32's resolution
    teacher_tail = _log1mexp(torch.logsumexp(teacher_lp.double(), dim=-1, keepdim=True)).to(teacher_lp.dtype)
    student_tail = _log1mexp(torch.logsumexp(student_lp, dim=-1, keepdim=True))
    return torch.cat([teacher_lp, teacher_tail], -1), torch.cat([student_lp, student_tail], -1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), stable."""
    w = torch.tensor(weight_p, dtype=log_p.dtype, device=log_p.device)
    return torch.logaddexp(log_p + torch.log(w), log_q + torch.log1p(-w))


def forward_kl(log_p, log_q):
    """KL(teacher || student): mode-covering (Hinton et al., 2015)."""
    return _kl(log_p, log_q)


def reverse_kl(log_p, log_q):
    """KL(student || teacher): mode-seeking (MiniLLM, Gu et al., ICLR 2024, eq. 1)."""
    return _kl(log_q, log_p)


def generalized_jsd(log_p, log_q, beta: float = 0.5):
    """GKD's JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models", sec. 3)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta}: generalized JSD needs 0 < beta < 1 (use forward_kl / reverse_kl at the ends)")
    m = _mix(log_p, log_q, beta)
    return beta * _kl(log_p, m) + (1 - beta) * _kl(log_q, m)


def skew_kl(log_p, log_q, alpha: float = 0.1):
    """Skew KL: KL(p || alpha p + (1 - alpha) q) (DistiLLM, Ko et al., ICML 2024, eq. 4)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha}: skew KL needs 0 <= alpha < 1")
    return _kl(log_p, _mix(log_p, log_q, alpha))


def skew_reverse_kl(log_p, log_q, alpha: float = 0.1):
    """Skew reverse KL: KL(q || alpha q + (1 - alpha) p) (DistiLLM, Ko et al., ICML 2024, eq. 5)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha}: skew reverse KL needs 0 <= alpha < 1")
    return _kl(log_q, _mix(log_q, log_p, alpha))


def total_variation(log_p, log_q):
    """Total variation distance 0.5 * sum |p - q| (as in DistillKit's TVD loss)."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def adaptive_kl(log_p, log_q, mu: float = 0.5, bucket: bool = False):
    """AKL: per position, ``w_head * KL(p || q) + w_tail * KL(q || p)`` with weights set by where
    the student is wrong (Wu et al., COLING 2025, "Rethinking Kullback-Leibler Divergence in
    Knowledge Distillation for Large Language Models", arXiv:2404.02657).

    The head is the teacher's highest-probability outcomes until their cumulative probability
    reaches ``mu`` (an outcome is in the head when the teacher's mass strictly above it is below
    ``mu``, so the teacher's top-1 always is); the tail is the rest. With
    ``g_head = sum_head |p - q|`` and ``g_tail = sum_tail |p - q|``, ``w_head = g_head /
    (g_head + g_tail)`` weighs forward KL (which fits the head first) and ``w_tail = g_tail /
    (g_head + g_tail)`` reverse KL (which fits the tail first). The weights are constants for the
    gradient (detached, as in the authors' code: ``student_probs.detach()`` in LLM_KD_AKL's
    ``get_ratio`` and ``.detach()`` on both gaps in their KDFlow ``adaptive_kl_div``; the head is
    KDFlow's for ``mu = 1 - adaptive_kl_alpha``); when the gaps are both 0 (student == teacher)
    the weights are 1/2 each.

    On sparse labels the outcomes are the teacher's top-k (renormalized or not) and, when
    ``bucket`` is True, the last outcome is the tail bucket (the mass outside the top-k), which
    always counts as tail: the teacher's mass there is spread over tokens each below the top-k.
    If the top-k hold less than ``mu``, every top-k outcome is head.
    """
    if not 0.0 < mu < 1.0:
        raise ValueError(
            f"mu={mu}: AKL needs 0 < mu < 1 (its head would be empty or everything: use reverse_kl / forward_kl)"
        )
    with torch.no_grad():
        p, gap = log_p.exp(), (log_p.exp() - log_q.exp()).abs()
        ranked = p[..., :-1] if bucket else p
        sorted_p, order = ranked.sort(-1, descending=True)
        head_sorted = (sorted_p.cumsum(-1) - sorted_p) < mu  # teacher mass strictly above each outcome
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        if bucket:
            head = torch.cat([head, torch.zeros_like(head[..., :1])], -1)
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_total = gap.sum(-1)
        w_head = torch.where(g_total > 0, g_head / g_total.clamp(min=torch.finfo(gap.dtype).tiny), 0.5)
    return w_head * _kl(log_p, log_q) + (1.0 - w_head) * _kl(log_q, log_p)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": total_variation,
    "akl": adaptive_kl,
}
# The loss at temperature T is multiplied by T ** power: 2 where the gradient w.r.t. the student
# logits scales as 1/T^2 (smooth divergences), 1 for total variation (1/T). See the module docstring.
# AKL gets 2: its gradient is a convex combination of the forward and reverse KL gradients with
# constant (detached) weights, ratios of two gaps that are both first order in q - p.
TEMPERATURE_POWER: dict[str, int] = {name: 2 for name in DIVERGENCES} | {"tvd": 1}
# Divergences that treat the tail bucket (the last outcome of ``tail: bucket``) apart from the
# top-k outcomes; the loss tells them whether there is one.
READS_BUCKET = frozenset({"akl"})
if tuple(DIVERGENCES) != DIVERGENCE_NAMES:  # train.divergence is validated against the config's tuple
    raise RuntimeError(
        f"distill.train.losses.DIVERGENCES {tuple(DIVERGENCES)} differ from distill.train.config.DIVERGENCES "
        f"{DIVERGENCE_NAMES}: the config would accept a name no loss implements, or refuse one that exists"
    )


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How a step scores the student against sparse teacher labels, bound once.

    ``divergence``: a key of ``DIVERGENCES``; ``options``: that divergence's own keyword options
    (``beta`` for ``jsd``, ``alpha`` for the skew KLs, ``mu`` for ``akl``), checked against its
    signature here, so ``{"betta": 0.5}`` fails when the spec is built. ``tail``: ``renormalize`` or
    ``bucket`` (module docstring); ``temperature``: T; ``kd_weight``: the KD term's share of
    ``distillation_loss`` (the rest goes to cross-entropy).
    """

    divergence: str = "forward_kl"
    options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    tail: str = "renormalize"
    temperature: float = 1.0
    kd_weight: float = 0.5

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r}: expected one of {sorted(DIVERGENCES)}")
        if self.tail not in TAILS:
            raise ValueError(f"tail={self.tail!r}: expected one of {TAILS}")
        fn = DIVERGENCES[self.divergence]
        accepted = [name for name in list(inspect.signature(fn).parameters)[2:] if name != "bucket"]
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise TypeError(
                f"divergence {self.divergence!r} has no option {', '.join(map(repr, unknown))}: "
                f"it takes {accepted or 'none'}"
            )
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossSpec:
        """The spec of a ``train`` section: the divergence with the options it reads."""
        options = {
            "jsd": {"beta": cfg.beta},
            "skew_kl": {"alpha": cfg.alpha},
            "skew_reverse_kl": {"alpha": cfg.alpha},
            "akl": {"mu": cfg.akl_mu},
        }.get(cfg.divergence, {})
        return cls(cfg.divergence, options, cfg.tail, cfg.temperature, cfg.kd_weight)

    def per_position(self, bucket: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(log_p, log_q) -> (B, T)``: the divergence with its options; ``bucket``: the last
        outcome is the tail bucket."""
        flags = {"bucket": bucket} if self.divergence in READS_BUCKET else {}
        return functools.partial(DIVERGENCES[self.divergence], **self.options, **flags)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, denominator: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of ``values`` (B, T) over ``mask`` (B, T) divided by ``denominator`` (default: the
    mask's count); 0 when the mask is empty.

    The trainer passes the labelled-token count of the whole optimizer step (all micro-batches,
    all ranks), so every token weighs the same however the step is split (TRL's
    ``num_items_in_batch``)."""
    mask = mask.to(values.dtype)
    if denominator is None:
        denominator = mask.sum().clamp(min=1.0)
    return (values * mask).sum() / denominator


def kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec = LossSpec(),
    student_lse: torch.Tensor | None = None,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (see ``masked_mean``) per-position divergence ``spec.divergence`` between sparse teacher
    labels and the student, times ``T ** TEMPERATURE_POWER[divergence]`` (T^2; T for total
    variation). ``spec.kd_weight`` is not read here."""
    log_p, log_q = sparse_log_distributions(
        student_logits, teacher_ids, teacher_logprobs, spec.tail, spec.temperature, student_lse
    )
    # ``bucket``: the last outcome is the tail bucket (read by AKL, which counts it as tail); full labels have none
    per_position = spec.per_position(bucket=spec.tail == "bucket" and teacher_ids is not None)(log_p, log_q)  # (B, T)
    return masked_mean(per_position, mask, denominator) * spec.temperature ** TEMPERATURE_POWER[spec.divergence]


def cross_entropy(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    student_lse: torch.Tensor | None = None,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` (B, T) over ``mask``; 0 when nothing is labelled."""
    logits = student_logits.float()
    if student_lse is None:
        student_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    nll = (student_lse - logits.gather(-1, targets[..., None]))[..., 0]  # (B, T)
    return masked_mean(nll, mask, denominator)


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec = LossSpec(),
    num_tokens: float | torch.Tensor | None = None,
    kd_only: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kd_weight * KD + (1 - kd_weight) * CE`` per ``spec``; returns the loss and its detached parts.

    ``targets`` (B, T): the realized next tokens. Both terms are sums over the labelled positions
    divided by ``num_tokens`` (default: this batch's count; the trainer passes the count of the
    whole optimizer step).

    ``kd_only`` (B, T): labelled positions whose tokens the student wrote itself (on-policy
    answers): no ground truth to imitate, so they take no CE and the KD term takes the CE's
    weight there too (GKD's loss on student samples is the divergence alone).

    One ``logsumexp`` over the vocabulary serves both terms at T = 1, which keeps a KD step
    nearly as cheap as a CE-only step. ``kd_weight = 0`` skips the KD term entirely.
    ``teacher_ids=None``: ``teacher_logprobs`` (B, T, V) are the teacher's whole distribution (the
    trainer's online-teacher path), see ``sparse_log_distributions``.
    """
    logits = student_logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, T, 1)
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1).float()  # one denominator for every term
    supervised = mask if kd_only is None else mask & ~kd_only
    ce = cross_entropy(logits, targets, supervised, student_lse=lse, denominator=num_tokens)
    shared_lse = lse if spec.temperature == 1.0 else None

    def kd_over(positions):
        return kd_loss(logits, teacher_ids, teacher_logprobs, positions, spec, shared_lse, num_tokens)

    own = kd_over(mask & kd_only) if kd_only is not None and bool(kd_only.any()) else None
    if spec.kd_weight == 0.0:
        loss = ce if own is None else ce + own
        return loss, {"ce": ce.detach(), "kd": torch.zeros(()) if own is None else own.detach()}
    kd = kd_over(mask)
    loss = spec.kd_weight * kd + (1.0 - spec.kd_weight) * (ce if own is None else ce + own)
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


def feature_distance(predicted: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-position distance (...,) between the student's mapped hidden states and the teacher's
    stored features, both (..., dim), in float32 (``train.feature_loss``):

    - ``mse``: ``sum((pred - t)^2) / sum(t^2)``, the squared error relative to the teacher
      feature's own mean square: 1.0 for a prediction of zeros, the same for a layer of any scale
      (residual streams grow with depth). A zero target counts as a unit mean square.
    - ``cosine``: ``1 - cos(pred, t)``; a zero vector has cosine 0 with anything (a loss of 1)."""
    p, t = predicted.float(), target.float()
    if kind == "mse":
        norm = (t * t).sum(-1)
        return ((p - t) ** 2).sum(-1) / torch.where(norm > 0, norm, torch.ones_like(norm))
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=1e-8)
    raise ValueError(f"feature loss {kind!r} is unknown (mse or cosine)")


def candidate_log_distribution(
    scores: torch.Tensor, candidate_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-softmax of (B, C) candidate scores at temperature T over each example's valid
    candidates; padded entries get ~0 probability."""
    return torch.log_softmax(torch.where(candidate_mask.bool(), scores.float() / temperature, NEG), -1)


def candidate_kl(
    student_candidate_scores: torch.Tensor,
    teacher_candidate_logprobs: torch.Tensor,
    candidate_mask: torch.Tensor,
    temperature: float = 1.0,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher ‖ student) over each example's candidate answers (classification / multiple
    choice), averaged over examples; scaled by T² as in Hinton et al. (2015).

    ``student_candidate_scores`` (B, C): the student's score of each candidate (sum, or mean
    when length-normalized, of its token logprobs given the prompt); ``teacher_candidate_logprobs``
    (B, C): the teacher's normalized distribution over the candidates (log); ``candidate_mask``
    (B, C) bool, False for padding. The student's scores are normalized over the valid
    candidates with a softmax at temperature T, the teacher's distribution is re-tempered
    the same way. Examples with no valid candidate contribute nothing; all-masked gives 0.
    """
    valid = candidate_mask.bool()
    log_q = candidate_log_distribution(student_candidate_scores, valid, temperature)
    log_p = candidate_log_distribution(teacher_candidate_logprobs, valid, temperature)
    per_example = torch.where(valid, log_p.exp() * (log_p - log_q), 0.0).sum(-1)  # (B,)
    return masked_mean(per_example, valid.any(-1), denominator) * temperature**2


def candidate_scores(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, length_normalize: bool = False
) -> torch.Tensor:
    """Per example and candidate, the model's score of the candidate: the sum (or mean) of its
    token logprobs given the prompt.

    ``logits`` (N, T, V) over N prompt+candidate sequences; ``targets``/``mask`` (N, T) mark the
    candidate tokens (position t predicts token t + 1); ``index`` (B, C) maps each example's
    candidate to its sequence. Returns (B, C); padded entries (``index < 0``) hold 0.
    """
    logits = logits.float()
    token_lp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)
    m = mask.to(token_lp.dtype)
    sums = (token_lp * m).sum(-1)
    if length_normalize:
        sums = sums / m.sum(-1).clamp(min=1.0)
    return torch.where(index >= 0, sums[index.clamp(min=0)], 0.0)


def candidate_loss(
    student_scores: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    candidate_mask: torch.Tensor,
    answer: torch.Tensor,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    num_examples: float | torch.Tensor | None = None,
    num_gold: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kd_weight * candidate_kl + (1 - kd_weight) * CE(gold)`` over candidate answers.

    The KD term is divided by ``num_examples`` and the CE term by ``num_gold`` (examples with a
    gold answer) when given (the trainer passes the counts of the whole optimizer step).

    The CE term is the student's negative log-probability of the gold candidate (softmax over
    the example's candidates), averaged over examples that have one (``answer >= 0``).
    """
    log_q = candidate_log_distribution(student_scores, candidate_mask)
    has_gold = answer >= 0
    nll = -log_q.gather(-1, answer.clamp(min=0)[:, None])[:, 0]
    ce = masked_mean(nll, has_gold, num_gold)
    if kd_weight == 0.0:
        return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
    kd = candidate_kl(student_scores, teacher_logprobs, candidate_mask, temperature, num_examples)
    return kd_weight * kd + (1.0 - kd_weight) * ce, {"ce": ce.detach(), "kd": kd.detach()}


# --- students with another tokenizer (``distill.train.xtok`` aligns the positions) -------------------


def uld_distance(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al., 2024, "Towards Cross-Tokenizer Distillation:
    the Universal Logit Distillation Loss for LLMs", eq. 4): the L1 distance between the two
    distributions' probabilities sorted in decreasing order, which needs no vocabulary mapping
    (for sorted 1-D vectors it is the Wasserstein-1 distance the paper derives it from).

    From top-k labels: rank ``r`` of the teacher's stored top-k (``-inf`` slots are unknown and
    left out) against rank ``r`` of the student's distribution, plus the two tails (the rest of
    each distribution's mass) as one more rank: ``sum_r |q_(r) - p_(r)| + |tail_q - tail_p|``.
    By the triangle inequality this is at most the full-vocabulary distance, and equal to it
    when the ranks below k agree in total. Shapes: (B, T, V) and (B, T, K) -> (B, T).
    """
    p = teacher_logprobs.float().exp()  # -inf -> 0
    valid = torch.isfinite(teacher_logprobs)
    q = torch.softmax(student_logits.float(), dim=-1).topk(teacher_logprobs.shape[-1], dim=-1).values
    q = torch.where(valid, q, 0.0)
    tail_p = (1.0 - p.double().sum(-1)).clamp(min=0.0).float()
    tail_q = (1.0 - q.sum(-1)).clamp(min=0.0)
    return (q - p).abs().sum(-1) + (tail_q - tail_p).abs()


SPAN_KL = LossSpec("forward_kl", tail="bucket")  # span_kl's KD term: matched ids plus one bucket


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    kd_weight: float = 0.5,
    loss: str = "uld",
    num_tokens: float | torch.Tensor | None = None,
    num_aligned: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kd_weight * KD + (1 - kd_weight) * CE`` for a student whose tokenizer is not the teacher's
    (a ``distill.train.xtok.collate_cross`` batch). CE covers the student's tokens of the labelled span
    (divided by ``num_tokens``); KD the aligned positions (divided by ``num_aligned``):

    - ``uld``: ``uld_distance`` between the teacher's stored top-k and the student's distribution;
    - ``span_kl``: forward KL over the teacher's top-k ids that the student's vocabulary holds
      exactly (same bytes), mapped to the student's ids, with the rest of each distribution
      (unmatched ids and the tail) as one bucket: the exact-match half of TRL's GOLD loss.
    """
    if loss not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {CROSS_TOKENIZER_LOSSES}")
    logits = student_logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    ce = cross_entropy(logits, batch["targets"], batch["mask"], student_lse=lse, denominator=num_tokens)
    if kd_weight == 0.0:
        return ce, {"ce": ce.detach(), "kd": torch.zeros(())}
    kd_mask = batch["kd_mask"]
    if loss == "uld":
        kd = masked_mean(uld_distance(logits, batch["teacher_logprobs"]), kd_mask, num_aligned)
    else:
        kd = kd_loss(logits, batch["teacher_ids"], batch["matched_logprobs"], kd_mask, SPAN_KL, lse, num_aligned)
    return kd_weight * kd + (1.0 - kd_weight) * ce, {"ce": ce.detach(), "kd": kd.detach()}
