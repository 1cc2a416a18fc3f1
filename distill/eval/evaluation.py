"""The evaluation driver: held-out metrics of each model from its own forward pass
(``evaluate_model``), and ``evaluate``, which runs every model of a comparison through the
held-out metrics, multiple choice, greedy answers and lm-eval tasks the config asks for.

The teacher itself is not run through transformers unless ``eval.teacher_backend`` asks for
it: its held-out metrics come from the labels already stored in the shards
(``distill.eval.stored``), and its greedy answers and multiple-choice scores from its vLLM
engine. Students run on the training device (``distill.eval.models.eval_device``)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from transformers import AutoTokenizer

from distill.data import load_mc
from distill.eval.answers import AnswerReference, greedy_answers
from distill.eval.choice import engine_mc_accuracy, mc_accuracy
from distill.eval.config import EvalConfig
from distill.eval.harness import engine_lm, flatten, run_tasks, student_lm
from distill.eval.heldout import heldout_batches, heldout_prompts
from distill.eval.metrics import (
    accumulate,
    answer_sums,
    batch_sums,
    candidate_sums,
    cross_batch_sums,
    finish,
    finish_candidates,
)
from distill.eval.models import autocast, checkpoint_bytes, device_of, eval_device, load_model
from distill.eval.stored import teacher_metrics
from distill.train.losses import candidate_scores
from distill.train.trainer import collate_for
from distill.train.xtok import CrossTokenizer, collate_cross
from distill.vision import PixelInputs, pixel_args
from storage.reader import Shard
from storage.schema import ShardMeta

Sums = Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _candidate_batch_sums(logits: torch.Tensor, batch: dict[str, torch.Tensor], normalize: bool) -> dict:
    scores = candidate_scores(logits, batch["targets"], batch["mask"], batch["index"], normalize)
    return candidate_sums(scores, batch)


def _sums_for(meta: ShardMeta, byte_lengths: torch.Tensor | None, cross: CrossTokenizer | None) -> Sums:
    """The per-batch sums of a model's logits on this data: candidate scores, a model with its
    own tokenizer (bytes from its own tokens), or the teacher's tokens."""
    if meta.mode == "candidates":
        return functools.partial(_candidate_batch_sums, normalize=bool(meta.settings.get("length_normalize")))
    if cross is not None:
        return functools.partial(cross_batch_sums, byte_lengths=torch.tensor([len(b) for b in cross.student_bytes]))
    return functools.partial(batch_sums, byte_lengths=byte_lengths)


@torch.no_grad()
def evaluate_model(
    model,
    shards: Sequence[Shard],
    cfg: EvalConfig,
    bf16: bool = False,
    byte_lengths: torch.Tensor | None = None,
    cross: CrossTokenizer | None = None,
    pixels: PixelInputs | None = None,
) -> dict:
    """Held-out metrics of one causal LM against the teacher labels in ``shards``, on the
    model's device (``bf16``: under bf16 autocast; metrics are finished in fp32/fp64).
    ``byte_lengths``: bytes per token id of the teacher's tokenizer, for bits per byte.
    ``cross``: a ``distill.train.xtok.CrossTokenizer`` for a model with its own tokenizer.
    ``pixels``: the image inputs of shards whose rows are image questions; their metrics add
    ``answer_acc`` (``distill.eval.metrics.answer_sums``)."""
    model.eval()
    device = device_of(model)
    meta = shards[0].meta
    sums_of = _sums_for(meta, byte_lengths, cross)
    collate_rows = (
        collate_for(shards[0], pixels=pixels)
        if cross is None
        else functools.partial(collate_cross, k=meta.slots, cross=cross)
    )
    totals: dict[str, torch.Tensor] = {}
    for batch in heldout_batches(shards, cfg, collate_rows):
        batch = {n: t.to(device) for n, t in batch.items()}
        with autocast(device, bf16):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **pixel_args(batch)
            ).logits
        accumulate(totals, sums_of(logits.float(), batch))
        if meta.images:
            accumulate(totals, answer_sums(logits.argmax(-1), batch))
    metrics = finish_candidates(totals) if meta.mode == "candidates" else finish(totals)
    return {**metrics, "parameters": sum(p.numel() for p in model.parameters())}


def _lm_eval(lm, cfg: EvalConfig) -> dict:
    scores = run_tasks(lm, cfg.lm_eval_tasks, cfg.lm_eval_include, cfg.lm_eval_limit)
    return {"lm_eval": scores, **flatten(scores)}


