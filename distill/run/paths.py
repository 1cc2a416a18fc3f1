"""Keys and paths of a run: where each artifact of a ``RunConfig`` lives.

A folder's (or label shard's) name is the content key of what it is built from: the teacher's
weights, the corpus shards' fingerprints, the settings and the code that shapes it. So every
stage finds its inputs from the config alone, and a stage whose inputs did not change finds its
outputs already there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

from distill.config import RunConfig
from distill.configbase import ConfigError
from distill.data import corpus_dir, image_store, read_corpus_shard
from distill.teacher.checkpoint import checkpoint_hashes, resolve_teacher
from distill.teacher.config import TeacherMember
from distill.teacher.ensemble import ENSEMBLE_CODE_VERSION
from distill.teacher.labels import shard_key
from distill.train.config import StudentConfig, TrainConfig
from storage import fs as fsmod
from storage.cache import LabelStore, content_key
from storage.images import ImageStore
from storage.schema import SCHEMA_VERSION

# the code that shapes a trained student beyond its config and data: the training loop, the
# losses, student construction, and the shard reader (data order) and codec (decoded labels)
TRAINING_CODE = (
    "distill.train.trainer",
    "distill.train.losses",
    "distill.train.student",
    "distill.train.xtok",
    "distill.train.features",
    "storage.reader",
    "storage.codec",
    "storage.kinds.base",
    "storage.kinds.topk",
    "storage.kinds.sampled",
    "storage.kinds.mixture",
    "storage.kinds.candidates",
    "storage.kinds.features",
)


class IncompleteLabelsError(RuntimeError):
    """Some input the run needs (corpus, labels, a fine-tuned teacher, a student) is not built yet."""


def split_of(shard_name: str) -> str:
    """``train`` or ``heldout``: the split a shard name (``train-00000``) belongs to."""
    return shard_name.split("-")[0]


def teacher_dir(cfg: RunConfig) -> Path:
    """The (reference) teacher's folder: ``teacher.model``, or the first ensemble member's base
    model, whose tokenizer cuts the corpus for every member; with ``teacher.vision``, the
    vision-language teacher built from ``teacher.model`` (which must be built: materialize teacher_model)."""
    if cfg.teacher.vision is not None:
        folder = vision_teacher_dir(cfg) / "model"
        if not (folder / "config.json").exists():
            raise IncompleteLabelsError(
                f"{folder}: the vision-language teacher (teacher.vision) is not built yet; materialize teacher_model"
            )
        return folder
    return resolve_teacher(cfg.teacher.members[0].model, cfg.root)


def run_images(cfg: RunConfig) -> ImageStore | None:
    """The image store that a run's label shards name (``corpus.image_column``; else None): the
    corpus's own, ``<storage_root>/images``, or with ``labels_uri`` the copy beside the labels,
    ``<labels_uri>/images``, which labelling fills before it commits a shard, so the machines that
    train and evaluate from those labels read the images from there too."""
    if not cfg.corpus.images:
        return None
    return ImageStore(fsmod.join(cfg.labels_uri, "images")) if cfg.labels_uri else image_store(cfg.root)


def vision_teacher_dir(cfg: RunConfig) -> Path:
    """Where ``teacher.vision``'s teacher is built: a folder keyed by the text teacher's weights,
    the settings and the building code (``distill.teacher.vlm``, the synthetic task, the prompt format)."""
    key = content_key(
        {
            "base": checkpoint_hashes(resolve_teacher(cfg.teacher.model, cfg.root))["weights"],
            "vision": dataclasses.asdict(cfg.teacher.vision),
            "code": source_fingerprint(("distill.teacher.vlm", "distill.synthetic", "distill.vision")),
        }
    )
    return cfg.root / "models" / f"vlm-{key}"


def teacher_hashes(cfg: RunConfig) -> dict:
    """Content hashes (``weights``, ``tokenizer``) of the (reference) teacher's folder."""
    return checkpoint_hashes(teacher_dir(cfg))


def corpus_shards(cfg: RunConfig) -> dict[str, dict]:
    """The corpus manifest's shard entries (fingerprint, windows, ...); raises when it is not built."""
    folder = corpus_dir(cfg.root, cfg.corpus, teacher_hashes(cfg)["tokenizer"], cfg.teacher.mode)
    manifest_path = folder / "corpus.json"
    if not manifest_path.exists():
        raise IncompleteLabelsError(f"{manifest_path}: corpus not built; materialize the corpus asset first")
    return json.loads(manifest_path.read_text())["shards"]


