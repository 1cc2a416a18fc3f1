"""Candidate distributions (``teacher.mode: candidates``): per example, the teacher's normalized
log-distribution over the example's candidate answers (log-softmax of each candidate's summed,
or mean, token logprob), beside the prompt, the candidates (text and ids) and the gold index
(-1: none). No per-token labels: a row is one labelled example (the ``examples`` layout).

Stored plain (rows are small): every column as written. Training compares the student's own
candidate distribution with the teacher's by forward KL (``distill.train.losses.candidate_kl``),
so that is the one divergence these labels accept.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa

from storage.kinds.base import EXAMPLES, LabelKind, LossRules, id_type


class Candidates(LabelKind):
    name = "candidates"
    layout = EXAMPLES
    params = ()
    rules = LossRules(
        divergences=("forward_kl",),
        why="candidates labels train by forward KL between the student's and the teacher's candidate distributions",
    )

    def describe(self, params: Mapping) -> str:
        return "the teacher's distribution over each example's candidate answers"

    def stored_fields(self, vocab_size: int) -> list[pa.Field]:
        ids = id_type(vocab_size)
        return [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("prompt_text", pa.string(), nullable=False),
            pa.field("prompt_ids", pa.list_(ids), nullable=False),
            pa.field("candidates", pa.list_(pa.string()), nullable=False),
            pa.field("candidate_ids", pa.list_(pa.list_(ids)), nullable=False),
            pa.field("answer", pa.int32(), nullable=False),  # gold index, -1 when unknown
            pa.field("candidate_scores", pa.list_(pa.float32()), nullable=False),  # sum (or mean) token logprob
            pa.field("teacher_logprobs", pa.list_(pa.float32()), nullable=False),  # log-softmax of the scores
        ]

    decoded_fields = stored_fields

    def check_row(self, row: Mapping, params: Mapping, vocab_size: int, where: str) -> int:
        c = len(row["candidates"])
        if (
            c < 2
            or len(row["candidate_ids"]) != c
            or len(row["candidate_scores"]) != c
            or len(row["teacher_logprobs"]) != c
        ):
            raise ValueError(f"{where}: needs >= 2 candidates with one id list, score and logprob each (got {c})")
        if not -1 <= int(row["answer"]) < c:
            raise ValueError(f"{where}: answer {row['answer']} is not -1 or an index into {c} candidates")
        lp = np.asarray(row["teacher_logprobs"], np.float64)
        if not np.isfinite(lp).all() or abs(np.exp(lp).sum() - 1.0) > 1e-3:
            raise ValueError(f"{where}: teacher_logprobs must be a finite normalized log-distribution")
        return 1

    def encode(self, raw: pa.Table, params: Mapping, table: np.ndarray, vocab_size: int) -> dict[str, pa.Array]:
        stored = raw.cast(pa.schema(self.stored_fields(vocab_size)))
        return {name: stored.column(name) for name in stored.column_names}

    def rows(self, stored: pa.Table) -> list[dict]:
        """Decoded examples of one stored row group (``ValueError`` when inconsistent)."""
        rows = stored.to_pylist()
        for row in rows:
            c = len(row["candidates"])
            if (
                c < 2
                or len(row["candidate_ids"]) != c
                or len(row["teacher_logprobs"]) != c
                or not -1 <= row["answer"] < c
            ):
                raise ValueError(
                    f"example {row['doc_id']}: candidate columns disagree in length or answer out of range"
                )
            row["teacher_logprobs"] = np.asarray(row["teacher_logprobs"], np.float32)
            row["candidate_scores"] = np.asarray(row["candidate_scores"], np.float32)
        return rows

    def stats(self, groups: Iterable, params: Mapping) -> dict:
        rows = unnormalized = 0
        max_logprob = -np.inf
        for group in groups:
            for row in group:
                rows += 1
                lp = row["teacher_logprobs"].astype(np.float64)
                max_logprob = max(max_logprob, float(lp.max()))
                unnormalized += abs(np.exp(lp).sum() - 1.0) > 1e-3
        return {
            "rows": rows,
            "tokens": rows,  # labelled examples
            "mean_topk_mass": 1.0 if rows else float("nan"),  # the distribution covers every candidate
            "max_logprob": max_logprob,
            "problems": [f"{unnormalized} examples' teacher_logprobs do not sum to 1"] if unnormalized else [],
        }


KIND = Candidates()
