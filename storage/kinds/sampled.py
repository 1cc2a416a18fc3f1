"""Sampled labels (``teacher.labels: sampled``): at every labelled position, ``draws`` ids drawn
with replacement from the teacher's distribution, stored as the distinct drawn ids with their
draw counts. The device labeller draws from the whole vocabulary (``proposal_k`` 0 in the
shard's parameters): ``count / draws`` has expectation ``p`` on every id and ``rest_mass`` is 0.
The host sampler (``sample``, ``teacher.engine.labeller: logprobs``) draws from the top-
``proposal_k`` plus the tail as one more outcome: the expectation is ``p`` on every id of the
proposal, and ``rest_mass`` is the share of draws that fell in the tail.

Stored columns: ``draw_ids`` (the distinct drawn ids, most drawn first, renumbered by the
shard's id table; unused slots repeat the first id), ``draw_counts`` (uint8, exact; 0 in unused
slots) and ``target_logprob_codes``. Decoded, ``teacher_logprobs = log(count / draws)``
(``-inf`` for unused slots) and ``rest_mass = 1 - sum(count) / draws``, both exact.

Why only forward KL with ``tail: bucket`` at temperature 1 (``rules``): the targets equal the
teacher's probabilities in expectation, so a loss *linear* in the target is unbiased on them:
forward KL's gradient is ``-sum_v p(v) grad log q(v)``. Every other divergence is nonlinear in
the target (reverse KL, JSD and the skew divergences take its log or mix it inside one; TVD
takes ``|p - q|``; AKL splits head and tail by the target's own cumulative mass), and so are a
renormalized top (a ratio of the draws) and a temperature (a power of them). With
``tail: bucket`` the teacher's bucket is the share of draws beyond the proposal (about 0) while
the student's bucket holds all its mass outside the *drawn* ids: forward KL weighs that bucket
by the teacher's (near-zero) side, every other loss lets it pull the student onto the drawn
ids. A student with its own tokenizer regroups the drawn ids into spans and a bucket that again
depends on which ids were drawn.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import pyarrow as pa

from storage import codec
from storage.kinds.base import (
    LossRules,
    PositionKind,
    decode_target,
    encode_target,
    flat,
    id_type,
    list_column,
    remapped_ids,
    stored_ids,
    target_field,
)

SAMPLERS = ("systematic", "multinomial")
MAX_DRAWS = 255  # counts are stored as uint8


def sample(labels: Mapping, draws: int, rng: np.random.Generator, sampler: str = "systematic") -> dict:
    """Sampled labels from one row's top-K' labels (``topk_ids``/``topk_logprobs`` (n, K'),
    ``tail_mass`` (n,)): ``draws`` ids drawn with replacement at every position from the
    teacher's top-K' probabilities plus the tail as one more outcome, by ``sampler``:
    ``systematic`` (one uniform offset per position, points ``(u + i) / draws`` on the
    cumulative distribution: every outcome gets the floor or ceiling of ``draws * p``) or
    ``multinomial`` (independent draws).

    Returns ``teacher_ids``/``teacher_logprobs`` (n, draws): the distinct drawn ids, most drawn
    first (ties in the teacher's order), with ``log(count / draws)``; unused slots repeat the
    first id with ``-inf``. ``rest_mass`` is the share of draws that fell in the tail; the
    realized-token logprob is kept.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
    ids = np.asarray(labels["topk_ids"]).reshape(len(labels["tail_mass"]), -1)
    n = len(ids)
    probs = np.exp(np.asarray(labels["topk_logprobs"], np.float64).reshape(n, -1))
    outcomes = np.concatenate([probs, np.clip(np.asarray(labels["tail_mass"], np.float64), 0, 1)[:, None]], axis=1)
    outcomes /= outcomes.sum(axis=1, keepdims=True)
    if sampler == "multinomial":
        counts = rng.multinomial(draws, outcomes) if n else np.zeros((0, ids.shape[1] + 1), np.int64)
    else:
        # points (u + i) / draws, i = 0 .. draws-1, on the cumulative distribution; the points
        # below c number ceil(c * draws - u), whose mean over u is c * draws: unbiased per outcome
        cdf = np.cumsum(outcomes, axis=1)
        cdf[:, -1] = 1.0
        below = np.ceil(cdf * draws - rng.random((n, 1))).clip(0, draws).astype(np.int64)
        counts = np.diff(below, axis=1, prepend=0)
    # the counts add up to draws, so at most draws ids were drawn: keeping draws slots loses none
    order = np.argsort(-counts[:, :-1], axis=1, kind="stable")[:, :draws]
    top = np.take_along_axis(counts[:, :-1], order, axis=1)
    drawn = np.take_along_axis(ids, order, axis=1)
    if top.shape[1] < draws:  # a proposal smaller than the draws: the slots beyond it stay unused
        top = np.pad(top, ((0, 0), (0, draws - top.shape[1])))
        drawn = np.pad(drawn, ((0, 0), (0, draws - drawn.shape[1])), mode="edge")
    drawn = np.where(top > 0, drawn, drawn[:, :1])
    with np.errstate(divide="ignore"):
        logprobs = np.log(top / draws)
    return {
        "teacher_ids": drawn.astype(np.int64),
        "teacher_logprobs": logprobs.astype(np.float32),
        "target_logprobs": np.asarray(labels["target_logprobs"]),
        "rest_mass": (counts[:, -1] / draws).astype(np.float32),
    }


def row_rng(seed: int, doc_id: str, window_index: int) -> np.random.Generator:
    """The sampler's generator for one row: the same draws whatever shard or batch it is in."""
    doc = int.from_bytes(hashlib.sha256(f"0\x1f{doc_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF
    return np.random.default_rng([seed, doc, int(window_index)])


def counts_of(logprobs: np.ndarray, draws: int) -> np.ndarray:
    """(n, draws) ``log(count / draws)`` (``-inf`` for unused slots) -> float64 counts (not rounded)."""
    return np.exp(np.asarray(logprobs, np.float64)) * draws


class Sampled(PositionKind):
    name = "sampled"
    params = ("draws", "proposal_k", "sampler", "seed")
    rules = LossRules(
        divergences=("forward_kl",),
        tails=("bucket",),
        temperatures=(1.0,),
        own_tokenizer=False,
        why=(
            "sampled labels are an unbiased target only for forward KL with tail: bucket at temperature 1 "
            "(other losses are nonlinear in the drawn counts and pull the student onto the drawn ids; a student "
            "with its own tokenizer regroups the drawn ids into spans)"
        ),
    )
    byte_stream_split = ("draw_ids",)

    def check_params(self, params: Mapping) -> None:
        super().check_params(params)
        if not 1 <= int(params["draws"]) <= MAX_DRAWS or params["sampler"] not in SAMPLERS:
            raise ValueError(
                f"sampled labels take 1 <= draws <= {MAX_DRAWS} and a sampler in {SAMPLERS}, got {dict(params)}"
            )

    def slots(self, params: Mapping) -> int:
        return int(params["draws"])

    def describe(self, params: Mapping) -> str:
        source = (
            f"top-{params['proposal_k']} + tail" if int(params["proposal_k"]) else "whole vocabulary, on the device"
        )
        return f"sampled ids with counts ({params['draws']} {params['sampler']} draws per position from the {source})"

    def teacher_k(self, params: Mapping) -> int:
        return int(params["proposal_k"]) or 1  # 0: drawn on the device, which returns only the top id besides

    def engine_request(self, params: Mapping) -> dict:
        if int(params["proposal_k"]):
            return super().engine_request(params)
        return {"k": 1, "draws": int(params["draws"])}

    def row_seed(self, params: Mapping, doc_id: str, window_index: int) -> int:
        return int(row_rng(int(params["seed"]), doc_id, window_index).integers(2**62))

    def from_teacher(self, labels: Mapping, params: Mapping, doc_id: str, window_index: int) -> dict:
        if "draw_ids" in labels:  # drawn by the device labeller from the whole vocabulary: nothing in a tail
            counts = np.asarray(labels["draw_counts"])
            with np.errstate(divide="ignore"):
                logprobs = np.log(counts / int(params["draws"])).astype(np.float32)
            return {
                "teacher_ids": np.asarray(labels["draw_ids"], np.int64).reshape(-1),
                "teacher_logprobs": logprobs.reshape(-1),
                "target_logprobs": np.asarray(labels["target_logprobs"]),
                "rest_mass": np.zeros(len(counts), np.float32),
            }
        rng = row_rng(int(params["seed"]), doc_id, window_index)
        out = sample(labels, int(params["draws"]), rng, params["sampler"])
        return {
            **out,
            "teacher_ids": out["teacher_ids"].reshape(-1),
            "teacher_logprobs": out["teacher_logprobs"].reshape(-1),
        }

    def stored_fields(self, vocab_size: int) -> list[pa.Field]:
        return [
            pa.field("draw_ids", pa.list_(id_type(vocab_size)), nullable=False),
            pa.field("draw_counts", pa.list_(pa.uint8()), nullable=False),
            target_field(),
        ]

    def encoding(self, params: Mapping) -> dict:
        return {"target_step": codec.TARGET_STEP}

    def check_values(self, logprobs: np.ndarray, rest_mass: np.ndarray, params: Mapping, where: str) -> None:
        draws = self.slots(params)
        counts = counts_of(logprobs, draws)
        whole = np.rint(counts)
        if (
            np.abs(counts - whole).max() > 1e-3
            or (whole.sum(axis=1) > draws).any()
            or (np.diff(counts, axis=1) > 1e-3).any()
        ):
            raise ValueError(
                f"{where}: sampled teacher_logprobs must be log(count / {draws}) of at most {draws} draws, "
                "most drawn first"
            )
        if np.abs(rest_mass - (1 - whole.sum(axis=1) / draws)).max() > 1e-6:
            raise ValueError(f"{where}: sampled rest_mass must be the share of the {draws} draws not on teacher_ids")

    def encode(self, raw: pa.Table, params: Mapping, table: np.ndarray, vocab_size: int) -> dict[str, pa.Array]:
        lps = raw.column("teacher_logprobs").combine_chunks()
        counts = np.rint(counts_of(lps.values.to_numpy(), self.slots(params))).astype(np.uint8)
        return {
            "draw_ids": remapped_ids(raw, table, vocab_size),
            "draw_counts": list_column(lps.offsets, counts, pa.uint8()),
            "target_logprob_codes": encode_target(raw),
        }

    def decode(
        self, stored: pa.Table, params: Mapping, encoding: Mapping, table: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        draws = self.slots(params)
        ids, id_offsets = stored_ids(stored, "draw_ids", table)
        counts, count_offsets = flat(stored, "draw_counts")
        target, pos_offsets = decode_target(stored)
        n = target.size
        if ids.size != n * draws or counts.size != n * draws:
            raise ValueError(
                f"label columns disagree in length ({ids.size}, {counts.size} for {n} positions, draws={draws})"
            )
        counts = counts.reshape(n, draws).astype(np.int64)
        drawn = counts.sum(axis=1)
        if n and int(drawn.max()) > draws:
            raise ValueError(f"draw_counts hold more than {draws} draws at a position (corrupt)")
        with np.errstate(divide="ignore"):
            logprobs = np.log(counts / draws).astype(np.float32)
        return {
            "teacher_ids": (ids, id_offsets),
            "teacher_logprobs": (logprobs.reshape(-1), count_offsets),
            "target_logprobs": (target, pos_offsets),
            "rest_mass": (1.0 - drawn / draws, pos_offsets),
        }


KIND = Sampled()