def train_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Content fingerprint of each training shard of the corpus (keys what is built from it)."""
    return {n: entry["fingerprint"] for n, entry in corpus_shards(cfg).items() if split_of(n) == "train"}


def train_windows(cfg: RunConfig) -> list[tuple[list[int], int]]:
    """Every training window of the corpus as (token ids, label start)."""
    windows = []
    for name in cfg.corpus.shard_names():
        if split_of(name) == "train":
            _, table = read_corpus_shard(cfg.root, cfg.corpus, teacher_hashes(cfg)["tokenizer"], name, cfg.teacher.mode)
            windows += list(zip(table.column("input_ids").to_pylist(), table.column("label_start").to_pylist()))
    return windows


def finetuned_dir(cfg: RunConfig, member: TeacherMember) -> Path:
    """Where ``member`` (with ``finetune`` set) is adapted to the training split: a folder keyed
    by the base weights, the training windows, the settings and the fine-tuning code."""
    base = resolve_teacher(member.model, cfg.root)
    key = content_key(
        {
            "base": checkpoint_hashes(base)["weights"],
            "data": train_fingerprints(cfg),
            "finetune": dataclasses.asdict(member.finetune),
            "code": source_fingerprint(("distill.teacher.finetune",)),
        }
    )
    return cfg.root / "models" / f"finetuned-{key}"


def member_runs(cfg: RunConfig) -> list[tuple[RunConfig, float]]:
    """One single-teacher run config per teacher, with its weight: ``cfg`` itself for a single
    ``teacher.model``; for ``teacher.models``, each member as ``teacher.model`` (a fine-tuned
    member by its adapted folder, which must exist: materialize finetuned_teachers)."""
    if not cfg.teacher.models:
        return [(cfg, 1.0)]
    runs = []
    for member in cfg.teacher.members:
        model = member.model
        if member.finetune is not None:
            folder = finetuned_dir(cfg, member) / "model"
            if not (folder / "config.json").exists():
                raise IncompleteLabelsError(
                    f"{folder}: teacher member {member.model!r} is not fine-tuned yet; materialize finetuned_teachers"
                )
            model = str(folder)
        runs.append(
            (dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, model=model, models=())), member.weight)
        )
    return runs


def single_run(cfg: RunConfig) -> RunConfig:
    """The one teacher's run config (``teacher.models`` with a single member resolved)."""
    return member_runs(cfg)[0][0] if cfg.teacher.models and not cfg.teacher.ensemble else cfg


def ensemble_meta(cfg: RunConfig) -> tuple[list[tuple[RunConfig, float]], str, list[dict]]:
    """An ensemble's member runs, its teacher hash (members' weights hashes and weights) and
    the provenance of each member."""
    runs = member_runs(cfg)
    total = sum(w for _, w in runs)
    members = [
        {
            "model": m.model,
            "weights_hash": teacher_hashes(run)["weights"],
            "weight": w / total,
            "finetune": dataclasses.asdict(m.finetune) if m.finetune else None,
            "folder": run.teacher.model,
        }
        for (run, w), m in zip(runs, cfg.teacher.members)
    ]
    return runs, content_key({"ensemble": [[m["weights_hash"], m["weight"]] for m in members]}), members


def label_store(cfg: RunConfig) -> LabelStore:
    return LabelStore(cfg.labels_uri or cfg.root / "labels")


def engine_dtype(cfg: RunConfig) -> str:
    """The dtype the teacher's labels are computed in (cache keys include it); ``auto`` resolves
    per platform."""
    if cfg.teacher.engine.dtype != "auto":
        return cfg.teacher.engine.dtype
    # lazy: vLLM is an optional extra (cpu or gpu) and costs seconds to import; only an ``auto``
    # dtype needs to know the platform
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "auto"


def shard_keys(cfg: RunConfig, names: Sequence[str]) -> dict[str, str]:
    """The label store key of each named shard: an ensemble's from its members' keys and weights."""
    if cfg.teacher.ensemble:
        runs = member_runs(cfg)
        total = sum(w for _, w in runs)
        member_keys = [shard_keys(run, names) for run, _ in runs]
        return {
            n: content_key(
                {
                    "ensemble": [[keys[n], w / total] for keys, (_, w) in zip(member_keys, runs)],
                    "code": ENSEMBLE_CODE_VERSION,
                    "schema": SCHEMA_VERSION,
                }
            )
            for n in names
        }
    cfg = single_run(cfg)

    hashes, shards = teacher_hashes(cfg), corpus_shards(cfg)
    dtype = engine_dtype(cfg)
    return {
        n: shard_key(hashes, shards[n]["fingerprint"], cfg.teacher, dtype, window=cfg.corpus.window, split=split_of(n))
        for n in names
    }


