"""The label kinds, registered in one table: a shard's ``ShardMeta.kind`` is a key of ``KINDS``.

Each kind is one module saying how its labels are checked and encoded when written, decoded
and validated when read, laid out for batching, which losses accept them, and how reports name
them (the interface: ``storage.kinds.base.LabelKind``):

- ``topk`` (``storage.kinds.topk``): the teacher's top-k logprobs and its tail mass.
- ``sampled`` (``storage.kinds.sampled``): ids drawn from the teacher's distribution, with counts.
- ``mixture`` (``storage.kinds.mixture``): an ensemble's mixture of its members' top-k.
- ``candidates`` (``storage.kinds.candidates``): the teacher's distribution over candidate answers.

A new kind is one more module and one more entry here. ``storage.kinds.features`` is a companion
kind: teacher hidden states stored beside a ``positions`` kind's labels (``ShardMeta.features``).
"""

from __future__ import annotations

from storage.kinds import candidates, features, mixture, sampled, topk
from storage.kinds.base import EXAMPLES, POSITIONS, LabelKind, LossRules

KINDS: dict[str, LabelKind] = {kind.name: kind for kind in (topk.KIND, sampled.KIND, mixture.KIND, candidates.KIND)}

__all__ = ["EXAMPLES", "KINDS", "POSITIONS", "LabelKind", "LossRules", "features", "kind_of"]


def kind_of(name: str) -> LabelKind:
    """The registered kind ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"label kind {name!r} is unknown to this code (known: {sorted(KINDS)})") from None
