"""Ensemble mixtures (``teacher.models``): the weighted mixture of several teachers' top-k
labels of the same positions, over the union of their ids.

The mixture is exact for what the members' shards hold. Member ``i`` stores its top-k
probabilities ``p_i(v)`` for ``v`` in its ids ``S_i`` and its tail ``t_i = 1 - sum_{S_i} p_i``.
The target over the union ``U`` of the members' ids is

    q(v) = sum_i w_i p_i(v) [v in S_i]        rest_mass = sum_i w_i t_i

with weights ``w`` normalized to 1, so ``sum_U q + rest_mass = 1``. An id member ``i`` did not
store contributes nothing from ``i`` to its own slot: that member's probability of it is part of
``t_i`` (it is at most ``i``'s k-th probability, and where it went is unknown), so it stays in
the rest, which ``train.tail: bucket`` compares as one outcome. The realized token's logprob is
``log sum_i w_i p_i(x)``, exact from each member's stored value.

Stored as top-k labels are (``storage.kinds.topk``), ``k x members`` slots per position (the
union varies in size: unused slots hold ``-inf`` and take the codec's padding code), in columns
named for what they hold: ``mixture_ids``, ``mixture_logprob_codes``, ``target_logprob_codes``,
``rest_mass_codes``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from storage.kinds.topk import TopK


def mix(members: Sequence[Mapping], weights: Sequence[float]) -> dict:
    """The weighted mixture of ``members``' labels of the same positions.

    Each member: ``teacher_ids``/``teacher_logprobs`` (n, k_i) (``-inf`` slots are padding),
    ``target_logprobs`` (n,), ``rest_mass`` (n,). Returns the same keys with width
    ``sum(k_i)``: each position's distinct ids, most probable first (ties by id), then padding
    (the first id again, ``-inf``).
    """
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    n = len(members[0]["rest_mass"])
    ids = np.concatenate([np.asarray(m["teacher_ids"], np.int64).reshape(n, -1) for m in members], axis=1)
    probs = np.concatenate(
        [wi * np.exp(np.asarray(m["teacher_logprobs"], np.float64).reshape(n, -1)) for wi, m in zip(w, members)],
        axis=1,
    )
    width = ids.shape[1]
    live = probs > 0  # padding slots (-inf) hold no mass and no id
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[live]
    # one entry per (position, id): sum the members' shares of the same id
    base = int(ids.max(initial=0)) + 1
    keys, inverse = np.unique(rows * base + ids[live], return_inverse=True)
    mass = np.bincount(inverse.reshape(-1), weights=probs[live], minlength=len(keys))
    key_rows, key_ids = np.divmod(keys, base)
    order = np.lexsort((key_ids, -mass, key_rows))
    key_rows, key_ids, mass = key_rows[order], key_ids[order], mass[order]
    starts = np.searchsorted(key_rows, np.arange(n))
    slot = np.arange(len(key_rows)) - starts[key_rows]
    out_ids = np.zeros((n, width), np.int64)
    out_lp = np.full((n, width), -np.inf, np.float64)
    out_ids[key_rows, slot] = key_ids
    with np.errstate(divide="ignore"):
        out_lp[key_rows, slot] = np.log(mass)
    out_ids = np.where(np.isneginf(out_lp), out_ids[:, :1], out_ids)
    rest = sum(wi * np.asarray(m["rest_mass"], np.float64) for wi, m in zip(w, members))
    target = np.log(sum(wi * np.exp(np.asarray(m["target_logprobs"], np.float64)) for wi, m in zip(w, members)))
    return {
        "teacher_ids": out_ids,
        "teacher_logprobs": out_lp.astype(np.float32),
        "rest_mass": np.clip(rest, 0.0, 1.0).astype(np.float32),
        "target_logprobs": target.astype(np.float32),
    }


class Mixture(TopK):
    name = "mixture"
    params = ("k", "members")
    ids_column, codes_column, rest_column = "mixture_ids", "mixture_logprob_codes", "rest_mass_codes"

    def slots(self, params: Mapping) -> int:
        return int(params["k"]) * int(params["members"])

    def describe(self, params: Mapping) -> str:
        return (
            f"the mixture of {params['members']} teachers' top-{params['k']} logprobs (their union, up to "
            f"{self.slots(params)} ids per position) and the rest mass"
        )

    def teacher_k(self, params: Mapping) -> int:
        raise ValueError("mixture labels are mixed from the members' shards (distill.teacher.ensemble), not labelled")

    def from_teacher(self, labels: Mapping, params: Mapping, doc_id: str, window_index: int) -> dict:
        raise ValueError("mixture labels are mixed from the members' shards (distill.teacher.ensemble), not labelled")


KIND = Mixture()
