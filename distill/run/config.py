"""The onpolicy section of a run config (GKD rounds). Plain dataclasses, validated when built."""

from __future__ import annotations

import dataclasses

from distill.configbase import check
from distill.teacher.config import SamplingConfig

GENERATORS = ("student", "teacher")


@dataclasses.dataclass(frozen=True)
class PolicySampling(SamplingConfig):
    """How the generator answers in a round: GKD samples the student's own distribution
    (temperature 1, no nucleus cut)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy rounds after the distilled student (``teacher.mode: generate`` only)."""

    rounds: int = 0
    """Rounds to run (0: none). Each is a partition ``round-NNN`` of the ``onpolicy_student``
    asset; round r needs round r - 1 (materializing it runs any earlier round still missing)."""
    steps: int = 20
    """Optimizer steps per round (``train``'s settings otherwise, with a fresh warm-up and decay)."""
    lmbda: float = 0.5
    """GKD's lambda: the share of each round's training rows that are the student's own answers
    (KD only) rather than the teacher's answers from the ``generate`` train shards (KD + CE).
    1: purely on-policy."""
    generator: str = "student"
    """Who answers the prompts each round: ``student`` (on-policy, GKD) or ``teacher`` (fresh
    teacher answers to the same prompts: the off-policy control at equal teacher work)."""
    prompts_per_round: int = 0
    """Training prompts answered per round, rotating through a seeded order of all of them
    (0: every training prompt every round)."""
    sampling: PolicySampling = PolicySampling()
    """How the generator answers: answers per prompt ``n``, ``temperature`` (GKD samples the
    student at 1), ``top_p``, ``max_tokens``, ``seed``. The seed moves with the round, so every
    round draws fresh answers."""
    lr: float | None = None
    """Peak learning rate of a round (None: ``train.lr``)."""
    eval_prompts: int = 32
    """Held-out prompts the evaluation has each student answer (``sampling.n`` answers each,
    sampled like a round with seeds of their own), to measure KL to the teacher on the
    student's own generations."""

    def __post_init__(self):
        check(self.rounds >= 0, "rounds", self.rounds, "an integer >= 0")
        check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
        check(0 < self.lmbda <= 1, "lmbda", self.lmbda, "a number in (0, 1]")
        check(self.generator in GENERATORS, "generator", self.generator, f"one of {GENERATORS}")
        check(self.prompts_per_round >= 0, "prompts_per_round", self.prompts_per_round, "an integer >= 0 (0: all)")
        check(self.lr is None or self.lr > 0, "lr", self.lr, "a positive number (or null: train.lr)")
        check(self.eval_prompts >= 1, "eval_prompts", self.eval_prompts, "an integer >= 1")
