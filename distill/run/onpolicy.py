"""On-policy distillation rounds (GKD: Agarwal et al., ICLR 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes") built from cached, offline pieces.

Round ``r`` starts from the round ``r - 1`` student (round 0: the distilled ``student_model``):

1. that student answers the training prompts under vLLM (``onpolicy.sampling``, fresh seeds
   each round);
2. the teacher labels those answers teacher-forced: top-k logprobs of every answer token, a
   ``generate``-mode shard like the teacher's own answers, content-addressed in the label store
   by the student's weights, the prompts, the sampling and the teacher;
3. the student trains ``onpolicy.steps`` more steps on a mix: each row is one of its own
   answers with probability ``onpolicy.lmbda`` (GKD's lambda), else a teacher answer from the
   ``generate`` train shards (``storage.reader.MixStream``). The teacher's answers take
   ``train``'s loss (KD mixed with CE); the student's own answers take the KD term alone, at
   full weight: they are not text to imitate (``distillation_loss``'s ``kd_only``). The teacher's
   rows and the lambda coins go on where the training of the round's starting model ended
   (``start_position``): each round reads the next teacher rows, not the first ones again.

A round's folder is keyed by its starting weights, answers, data and settings, so a finished
round is reused, a crashed one resumes from its checkpoints, and raising ``onpolicy.rounds``
trains only the new rounds. ``generator: teacher`` is the off-policy control at equal teacher
work: the teacher answers the same prompts with the same sampling each round instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from distill.config import RunConfig
from distill.data import read_corpus_shard
from distill.eval.evaluation import evaluate, evaluate_model
from distill.eval.models import eval_device, load_model
from distill.run.card import card_info, write_card
from distill.run.engines import close_engines, engine_name, get_engine
from distill.run.labelling import expected_meta, open_split
from distill.run.paths import (
    IncompleteLabelsError,
    engine_dtype,
    label_store,
    shard_keys,
    source_fingerprint,
    split_of,
    student_dir,
    student_key,
    teacher_dir,
    teacher_hashes,
    training_code_fingerprint,
)
from distill.run.tokenizing import teacher_tokenizer
from distill.run.training import remove_stale_dirs
from distill.teacher.checkpoint import checkpoint_hashes
from distill.teacher.config import SamplingConfig
from distill.teacher.labels import LABEL_CODE_VERSION, label_shard, prompt_seed
from distill.teacher.slots import slot_dir
from distill.teacher.vllm_engine import VllmTeacher, on_cpu
from distill.train.config import StudentConfig, TrainConfig
from distill.train.trainer import train
from storage.cache import content_key
from storage.reader import MixPosition, Shard, ShardStream, StreamPosition
from storage.schema import SCHEMA_VERSION, ShardMeta
from storage.writer import atomic_write_text, folder_lock

ONPOLICY_CODE_VERSION = "onpolicy-1"
ROUND_INFO = "round.json"
EVAL_SEED_OFFSET = 1_000_003  # held-out answers never share seeds with a round's


def round_name(r: int) -> str:
    return f"round-{r:03d}"


def round_names(cfg: RunConfig) -> list[str]:
    """The partition keys of ``cfg.onpolicy.rounds`` rounds."""
    return [round_name(r) for r in range(1, cfg.onpolicy.rounds + 1)]


def prompt_table(cfg: RunConfig, split: str) -> pa.Table:
    """Every prompt of the ``generate`` corpus's ``split`` shards (doc_id, input_ids, prompt_text)."""
    tokenizer_hash = teacher_hashes(cfg)["tokenizer"]
    tables = [
        read_corpus_shard(cfg.root, cfg.corpus, tokenizer_hash, n, "generate")[1]
        for n in cfg.corpus.shard_names()
        if split_of(n) == split
    ]
    table = pa.concat_tables(tables).select(["doc_id", "input_ids", "prompt_text"])
    if not table.num_rows:
        raise ValueError(f"corpus.source {cfg.corpus.source}: no {split} prompts to answer")
    return table


def round_prompts(prompts: pa.Table, per_round: int, seed: int, r: int) -> pa.Table:
    """Round ``r``'s prompts: all of them, or the next ``per_round`` of a seeded order (cyclic)."""
    n = prompts.num_rows
    if not per_round or per_round >= n:
        return prompts
    order = np.random.default_rng([seed, 0x726F756E64]).permutation(n)
    return prompts.take(pa.array(order[(np.arange(per_round) + (r - 1) * per_round) % n]))