def source_fingerprint(modules: Sequence[str]) -> str:
    """sha256 of the source files of ``modules`` (found without importing them)."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise FileNotFoundError(
                f"module {name}: no Python source file to fingerprint (is the package installed from source?)"
            )
        h.update(f"{name}\x1f".encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:32]


@functools.cache
def training_code_fingerprint() -> str:
    """Fingerprint of ``TRAINING_CODE``, computed once per process: an edit to the trainer or the
    losses retrains students whose config and data did not change (comment-only edits included)."""
    return source_fingerprint(TRAINING_CODE)


def student_tokenizer_dir(cfg: RunConfig) -> Path | None:
    """The student's own tokenizer folder (``student.tokenizer``), None when it shares the
    teacher's; ``bpe:N`` is a folder keyed by the training windows, N and the training code."""
    spec = cfg.student.tokenizer
    if spec is None:
        return None
    if not spec.startswith("bpe:"):
        folder = Path(spec).expanduser()
        if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
            raise ConfigError(
                f"student.tokenizer={spec!r} is invalid: expected a local tokenizer folder (tokenizer.json) or bpe:N"
            )
        return folder
    key = content_key(
        {"bpe": int(spec[4:]), "data": train_fingerprints(cfg), "code": source_fingerprint(("distill.train.xtok",))}
    )
    return cfg.root / "tokenizers" / f"bpe-{key}"


def student_tokenizer_hash(cfg: RunConfig) -> str | None:
    """Content hash of a student's own tokenizer folder; for ``bpe:N`` the folder's key (what it
    is trained from), so the student's folder is known before the tokenizer is trained."""
    folder = student_tokenizer_dir(cfg)
    if folder is None:
        return None
    return folder.name if cfg.student.tokenizer.startswith("bpe:") else checkpoint_hashes(folder)["tokenizer"]


def student_init_hash(student: StudentConfig) -> str | None:
    """Content hash (weights and model config) of the checkpoint a ``checkpoint`` student starts
    from, so the key follows the weights, not the folder they lie in; None for other inits."""
    if student.init != "checkpoint":
        return None
    path = Path(student.checkpoint).expanduser()
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise ConfigError(
            f"student.checkpoint={student.checkpoint!r} is invalid: expected a local folder with config.json "
            "and *.safetensors weights"
        )
    return checkpoint_hashes(path)["weights"]


def student_key(
    student: StudentConfig,
    train: TrainConfig,
    train_shard_keys: Sequence[str],
    init_hash: str | None,
    code: str,
    tokenizer_hash: str | None = None,
) -> str:
    """Content key of a trained student: its config (a ``checkpoint`` init by ``init_hash``, not
    by path), the training settings that shape the model, its train shards' keys and ``code``
    (``training_code_fingerprint()``)."""
    student_fields = dataclasses.asdict(student)
    if student.init == "checkpoint":
        student_fields["checkpoint"] = init_hash
    if tokenizer_hash is not None:  # the student's own tokenizer, by content
        student_fields["tokenizer"] = tokenizer_hash
    return content_key(
        {
            "student": student_fields,
            # what shapes the model: not how it is shown or where the ranks meet (nor the
            # cross-tokenizer loss of a student that shares the teacher's tokenizer)
            "train": {
                k: v
                for k, v in dataclasses.asdict(train).items()
                if k not in ("progress", "num_threads", "rdzv_endpoint")
                and (k != "cross_tokenizer_loss" or student.tokenizer)
            },
            "shards": sorted(train_shard_keys),
            "code": code,
        }
    )


def student_dir(cfg: RunConfig, baseline: bool) -> Path:
    """The folder of the distilled student (or, ``baseline``, the CE-only baseline) of this run."""
    names = [n for n in cfg.corpus.shard_names() if split_of(n) == "train"]
    key = student_key(
        cfg.student,
        cfg.baseline_train if baseline else cfg.train,
        list(shard_keys(cfg, names).values()),
        student_init_hash(cfg.student),
        training_code_fingerprint(),
        student_tokenizer_hash(cfg),
    )
    return cfg.root / "students" / f"{'baseline' if baseline else 'student'}-{key}"
