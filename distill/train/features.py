"""Feature distillation (``train.feature_weight``): which student layer learns which stored
teacher layer, and the learned linear maps that take the student's hidden states to the stored
features' ``dim``. The maps train beside the student (their own AdamW, on the same schedule),
are checkpointed and resumed with it, and are saved beside the exported model, never in it.
The per-position distance is ``distill.train.losses.feature_distance``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from distill.configbase import ConfigError

HEADS_FILE = "feature_heads.safetensors"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """The feature term of a step: ``pairs`` (student layer, index of the teacher layer among the
    stored ones), ``weight`` and ``kind`` (``train.feature_loss``)."""

    pairs: tuple[tuple[int, int], ...]
    weight: float
    kind: str


def feature_pairs(
    configured: Sequence[tuple[int, int]],
    stored_layers: Sequence[int],
    teacher_layers: int,
    student_layers: int,
    where: str,
) -> tuple[tuple[int, int], ...]:
    """(student layer, index into ``stored_layers``) per mapped layer: ``configured``
    (``student.feature_layers``) or, when empty, each stored teacher layer ``t`` learned by student
    layer ``round(t * student_layers / teacher_layers)``. ``ConfigError`` naming ``where`` (the
    shard) for a layer the shards or the student lack."""
    stored = [int(x) for x in stored_layers]
    pairs = list(configured) or [(round(t * student_layers / teacher_layers), t) for t in stored]
    out = []
    for s, t in pairs:
        if t not in stored:
            raise ConfigError(
                f"student.feature_layers maps teacher layer {t}, but {where} stores teacher layers {stored} "
                "(teacher.features.layers)"
            )
        if not 0 <= s <= student_layers:
            raise ConfigError(
                f"student.feature_layers maps student layer {s}, but the student has layers 0..{student_layers}"
            )
        out.append((int(s), stored.index(t)))
    students = [s for s, _ in out]
    if len(set(students)) != len(students):
        raise ConfigError(
            f"student.feature_layers: a student layer would learn two teacher layers ({[list(p) for p in pairs]}); "
            f"list the pairs [student layer, teacher layer] yourself (the student has layers 0..{student_layers})"
        )
    return tuple(out)


class FeatureHeads(torch.nn.Module):
    """One bias-free linear map per mapped student layer, hidden size -> ``dim`` (FitNets' regressor)."""

    def __init__(self, pairs: Sequence[tuple[int, int]], hidden_size: int, dim: int):
        super().__init__()
        self.pairs, self.dim = tuple(pairs), dim
        self.maps = torch.nn.ModuleDict({str(s): torch.nn.Linear(hidden_size, dim, bias=False) for s, _ in self.pairs})

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """(mapped student states (B, T, dim), teacher layer index) per pair, from the student's
        ``output_hidden_states``."""
        return [(self.maps[str(s)](hidden_states[s].float()), t) for s, t in self.pairs]

    def save(self, path: Path, stored_layers: Sequence[int]) -> None:
        """The maps as safetensors, with the pairs named in teacher layers in the metadata."""
        pairs = [[s, int(stored_layers[t])] for s, t in self.pairs]
        weights = {name: w.detach().cpu().contiguous() for name, w in self.state_dict().items()}
        save_file(weights, str(path), metadata={"feature_layers": json.dumps(pairs), "dim": str(self.dim)})

    def load(self, path: Path) -> None:
        self.load_state_dict(load_file(str(path)))