def round_sampling(cfg: RunConfig, r: int) -> SamplingConfig:
    return dataclasses.replace(cfg.onpolicy.sampling, seed=cfg.onpolicy.sampling.seed + r)


def eval_sampling(cfg: RunConfig) -> SamplingConfig:
    """The held-out answers' sampling: a round's (``n`` answers per prompt), with seeds of its own."""
    return dataclasses.replace(cfg.onpolicy.sampling, seed=cfg.onpolicy.sampling.seed + EVAL_SEED_OFFSET)


def answers_key(cfg: RunConfig, generator_dir: Path, prompts: pa.Table, sampling: SamplingConfig) -> str:
    """Content key of a set of answers and their teacher labels: the teacher and its label
    settings, the answering model's weights, the prompts and the sampling."""
    hashes = teacher_hashes(cfg)
    return content_key(
        {
            "teacher": hashes["weights"],
            "tokenizer": hashes["tokenizer"],
            "k": cfg.teacher.k,
            "dtype": engine_dtype(cfg),
            "labels": LABEL_CODE_VERSION,
            "code": ONPOLICY_CODE_VERSION,
            "schema": SCHEMA_VERSION,
            "relabel_tag": cfg.teacher.relabel_tag,
            "generator": checkpoint_hashes(generator_dir)["weights"],
            "window": cfg.corpus.window,
            "sampling": dataclasses.asdict(sampling),
            "prompts": prompts_fingerprint(prompts),
        }
    )


def prompts_fingerprint(prompts: pa.Table) -> str:
    return content_key(
        {"doc_id": prompts.column("doc_id").to_pylist(), "input_ids": prompts.column("input_ids").to_pylist()}
    )


def free_device() -> None:
    """Close this process's teacher engines on a GPU, where an engine holds most of the
    device's memory; on the CPU they stay (no shared device pool, and a restart costs time)."""
    if not on_cpu():
        close_engines()


@dataclasses.dataclass(frozen=True)
class AnswerSet:
    """One set of answers to label: who answers which prompts how, and where it is stored."""

    key: str
    generator: str  # student | teacher
    model_dir: Path
    prompts: pa.Table
    sampling: SamplingConfig
    split: str
    name: str


def policy_answers(
    cfg, model_dir: Path, prompts: pa.Table, sampling: SamplingConfig, progress: bool = True
) -> pa.Table:
    """``sampling.n`` answers of the checkpoint ``model_dir`` to each prompt, from its own vLLM
    engine (closed before returning): ``generate`` corpus rows plus ``response_ids``,
    ``response_text`` and ``finish_reason``, seeded per prompt like the teacher's answers."""
    ids, docs, texts = (prompts.column(c).to_pylist() for c in ("input_ids", "doc_id", "prompt_text"))
    engine = VllmTeacher(
        model_dir,
        1,
        cfg.corpus.window,
        dataclasses.replace(cfg.teacher.engine, labeller="logprobs"),  # it generates
        slot_folder=slot_dir(cfg.root),
    )
    rows = []
    try:
        answers = engine.generate(ids, [prompt_seed(sampling.seed, d) for d in docs], sampling, k=1)
        for i, samples in enumerate(
            tqdm(
                answers,
                total=len(ids),
                desc=f"answers of {Path(model_dir).parent.name}",
                unit="prompt",
                disable=not progress,
            )
        ):
            for j, sample in enumerate(samples):
                rows.append(
                    {
                        "doc_id": docs[i],
                        "window_index": j,
                        "input_ids": ids[i],
                        "label_start": len(ids[i]) - 1,
                        "prompt_text": texts[i],
                        "response_ids": sample["response_ids"].tolist(),
                        "response_text": sample["text"],
                        "finish_reason": sample["finish_reason"],
                    }
                )
    finally:
        engine.close()
    return pa.Table.from_pylist(rows)


