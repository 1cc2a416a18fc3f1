"""The eval section of a run config. A plain dataclass (no torch), validated when built."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from distill.configbase import check

TEACHER_BACKENDS = ("stored", "transformers")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 8
    """Windows per forward pass; also multiple-choice questions (all their choices) per padded
    forward and prompts per left-padded greedy batch."""
    max_windows: int | None = None
    """Evaluate at most this many held-out windows (None: all)."""
    min_ppl_margin: float = 0.0
    """Gate: the distilled student's held-out perplexity (``candidates`` data: the gold answer's
    perplexity among the candidates, ``gold_ppl``) must be below the baseline's by at least this
    (and below the student's at initialization)."""
    min_bpb_margin: float = 0.0
    """Gate: the distilled student's held-out bits per byte must be below the baseline's by at
    least this (and below the student's at initialization), where bits per byte are measured
    (``score`` and ``generate`` data). The stored-label KL is reported, not gated: it is the
    quantity ``tail: bucket`` KD minimizes, so a KD student passes it almost by construction."""
    full_kl_windows: int = 16
    """Held-out windows (the first N in shard order) on which every student that shares the
    teacher's tokenizer is also scored by KL to the teacher's *full* distribution (column ``KL
    full``), from a transformers forward of the teacher on the evaluation device, one batch at a
    time beside each student. Reported, not gated. Skipped, with the reason in the report, when
    the teacher's weights would not fit in the device's free memory, for ``candidates`` data, and
    at 0."""
    mc_file: str | None = None
    """Bring-your-own multiple-choice benchmark: a JSONL file of {question, choices, answer (index)},
    scored by log-likelihood."""
    mc_length_normalize: bool = False
    """Score MC choices by mean instead of summed token logprob."""
    generation_throughput: bool = False
    """Also measure teacher and student generation tokens/s under vLLM (starts two engines)."""
    agreement_prompts: int = 32
    """``generate`` data: held-out prompts on which each model's greedy answer is compared with the teacher's."""
    agreement_max_tokens: int = 64
    """``generate`` data: longest greedy answer compared, in tokens (with the ``stored`` teacher
    backend also at most what the teacher engine's ``corpus.window`` leaves after each prompt,
    for every model alike)."""
    teacher_backend: str = "stored"
    """How the teacher is evaluated. ``stored``: its held-out metrics from the labels already in
    the held-out shards (perplexity from the stored realized-token logprobs, KL 0 and top-1
    agreement 1 by definition, ECE from the stored top-1), its greedy answers and
    multiple-choice scores from its vLLM engine; no transformers copy of the teacher is built.
    ``transformers``: the teacher loaded and run like the students (full forward passes, on
    the training device; needs the teacher's weights in memory in fp32 on a CPU)."""

    lm_eval_tasks: tuple[str, ...] = ()
    """lm-evaluation-harness tasks run for teacher, student and baseline (the ``lm-eval``
    extra): harness task names, or tasks defined by YAML files under ``lm_eval_include``. The
    teacher answers through its vLLM engine, the students through the harness's ``HFLM``; each
    task's metrics go into the report, its table and the asset's metadata
    (``<model>_lm_eval_<task>_<metric>``). Nothing is downloaded: a hub dataset must be in the
    local cache (``examples/lm_eval`` ships a local task, ``python_basics``)."""
    lm_eval_include: str | None = None
    """A folder of lm-eval task YAMLs (relative paths are relative to the working directory)."""
    lm_eval_limit: int | None = None
    """At most this many documents per lm-eval task (None: all)."""

    REMOVED_FIELDS: typing.ClassVar[dict[str, str]] = {
        "min_kl_margin": "the gate no longer uses the held-out KL to the stored top-k plus bucket (the training "
        "objective of tail: bucket KD, so it passes almost by construction); it gates on perplexity "
        "(min_ppl_margin) and bits per byte (min_bpb_margin)",
    }

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.full_kl_windows >= 0, "full_kl_windows", self.full_kl_windows, "an integer >= 0")
        check(
            self.lm_eval_limit is None or self.lm_eval_limit >= 1, "lm_eval_limit", self.lm_eval_limit, "None or >= 1"
        )
        check(
            self.lm_eval_include is None or Path(self.lm_eval_include).is_dir(),
            "lm_eval_include",
            self.lm_eval_include,
            f"a folder of lm-eval task YAMLs (relative to the working directory, {Path.cwd()})",
        )
        check(self.max_windows is None or self.max_windows >= 1, "max_windows", self.max_windows, "None or >= 1")
        check(self.agreement_prompts >= 0, "agreement_prompts", self.agreement_prompts, "an integer >= 0")
        check(self.agreement_max_tokens >= 1, "agreement_max_tokens", self.agreement_max_tokens, "an integer >= 1")
        check(
            self.teacher_backend in TEACHER_BACKENDS,
            "teacher_backend",
            self.teacher_backend,
            " or ".join(TEACHER_BACKENDS),
        )
