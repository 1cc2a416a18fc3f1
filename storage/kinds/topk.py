"""Top-k labels (``teacher.labels: topk``): the teacher's k most probable ids at every labelled
position with their logprobs under its full distribution, and its tail, the probability of
every other id (``rest_mass``).

Stored columns: ``topk_ids`` (ids renumbered by the shard's id table), ``topk_logprob_codes``
(companded rank differences, ``storage.codec.encode_topk_logprobs``; the absolute level is
restored from the tail, so the decoded top-k carry exactly ``1 - tail``), ``target_logprob_codes``
and ``tail_mass_codes`` (log-odds codes, ``storage.codec.encode_tail``). Every divergence, tail
mode and temperature accepts them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa

from storage import codec
from storage.kinds.base import (
    PositionKind,
    check_sorted_logprobs,
    decode_target,
    encode_target,
    flat,
    id_type,
    list_column,
    remapped_ids,
    stored_ids,
    target_field,
)


class TopK(PositionKind):
    name = "topk"
    params = ("k",)
    ids_column, codes_column, rest_column = "topk_ids", "topk_logprob_codes", "tail_mass_codes"

    def __init__(self):
        self.byte_stream_split = (self.ids_column, self.rest_column)

    def slots(self, params: Mapping) -> int:
        return int(params["k"])

    def describe(self, params: Mapping) -> str:
        return f"top-{params['k']} logprobs and the tail mass"

    def teacher_k(self, params: Mapping) -> int:
        return int(params["k"])

    def from_teacher(self, labels: Mapping, params: Mapping, doc_id: str, window_index: int) -> dict:
        return {
            "teacher_ids": np.asarray(labels["topk_ids"]).reshape(-1),
            "teacher_logprobs": np.asarray(labels["topk_logprobs"]).reshape(-1),
            "target_logprobs": labels["target_logprobs"],
            "rest_mass": labels["tail_mass"],
        }

    def stored_fields(self, vocab_size: int) -> list[pa.Field]:
        return [
            pa.field(self.ids_column, pa.list_(id_type(vocab_size)), nullable=False),
            pa.field(self.codes_column, pa.list_(pa.uint8()), nullable=False),
            target_field(),
            pa.field(self.rest_column, pa.list_(pa.uint16()), nullable=False),
        ]

    def encoding(self, params: Mapping) -> dict:
        return {
            "logprob_levels": codec.LOGPROB_LEVELS,
            "logprob_scale": codec.LOGPROB_SCALE,
            "target_step": codec.TARGET_STEP,
            "tail_logit_min": codec.TAIL_LOGIT_MIN,
            "tail_logit_step": codec.TAIL_LOGIT_STEP,
        }

    def check_values(self, logprobs: np.ndarray, rest_mass: np.ndarray, params: Mapping, where: str) -> None:
        check_sorted_logprobs(logprobs, where)

    def encode(self, raw: pa.Table, params: Mapping, table: np.ndarray, vocab_size: int) -> dict[str, pa.Array]:
        lps = raw.column("teacher_logprobs").combine_chunks()
        rest = raw.column("rest_mass").combine_chunks()
        n = len(rest.values)
        codes = codec.encode_topk_logprobs(lps.values.to_numpy().reshape(n, self.slots(params))).reshape(-1)
        return {
            self.ids_column: remapped_ids(raw, table, vocab_size),
            self.codes_column: list_column(lps.offsets, codes, pa.uint8()),
            "target_logprob_codes": encode_target(raw),
            self.rest_column: list_column(rest.offsets, codec.encode_tail(rest.values.to_numpy()), pa.uint16()),
        }

    def decode(
        self, stored: pa.Table, params: Mapping, encoding: Mapping, table: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        k = self.slots(params)
        ids, id_offsets = stored_ids(stored, self.ids_column, table)
        diffs, lp_offsets = flat(stored, self.codes_column)
        rest_codes, pos_offsets = flat(stored, self.rest_column)
        target, _ = decode_target(stored)
        n = len(rest_codes)
        if ids.size != n * k or diffs.size != n * k or target.size != n:
            raise ValueError(
                f"label columns disagree in length ({ids.size}, {diffs.size}, {target.size} for {n} positions, "
                f"{self.name} slots={k})"
            )
        rest = codec.decode_tail(rest_codes, encoding["tail_logit_min"], encoding["tail_logit_step"])
        levels = encoding["logprob_levels"]
        codes_total = np.cumsum(diffs.reshape(n, k), axis=1, dtype=np.int32)
        if n and (int(codes_total[:, -1].max()) > levels + 1 or int(codes_total[:, 0].max()) > levels):
            raise ValueError(f"{self.codes_column} exceed the encoding's levels (corrupt or not sorted)")
        logprobs = codec.decode_topk_logprobs(diffs.reshape(n, k), rest, levels, encoding["logprob_scale"])
        return {
            "teacher_ids": (ids, id_offsets),
            "teacher_logprobs": (logprobs.reshape(-1), lp_offsets),
            "target_logprobs": (target, pos_offsets),
            "rest_mass": (rest, pos_offsets),
        }


KIND = TopK()