def label_answer_sets(cfg: RunConfig, sets: list[AnswerSet], progress: bool = True) -> list[Shard]:
    """The teacher-labelled shard of each answer set (a committed one is reused as it is). The
    models that answer run first, one engine at a time; then one teacher engine labels them all
    (``generator: teacher`` sets are answered and labelled by the teacher in one pass)."""
    store = label_store(cfg)
    todo = [s for s in sets if not store.is_committed(s.key)]
    answered = {}
    for s in todo:
        if s.generator == "student":
            free_device()  # for this model's engine
            answered[s.key] = policy_answers(cfg, s.model_dir, s.prompts, s.sampling, progress)
    hashes = teacher_hashes(cfg)
    for s in todo:
        expect = expected_meta(cfg, s.split)
        meta = ShardMeta(
            teacher=cfg.teacher.model,
            teacher_hash=hashes["weights"],
            tokenizer_hash=hashes["tokenizer"],
            vocab_size=expect["vocab_size"],
            kind="topk",  # the round's answers are labelled top-k (the config requires teacher.labels: topk)
            kind_params={"k": cfg.teacher.k},
            temperature=1.0,
            mode="generate",
            engine=engine_name(),
            data_fingerprint=prompts_fingerprint(s.prompts),
            shard=s.name,
            split=s.split,
            cache_key=s.key,
            code_version=ONPOLICY_CODE_VERSION,
            settings={
                "sampling": dataclasses.asdict(s.sampling),
                "generator": s.generator,
                "generator_model": str(s.model_dir),
                "generator_weights": checkpoint_hashes(s.model_dir)["weights"],
            },
        )
        teacher = dataclasses.replace(cfg.teacher, sampling=s.sampling, labels="topk")
        windows = answered.get(s.key, s.prompts)  # a student's answers are scored; the teacher answers prompts itself
        label_shard(lambda: get_engine(cfg), store, s.key, meta, windows, teacher, progress=progress)
    return [store.open(s.key, expect=expected_meta(cfg, s.split)) for s in sets]


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    r: int
    start: Path  # the checkpoint the round starts from (and, on-policy, answers with)
    out: Path
    answers: AnswerSet
    student: StudentConfig
    train: TrainConfig
    position: MixPosition  # where its mix of teacher rows and own answers starts


def start_position(trained: Path) -> MixPosition:
    """Where a round's mix starts: where the training in folder ``trained`` (the one that made
    the round's starting model: the distilled student, or the round before) ended, from its
    ``summary.json``. The teacher's rows and the lambda coins go on from there, so rounds never
    restart the stream at its first rows; the round's own answers (a new stream) start at their
    first row. A student trained in several processes ended at one position per rank, none of
    them this single-process stream's: its first round starts at the first row."""
    path = Path(trained) / "summary.json"
    summary = json.loads(path.read_text())
    if summary.get("world_size", 1) > 1:
        return MixPosition()
    if "position" not in summary:
        raise ValueError(
            f"{path}: no 'position' (trained before the trainer recorded where its data stream ended); "
            f"remove {Path(trained)} to train it again"
        )
    saved = summary["position"]
    if "index" in saved:  # a round: a mix position
        return MixPosition.from_dict(saved).with_new_extra()
    return MixPosition(0, StreamPosition.from_dict(saved))  # the distilled student: its one stream is the mix's main


def round_train_config(cfg: RunConfig) -> TrainConfig:
    return dataclasses.replace(cfg.train, steps=cfg.onpolicy.steps, lr=cfg.onpolicy.lr or cfg.train.lr, warmup_steps=0)


def start_dir(cfg: RunConfig, r: int, previous: Path | None = None) -> Path:
    """The model round ``r`` starts from (``previous``: round r - 1's folder, when the caller
    already knows it); raises when it is not trained yet."""
    if r == 1:
        folder = student_dir(cfg, False) / "model"
    else:
        folder = (previous or plan_round(cfg, r - 1).out) / "model"
    if not (folder / "config.json").exists():
        raise IncompleteLabelsError(
            f"{folder}: {'the distilled student' if r == 1 else f'on-policy {round_name(r - 1)}'} is not trained yet; "
            f"materialize {'student_model' if r == 1 else 'onpolicy_student ' + round_name(r - 1)} first"
        )
    return folder