@dataclasses.dataclass
class _Comparison:
    """What every model of one evaluation is measured on: the held-out shards, the config, the
    teacher's bytes per token id (bits per byte), the multiple-choice questions and the
    greedy-answer reference, plus the evaluation's precision."""

    shards: Sequence[Shard]
    cfg: EvalConfig
    bf16: bool
    byte_lengths: torch.Tensor | None
    items: list[dict] | None
    answers: AnswerReference
    pixels: PixelInputs | None = None

    def needs_tokenizer(self) -> bool:
        return bool(self.items or self.answers.prompts or self.cfg.lm_eval_tasks)

    def stored_teacher(self, path: str | Path, engine_factory: Callable[[], object] | None) -> dict:
        """The teacher with ``eval.teacher_backend: stored``: held-out metrics from its stored
        labels; greedy answers (which set every model's answer limits and the reference), MC
        scores and lm-eval tasks from its vLLM engine, started only when one of those is asked for."""
        cfg, answers = self.cfg, self.answers
        results = {
            **teacher_metrics(self.shards, cfg, path, self.byte_lengths),
            "checkpoint_bytes": checkpoint_bytes(path),
        }
        if not self.needs_tokenizer():
            return results
        if engine_factory is None:
            raise ValueError(
                "eval.teacher_backend='stored' needs the teacher's vLLM engine for greedy answers and "
                "multiple-choice scores: pass engine_factory (or set eval.teacher_backend: transformers)"
            )
        # greedy answers need an engine that generates (``engine_factory(generates=True)``); scores do not
        engine = engine_factory(generates=True) if answers.prompts or cfg.lm_eval_tasks else engine_factory()
        tok = AutoTokenizer.from_pretrained(path)
        if self.items:
            results.update(engine_mc_accuracy(engine, tok, self.items, cfg.mc_length_normalize, cfg.mc_file))
        if answers.prompts:
            answers.limits = [min(cfg.agreement_max_tokens, engine.max_len - len(p)) for p in answers.prompts]
            results.update(answers.agreement(engine.greedy(answers.prompts, answers.limits, tok.eos_token_id)))
        if cfg.lm_eval_tasks:
            results.update(_lm_eval(engine_lm(engine, tok), cfg))
        return results

    def loaded_model(self, model, path: str | Path, cross: CrossTokenizer | None) -> dict:
        """A model loaded on the evaluation device: held-out metrics, then the MC scores, greedy
        answers and lm-eval tasks asked for."""
        cfg, answers, bf16 = self.cfg, self.answers, self.bf16
        results = {
            **evaluate_model(model, self.shards, cfg, bf16, self.byte_lengths, cross, self.pixels),
            "checkpoint_bytes": checkpoint_bytes(path),
        }
        tok = AutoTokenizer.from_pretrained(path) if self.needs_tokenizer() else None
        if self.items:
            results.update(mc_accuracy(model, tok, self.items, cfg.mc_length_normalize, cfg.batch_size, bf16))
        if answers.prompts:
            own = greedy_answers(model, answers.prompts, answers.limits, tok.eos_token_id, cfg.batch_size, bf16)
            results.update(answers.agreement(own))
        if cfg.lm_eval_tasks:
            results.update(_lm_eval(student_lm(model, tok, cfg.batch_size), cfg))
        return results


def evaluate(
    models: Mapping[str, str | Path],
    shards: Sequence[Shard],
    cfg: EvalConfig,
    precision: str = "auto",
    engine_factory: Callable[[], object] | None = None,
    byte_lengths: torch.Tensor | None = None,
    cross: Mapping[str, CrossTokenizer] | None = None,
    pixels: PixelInputs | None = None,
) -> dict[str, dict]:
    """Metrics for each named checkpoint folder. The first model is the teacher: on ``generate``
    data its greedy answers are the reference the others are compared with.

    With ``cfg.teacher_backend`` ``stored`` the teacher's metrics come from the stored labels
    (``teacher_metrics``) and its greedy answers and MC scores from ``engine_factory()`` (a
    ``VllmTeacher``, called only when needed; ``engine_factory(generates=True)`` when it must
    answer); the other models, and the teacher with
    ``transformers``, are loaded from safetensors onto ``eval_device(precision)``
    (``precision``: the training's ``train.precision``) one at a time. ``byte_lengths`` (bytes
    per teacher token id) adds bits per byte; ``cross`` maps the names of models with their own
    tokenizer to their ``distill.train.xtok.CrossTokenizer``; ``pixels``: the image inputs of image
    questions (``distill.vision.PixelInputs``)."""
    cross = cross or {}
    device, bf16 = eval_device(precision)
    # greedy answers of image questions are not compared: the comparison's engines and models read no images
    generate = shards[0].meta.mode == "generate" and cfg.agreement_prompts > 0 and not shards[0].meta.images
    comparison = _Comparison(
        shards,
        cfg,
        bf16,
        byte_lengths,
        items=load_mc(cfg.mc_file) if cfg.mc_file else None,
        answers=AnswerReference(
            heldout_prompts(shards, cfg.agreement_prompts) if generate else [], cfg.agreement_max_tokens
        ),
        pixels=pixels,
    )
    results = {}
    for i, (name, path) in enumerate(models.items()):
        if i == 0 and cfg.teacher_backend == "stored":
            results[name] = comparison.stored_teacher(path, engine_factory)
            continue
        model = load_model(path, device)
        results[name] = comparison.loaded_model(model, path, cross.get(name))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
