"""Compact, faithful encodings of soft labels (pure numpy functions), used by the label kinds
(``storage.kinds``).

- Top-k logprobs: each position's values relative to its top-1, ``d_i = lp_0 - lp_i >= 0``,
  quantized on a companded scale ``c = round(A * (1 - exp(-d / B)))`` (fine steps where the
  probability is high, coarse ones in the far tail, where errors cost almost no KL), then
  stored as differences along rank (non-negative, small, so they compress well). The absolute
  level is restored from the stored tail mass, so the decoded top-k carry exactly ``1 - tail``.
  Slots past a position's last id hold ``-inf`` (teacher ensembles: the union of the members'
  ids varies in size per position); they take code ``levels + 1`` and decode to ``-inf``.
- Realized-token logprob: uint16 steps of 2^-10 nats (error <= 4.9e-4, floor -64 nats).
- Tail mass ``t`` (1 - top-k mass): uint16 codes of its log-odds ``x = log(t) - log(1 - t)`` in
  steps of ``h = 2^-9`` from -96 to 32, plus exact codes for 0 (code 0) and 1 (code 65535).
  Since ``d log t / dx = 1 - t`` and ``d log(1 - t) / dx = -t``, the half-step rounding of x
  moves ``log t`` and ``log(1 - t)`` by at most ``h / 2``: the relative error of the tail AND
  of the top-k mass ``1 - t`` is at most ``expm1(2^-10) = 9.77e-4``; with the float64 rounding
  of ``1 - t`` in the decoded value, at most ``TAIL_MAX_REL_ERROR = 9.8e-4`` for t from 2e-42
  to ``1 - 1e-10`` (further out, t is clipped to the end codes). The absolute error is at most
  ``t (1 - t) h / 2 <= 2.4e-4``. Both ends matter: small tails are what reverse KL with
  ``tail: bucket`` compares the student's tail against at confident positions, and the top-k
  decoder sets the top-k level from ``1 - t``.
- Teacher features (``teacher.features``, hidden states projected to ``dim``): per position and
  layer a float32 scale ``max|x| / 127`` and ``dim`` int8 codes ``round(x / scale)``, made on the
  engine's device (``distill.teacher.features.quantize``): every value within half a step
  (``scale / 2``) of the original, ``dim + 4`` bytes per position and layer.
- Top-k ids: remapped by their frequency in the shard (frequent candidates get small
  numbers), which makes the high bytes nearly constant under byte-stream-split + zstd.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

LOGPROB_LEVELS = 47
LOGPROB_SCALE = 3.0
TARGET_STEP = 2.0**-10
TAIL_LOGIT_MIN = -96.0  # log-odds of code 1; code 65534 is -96 + 65533 * 2^-9 = 31.998
TAIL_LOGIT_STEP = 2.0**-9
TAIL_CODE_ONE = 65535  # code 0 is a tail of exactly 0, code 65535 exactly 1
TAIL_MAX_REL_ERROR = (
    9.8e-4  # of t and of 1 - t, for t in [2e-42, 1 - 1e-10]: expm1(TAIL_LOGIT_STEP / 2) = 9.77e-4 + rounding
)
MIN_TOPK_MASS = 1e-7


def encode_topk_logprobs(
    topk_logprobs: np.ndarray, levels: int = LOGPROB_LEVELS, scale: float = LOGPROB_SCALE
) -> np.ndarray:
    """(n, k) logprobs sorted descending -> (n, k) uint8 rank-differences of companded codes.
    Trailing ``-inf`` slots (padding; the first slot is finite) take the code ``levels + 1``."""
    lp = np.asarray(topk_logprobs, np.float64)
    pad = np.isneginf(lp)
    d = np.maximum(lp[:, :1] - lp, 0.0)
    with np.errstate(invalid="ignore"):
        codes = np.rint(levels * -np.expm1(-d / scale))
    codes = np.where(pad, levels + 1, np.clip(codes, 0, levels)).astype(np.int16)
    codes = np.maximum.accumulate(codes, axis=1)
    diffs = np.diff(codes, axis=1, prepend=0)
    return diffs.astype(np.uint8)


def decode_topk_logprobs(
    diffs: np.ndarray, tail_mass: np.ndarray, levels: int = LOGPROB_LEVELS, scale: float = LOGPROB_SCALE
) -> np.ndarray:
    """Inverse of ``encode_topk_logprobs``: (n, k) float32 logprobs whose mass is ``1 - tail_mass``
    (``-inf`` in padding slots, code ``levels + 1``)."""
    codes = np.cumsum(diffs, axis=1, dtype=np.int32)
    u = np.minimum(codes / levels, 1.0 - 0.5 / levels)
    rel = np.where(codes > levels, -np.inf, scale * np.log1p(-u))  # -d, <= 0
    top = np.log(np.maximum(1.0 - np.asarray(tail_mass, np.float64), MIN_TOPK_MASS))
    norm = np.log(np.exp(rel).sum(axis=1))
    return (rel + (top - norm)[:, None]).astype(np.float32)


def encode_target(target_logprobs: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(-np.asarray(target_logprobs, np.float64) / TARGET_STEP), 0, 65535).astype(np.uint16)


def decode_target(codes: np.ndarray) -> np.ndarray:
    return (-codes.astype(np.float64) * TARGET_STEP).astype(np.float32)


def encode_tail(tail_mass: np.ndarray) -> np.ndarray:
    """(n,) tail masses in [0, 1] -> (n,) uint16 log-odds codes (0 and 1 exact; see the module docstring)."""
    t = np.clip(np.asarray(tail_mass, np.float64), 0.0, 1.0)
    if np.isnan(t).any():
        raise ValueError("tail_mass holds NaN: the teacher's top-k logprobs are not finite; relabel")
    with np.errstate(divide="ignore"):
        log_odds = np.log(t) - np.log1p(-t)  # -inf at 0, +inf at 1: replaced below
    codes = np.clip(np.rint((log_odds - TAIL_LOGIT_MIN) / TAIL_LOGIT_STEP), 0, TAIL_CODE_ONE - 2) + 1
    return np.where(t == 0.0, 0, np.where(t == 1.0, TAIL_CODE_ONE, codes)).astype(np.uint16)


def decode_tail(
    codes: np.ndarray, logit_min: float = TAIL_LOGIT_MIN, logit_step: float = TAIL_LOGIT_STEP
) -> np.ndarray:
    """Inverse of ``encode_tail``: float64, so that ``1 - tail`` keeps its precision near 1."""
    codes = np.asarray(codes)
    log_odds = logit_min + (codes.astype(np.float64) - 1.0) * logit_step
    tail = 1.0 / (1.0 + np.exp(-log_odds))
    return np.where(codes == 0, 0.0, np.where(codes == TAIL_CODE_ONE, 1.0, tail))


def id_table(counts: np.ndarray) -> np.ndarray:
    """Ids that occur (``counts > 0``), most frequent first, ties by id: remapped id r is ``table[r]``."""
    present = np.nonzero(counts)[0]
    order = np.lexsort((present, -counts[present]))
    return present[order].astype(np.int64)


def remap_ids(ids: np.ndarray, table: np.ndarray, vocab_size: int) -> np.ndarray:
    lookup = np.full(vocab_size, -1, np.int64)
    lookup[table] = np.arange(len(table))
    out = lookup[ids]
    if (out < 0).any():
        raise ValueError("an id is missing from the shard's id table")
    return out


def pack_table(table: np.ndarray, vocab_size: int) -> bytes:
    """zstd-compressed id table, uint16 for vocabularies up to 65,536 ids, else uint32."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    return pa.compress(np.asarray(table, dtype).tobytes(), codec="zstd", asbytes=True)


def unpack_table(packed: bytes, count: int, vocab_size: int) -> np.ndarray:
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    raw = pa.decompress(packed, decompressed_size=count * np.dtype(dtype).itemsize, codec="zstd", asbytes=True)
    return np.frombuffer(raw, dtype).astype(np.int64)


FEATURE_LEVELS = 127  # int8 codes -127..127: symmetric, so a zero stays zero


def decode_features(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Features from their scales (...) and int8 codes (..., d): float32, within ``scale / 2`` of
    what was quantized."""
    return np.asarray(codes, np.float32) * np.asarray(scales, np.float32)[..., None]