def plan_round(cfg: RunConfig, r: int, previous: Path | None = None) -> RoundPlan:
    """Round ``r``'s inputs and folder: ``<root>/onpolicy/round-NNN-<key>``, keyed by its start
    weights, its answers, the off-policy shards, the settings and the training code."""
    oc = cfg.onpolicy
    start = start_dir(cfg, r, previous)
    prompts = round_prompts(prompt_table(cfg, "train"), oc.prompts_per_round, oc.sampling.seed, r)
    sampling = round_sampling(cfg, r)
    generator_dir = start if oc.generator == "student" else teacher_dir(cfg)
    answers = AnswerSet(
        answers_key(cfg, generator_dir, prompts, sampling),
        oc.generator,
        generator_dir,
        prompts,
        sampling,
        "train",
        f"onpolicy-{round_name(r)}",
    )
    student = dataclasses.replace(cfg.student, init="checkpoint", checkpoint=str(start))
    train_cfg = round_train_config(cfg)
    position = start_position(start.parent)
    names = [n for n in cfg.corpus.shard_names() if split_of(n) == "train"]
    code = training_code_fingerprint() + source_fingerprint(("distill.run.onpolicy",))
    key = content_key(
        {
            "student": student_key(
                student,
                train_cfg,
                [*shard_keys(cfg, names).values(), answers.key],
                checkpoint_hashes(start)["weights"],
                code,
            ),
            "lmbda": oc.lmbda,
            "generator": oc.generator,
            "round": r,
            "position": position.to_dict(),
        }
    )
    return RoundPlan(r, start, cfg.root / "onpolicy" / f"{round_name(r)}-{key}", answers, student, train_cfg, position)


def run_round(cfg: RunConfig, r: int, progress: bool = True, previous: Path | None = None) -> dict:
    """Train round ``r`` (reused when finished, resumed from its checkpoints when not)."""

    plan = plan_round(cfg, r, previous)
    out = plan.out
    with folder_lock(out, f"on-policy {round_name(r)}", on_wait=lambda msg: print(msg, file=sys.stderr, flush=True)):
        if (out / ROUND_INFO).exists() and (out / "model").exists():
            return {**json.loads((out / ROUND_INFO).read_text()), "reused": True, "out_dir": str(out)}
        remove_stale_dirs(out)
        answers = label_answer_sets(cfg, [plan.answers], progress)[0]
        free_device()  # training needs it
        offpolicy = open_split(cfg, "train")
        atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1, default=str))
        summary = train(
            plan.student,
            plan.train,
            teacher_dir(cfg),
            offpolicy,
            out,
            len(teacher_tokenizer(cfg)),
            mix=([answers], cfg.onpolicy.lmbda),
            start=plan.position,
        )
        info = {
            **{k: v for k, v in summary.items() if k != "model_dir"},
            "round": r,
            "start": str(plan.start),
            "start_position": plan.position.to_dict(),
            "generator": cfg.onpolicy.generator,
            "lmbda": cfg.onpolicy.lmbda,
            "answers_key": plan.answers.key,
            "answers": answers.rows,
            "answer_tokens": answers.tokens,
            "prompts": plan.answers.prompts.num_rows,
        }
        atomic_write_text(out / ROUND_INFO, json.dumps(info, indent=1))
        _card(cfg, plan, info, [answers, *offpolicy])
        return {**info, "reused": False, "out_dir": str(out)}


def _card(cfg: RunConfig, plan: RoundPlan, info: dict, shards) -> None:
    """The round student's model card (``model/README.md``)."""
    summary = {**info, "out_dir": str(plan.out)}
    run = dataclasses.replace(cfg, student=plan.student, train=plan.train)
    write_card(plan.out / "model", {**card_info(run, summary, shards, False, teacher_dir(cfg)), "onpolicy": info})


def run_rounds(cfg: RunConfig, upto: int | None = None, progress: bool = True) -> list[dict]:
    """Rounds 1 .. ``upto`` (default: ``onpolicy.rounds``) in order; finished ones are reused."""
    upto = cfg.onpolicy.rounds if upto is None else upto
    done, previous = [], None
    for r in range(1, upto + 1):  # each round starts where the last one ended: planned once
        done.append(run_round(cfg, r, progress, previous))
        previous = Path(done[-1]["out_dir"])
    return done


def round_plans(cfg: RunConfig) -> list[RoundPlan]:
    """The plans of rounds 1 .. ``onpolicy.rounds``, each from the one before (all trained)."""
    plans: list[RoundPlan] = []
    for r in range(1, cfg.onpolicy.rounds + 1):
        plans.append(plan_round(cfg, r, plans[-1].out if plans else None))
    return plans


def final_model(cfg: RunConfig) -> Path:
    plans = round_plans(cfg)
    return start_dir(cfg, cfg.onpolicy.rounds + 1, plans[-1].out if plans else None)


def self_answer_sets(cfg: RunConfig, models: dict[str, Path]) -> list[AnswerSet]:
    """One set per model: its own sampled answers to the first ``onpolicy.eval_prompts`` held-out prompts."""
    prompts = prompt_table(cfg, "heldout")
    prompts = prompts.slice(0, min(cfg.onpolicy.eval_prompts, prompts.num_rows))
    sampling = eval_sampling(cfg)
    return [
        AnswerSet(
            answers_key(cfg, path, prompts, sampling),
            "student",
            Path(path),
            prompts,
            sampling,
            "heldout",
            f"self-{name}",
        )
        for name, path in models.items()
    ]


def teacher_answer_set(cfg: RunConfig) -> AnswerSet:
    """The teacher's own answers to the students' held-out prompts, sampled as theirs are: the
    reference for their length, EOS share and diversity."""
    prompts = prompt_table(cfg, "heldout")
    prompts = prompts.slice(0, min(cfg.onpolicy.eval_prompts, prompts.num_rows))
    sampling, teacher = eval_sampling(cfg), teacher_dir(cfg)
    return AnswerSet(
        answers_key(cfg, teacher, prompts, sampling), "teacher", teacher, prompts, sampling, "heldout", "self-teacher"
    )


def distinct_n(answers: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct-n (Li et al., NAACL 2016, "A Diversity-Promoting Objective Function for Neural
    Conversation Models", sec. 4.3): distinct n-grams / all n-grams of ``answers`` (token ids;
    n-grams inside each answer, counted over all answers). 0 when no answer holds an n-gram."""
    grams = [tuple(a[i : i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_stats(
    answer_ids: Sequence[Sequence[int]], finish_reasons: Sequence[str], teacher_logprobs: Sequence[Sequence[float]]
) -> dict:
    """What a low KL on a model's own answers could hide (short or repetitive answers), over a
    set of answers: ``self_len`` (mean answer tokens, EOS included), ``self_eos`` (share of
    answers that ended by EOS, finish reason ``stop``, rather than at ``max_tokens``,
    ``length``), ``self_distinct2`` (``distinct_n`` of bigrams) and ``self_teacher_ll`` (the
    teacher's log-likelihood per answer token, token-weighted: ``teacher_logprobs[i][t]`` is
    its logprob of token t of answer i; nan when every answer is empty)."""
    if not answer_ids:
        raise ValueError("answer_stats: no answers")
    if not len(answer_ids) == len(finish_reasons) == len(teacher_logprobs):
        raise ValueError(
            f"answer_stats: {len(answer_ids)} answers, {len(finish_reasons)} finish reasons, "
            f"{len(teacher_logprobs)} logprob lists"
        )
    for i, (ids, reason, logprobs) in enumerate(zip(answer_ids, finish_reasons, teacher_logprobs)):
        if reason not in ("stop", "length"):
            raise ValueError(f"answer_stats: answer {i} has finish reason {reason!r}, not 'stop' or 'length'")
        if len(ids) != len(logprobs):
            raise ValueError(f"answer_stats: answer {i} has {len(ids)} tokens but {len(logprobs)} teacher logprobs")
    tokens = sum(len(ids) for ids in answer_ids)
    return {
        "self_len": tokens / len(answer_ids),
        "self_eos": sum(r == "stop" for r in finish_reasons) / len(answer_ids),
        "self_distinct2": distinct_n(answer_ids, 2),
        "self_teacher_ll": float(sum(float(np.sum(lp, dtype=np.float64)) for lp in teacher_logprobs) / tokens)
        if tokens
        else math.nan,
    }


def shard_answer_stats(shard: Shard) -> dict:
    """``answer_stats`` of the answers in a ``generate`` shard (the teacher's labels: its
    logprobs of the answer tokens)."""
    rows = [row for row, _ in ShardStream([shard], shuffle=False).rows(StreamPosition(), epochs=1)]
    return answer_stats(
        [[int(t) for t in r["input_ids"][int(r["label_start"]) + 1 :]] for r in rows],
        [r["finish_reason"] for r in rows],
        [r["target_logprobs"] for r in rows],
    )


def compare_students(cfg: RunConfig, students: dict[str, Path]) -> tuple[dict, list, list]:
    """Teacher and ``students`` (name: checkpoint) on held-out prompts: KL, top-1 and
    perplexity on the teacher's answers, greedy-answer agreement with the teacher, and KL /
    top-1 to the teacher on each student's own sampled answers (``self_kl``, ``self_top1``:
    what on-policy training targets) beside those answers' ``answer_stats`` (the teacher's own
    answers, sampled alike, give its row of them). Returns (results, held-out shards, own-answer
    shards of the students)."""
    shards = open_split(cfg, "heldout")
    results = evaluate(
        {"teacher": teacher_dir(cfg), **students},
        shards,
        cfg.eval,
        cfg.train.precision,
        engine_factory=lambda generates=False: get_engine(cfg, generates=generates),
    )
    *own, teacher_own = label_answer_sets(cfg, [*self_answer_sets(cfg, students), teacher_answer_set(cfg)])
    results["teacher"].update(shard_answer_stats(teacher_own), self_tokens=teacher_own.tokens)
    free_device()
    device, bf16 = eval_device(cfg.train.precision)
    for (name, path), shard in zip(students.items(), own):
        model = load_model(path, device)
        with torch.no_grad():
            m = evaluate_model(model, [shard], cfg.eval, bf16)
        results[name].update(
            self_kl=m["kl"], self_top1=m["top1"], self_tokens=shard.tokens, **shard_answer_stats(shard)
        )
        del model
    return results, shards, own


def round_infos(cfg: RunConfig) -> list[dict]:
    """``round.json`` of every finished round."""
    return [json.loads((plan.out / ROUND_INFO).read_text()) for plan in round_plans(cfg)]


def evaluate_rounds(cfg: RunConfig) -> dict:
    """The distilled (off-policy) student and the last round's student through
    ``compare_students``; written to ``<root>/evaluations/onpolicy-<key>``."""
    students = {"offpolicy": student_dir(cfg, False) / "model", "onpolicy": final_model(cfg)}
    results, shards, own = compare_students(cfg, students)
    rounds = round_infos(cfg)
    results["onpolicy"]["answer_tokens"] = sum(r["answer_tokens"] for r in rounds)
    table = onpolicy_table(results)
    key = content_key(
        {
            "models": {n: str(p) for n, p in students.items()},
            "heldout": [s.meta.cache_key for s in shards],
            "own": [s.meta.cache_key for s in own],
            "eval": dataclasses.asdict(cfg.eval),
        }
    )
    out = cfg.root / "evaluations" / f"onpolicy-{key}"
    report = {
        "results": results,
        "rounds": rounds,
        "table": table,
        "out_dir": str(out),
        "summary": " ".join(
            f"{n}_{m}={results[n][m]:.4f}" for n in students for m in ("kl", "self_kl", "greedy_prefix_agreement")
        ),
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=1, default=str))
    atomic_write_text(
        out / "report.md",
        f"# On-policy rounds ({cfg.onpolicy.generator} answers, lambda {cfg.onpolicy.lmbda})\n\n{table}\n\n"
        f"`{report['summary']}`\n",
    )
    return report


ANSWER_COLUMNS = [
    ("self_len", "own answer tokens", ".1f"),
    ("self_eos", "ended by EOS", ".3f"),
    ("self_distinct2", "distinct-2", ".3f"),
    ("self_teacher_ll", "teacher log-lik./token (own)", ".4f"),
]


def onpolicy_table(results: dict) -> str:
    cols = [
        ("ppl", "ppl (teacher answers)", ".2f"),
        ("kl", "KL (teacher answers)", ".4f"),
        ("top1", "top-1", ".4f"),
        ("self_kl", "KL (own answers)", ".4f"),
        ("self_top1", "top-1 (own answers)", ".4f"),
        *ANSWER_COLUMNS,
        ("greedy_exact_match", "greedy exact", ".3f"),
        ("greedy_prefix_agreement", "greedy prefix", ".3f"),
    ]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(format(m[c], f) if c in m else "–" for c, _, f in cols) + " |")
    return "\n".join(lines)
