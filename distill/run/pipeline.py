"""The pipeline's stages as plain functions over a ``RunConfig``; each Dagster asset calls one.

Paths are derived from content keys, so every stage finds its inputs from the config alone
and a stage whose inputs did not change finds its outputs already there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from distill.config import RunConfig
from distill.configbase import ConfigError
from distill.data import build_corpus, read_corpus_shard
from distill.teacher.checkpoint import checkpoint_hashes, resolve_teacher
from distill.teacher.ensemble import ENSEMBLE_CODE_VERSION
from distill.teacher.labels import LABEL_CODE_VERSION, label_shard, mode_settings, shard_key
from distill.train.config import StudentConfig, TrainConfig
from storage.cache import LabelStore, content_key, set_manifest
from storage.reader import Shard, ShardError
from storage.schema import SCHEMA_VERSION, ShardMeta
from storage.writer import atomic_write_text, folder_lock, remove_stale_temporaries

_ENGINES: dict[tuple, object] = {}


class IncompleteLabelsError(RuntimeError):
    """Some shards the run needs are not labelled yet."""


def teacher_dir(cfg: RunConfig) -> Path:
    """The (reference) teacher's folder: ``teacher.model``, or the first ensemble member's base
    model, whose tokenizer cuts the corpus for every member."""
    return resolve_teacher(cfg.teacher.members[0].model, cfg.root)


def corpus_shards(cfg: RunConfig) -> dict[str, dict]:
    """The corpus manifest's shard entries (fingerprint, windows, ...); raises when it is not built."""
    from distill.data import corpus_dir

    manifest_path = corpus_dir(cfg.root, cfg.corpus, teacher_hashes(cfg)["tokenizer"], cfg.teacher.mode) / "corpus.json"
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


def finetuned_dir(cfg: RunConfig, member) -> Path:
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


def prepare_finetuned(cfg: RunConfig, progress: bool = True) -> list[dict]:
    """Fine-tune every ``teacher.models`` member that asks for it (a finished one is reused)."""
    from distill.teacher.finetune import FINETUNE_INFO, finetune

    done = []
    for member in cfg.teacher.members:
        if member.finetune is None:
            continue
        out = finetuned_dir(cfg, member)
        with folder_lock(
            out, "fine-tuning of this teacher", on_wait=lambda msg: print(msg, file=sys.stderr, flush=True)
        ):
            info = out / "model" / FINETUNE_INFO
            if info.exists():
                done.append({**json.loads(info.read_text()), "path": str(out / "model"), "reused": True})
                continue
            for tmp in out.glob(".model.tmp-*"):  # left by a run that died while saving
                shutil.rmtree(tmp, ignore_errors=True)
            summary = finetune(
                resolve_teacher(member.model, cfg.root),
                train_windows(cfg),
                member.finetune,
                out / "model",
                progress=progress,
            )
            done.append({**summary, "path": str(out / "model"), "reused": False})
    return done


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


def _single(cfg: RunConfig) -> RunConfig:
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


def teacher_hashes(cfg: RunConfig) -> dict:
    return checkpoint_hashes(teacher_dir(cfg))


def tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir(cfg), trust_remote_code=cfg.teacher.engine.trust_remote_code)


def prepare_teacher(cfg: RunConfig) -> dict:
    """Resolve (and, for the bundled teacher, convert once) the teacher checkpoint."""
    from transformers import AutoConfig

    path = teacher_dir(cfg)
    tokenizer_hash = checkpoint_hashes(path)["tokenizer"]
    for member in cfg.teacher.members[1:]:
        other = resolve_teacher(member.model, cfg.root)
        if checkpoint_hashes(other)["tokenizer"] != tokenizer_hash:
            raise ConfigError(
                f"teacher.models: {member.model!r} ({other}) does not share the first member's tokenizer ({path}); "
                "an ensemble mixes distributions over the same token ids"
            )
    model_config = AutoConfig.from_pretrained(path)
    if cfg.corpus.window > getattr(model_config, "max_position_embeddings", cfg.corpus.window):
        raise ValueError(
            f"corpus.window={cfg.corpus.window} exceeds the teacher's context ({model_config.max_position_embeddings})"
        )
    if cfg.teacher.k > model_config.vocab_size:
        raise ValueError(
            f"teacher.k={cfg.teacher.k} exceeds the teacher's vocabulary ({model_config.vocab_size} tokens)"
        )
    return {
        "path": str(path),
        **checkpoint_hashes(path),
        "members": len(cfg.teacher.members),
        "vocab_size": model_config.vocab_size,
        "layers": model_config.num_hidden_layers,
        "architecture": (model_config.architectures or ["?"])[0],
    }


def prepare_corpus(cfg: RunConfig) -> dict:
    return build_corpus(cfg.corpus, tokenizer(cfg), teacher_hashes(cfg)["tokenizer"], cfg.root, mode=cfg.teacher.mode)


def label_store(cfg: RunConfig) -> LabelStore:
    return LabelStore(cfg.labels_uri or cfg.root / "labels")


def engine_dtype(cfg: RunConfig) -> str:
    # cache keys include the dtype labels were computed in; ``auto`` resolves per platform
    if cfg.teacher.engine.dtype != "auto":
        return cfg.teacher.engine.dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "auto"


def get_engine(cfg: RunConfig):
    """The process's engine for this teacher and settings, started on first use, and started
    anew when the one held has died or failed (the out-of-memory killer takes engines)."""
    from distill.teacher.slots import slot_dir
    from distill.teacher.vllm_engine import VllmTeacher

    key = (str(teacher_dir(cfg)), cfg.teacher.k, cfg.corpus.window, cfg.teacher.engine, cfg.teacher.max_logprobs)
    held = _ENGINES.get(key)
    if held is not None and not held.alive():
        _ENGINES.pop(key).close()
    if key not in _ENGINES:
        _ENGINES[key] = VllmTeacher(
            teacher_dir(cfg),
            cfg.teacher.k,
            cfg.corpus.window,
            cfg.teacher.engine,
            slot_folder=slot_dir(cfg.root),
            max_logprobs=cfg.teacher.max_logprobs,
        )
    return _ENGINES[key]


def close_engine(cfg: RunConfig) -> None:
    """Close this run's teacher engine, if it is running (others stay)."""
    for key in [key for key in _ENGINES if key[0] == str(teacher_dir(cfg))]:
        _ENGINES.pop(key).close()


def close_engines() -> None:
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        engine.close()


def shard_keys(cfg: RunConfig, names: Sequence[str]) -> dict[str, str]:
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
    cfg = _single(cfg)

    hashes, shards = teacher_hashes(cfg), corpus_shards(cfg)
    dtype = engine_dtype(cfg)
    return {
        n: shard_key(hashes, shards[n]["fingerprint"], cfg.teacher, dtype, window=cfg.corpus.window, split=split_of(n))
        for n in names
    }


def split_of(shard_name: str) -> str:
    """``train`` or ``heldout``: the split a shard name (``train-00000``) belongs to."""
    return shard_name.split("-")[0]


def expected_meta(cfg: RunConfig, split: str) -> dict:
    """Fields every shard of this run's ``split`` must carry (checked by the reader)."""
    from transformers import AutoConfig

    if cfg.teacher.ensemble:
        _, ensemble_hash, members = ensemble_meta(cfg)
        return {
            "teacher_hash": ensemble_hash,
            "tokenizer_hash": teacher_hashes(cfg)["tokenizer"],
            "vocab_size": AutoConfig.from_pretrained(teacher_dir(cfg)).vocab_size,
            "k": cfg.teacher.k * len(members),
            "mode": cfg.teacher.mode,
            "temperature": 1.0,
        }
    cfg = _single(cfg)
    hashes = teacher_hashes(cfg)
    return {
        "teacher_hash": hashes["weights"],
        "tokenizer_hash": hashes["tokenizer"],
        "vocab_size": AutoConfig.from_pretrained(teacher_dir(cfg)).vocab_size,
        "k": cfg.teacher.sampled_labels.draws if cfg.teacher.samples(split) else cfg.teacher.k,
        "mode": cfg.teacher.mode,
        "temperature": 1.0,
    }


def label_shards(cfg: RunConfig, names: Sequence[str], engine_factory=None) -> dict[str, dict]:
    """Label the named corpus shards (cache hits cost nothing); returns per-shard results."""
    if cfg.teacher.ensemble:
        return label_ensemble(cfg, names, engine_factory)
    cfg = _single(cfg)
    hashes = teacher_hashes(cfg)
    keys = shard_keys(cfg, names)
    store = label_store(cfg)
    factory = engine_factory or (lambda: get_engine(cfg))
    if store.is_local and store.root.exists():
        remove_stale_temporaries(store.root)  # left by writers that crashed
    results = {}
    for name in names:
        entry, windows = read_corpus_shard(cfg.root, cfg.corpus, hashes["tokenizer"], name, cfg.teacher.mode)
        split = split_of(name)
        expect = expected_meta(cfg, split)
        meta = ShardMeta(
            teacher=cfg.teacher.model,
            teacher_hash=hashes["weights"],
            tokenizer_hash=hashes["tokenizer"],
            vocab_size=expect["vocab_size"],
            k=expect["k"],
            temperature=1.0,
            mode=cfg.teacher.mode,
            engine=_engine_name(),
            data_fingerprint=entry["fingerprint"],
            shard=name,
            split=split,
            cache_key=keys[name],
            code_version=LABEL_CODE_VERSION,
            settings=mode_settings(cfg.teacher, split),
        )
        results[name] = {"key": keys[name], **label_shard(factory, store, keys[name], meta, windows, cfg.teacher)}
    return results


def label_ensemble(cfg: RunConfig, names: Sequence[str], engine_factory=None) -> dict[str, dict]:
    """Label the named shards with every member (each cached on its own), one member after the
    other (a member's engine is closed before the next member labels), then mix them."""
    from distill.teacher.ensemble import mix_shard

    runs, ensemble_hash, members = ensemble_meta(cfg)
    tokenizers = {teacher_hashes(run)["tokenizer"] for run, _ in runs}
    if len(tokenizers) != 1:
        raise ConfigError(
            f"teacher.models: the members do not share a tokenizer ({', '.join(m['folder'] for m in members)} "
            "hash their tokenizer files differently); an ensemble mixes distributions over the same token ids"
        )
    pending = [
        any(not label_store(run).is_committed(key) for key in shard_keys(run, names).values()) for run, _ in runs
    ]
    member_results = []
    for i, (run, _) in enumerate(runs):
        member_results.append(label_shards(run, names, engine_factory if i == 0 else None))
        if pending[i] and any(pending[i + 1 :]):
            close_engine(run)  # the next member's engine needs the device
    keys = shard_keys(cfg, names)
    store = label_store(cfg)
    expect = expected_meta(cfg, "train")
    results = {}
    for name in names:
        split = split_of(name)
        shards = [
            label_store(run).open(member_results[i][name]["key"], expect=expected_meta(run, split))
            for i, (run, _) in enumerate(runs)
        ]
        meta = ShardMeta(
            teacher="ensemble:" + "+".join(f"{m['model']}@{m['weight']:.4g}" for m in members),
            teacher_hash=ensemble_hash,
            tokenizer_hash=expect["tokenizer_hash"],
            vocab_size=expect["vocab_size"],
            k=expect["k"],
            temperature=1.0,
            mode=cfg.teacher.mode,
            engine=shards[0].meta.engine,
            data_fingerprint=shards[0].meta.data_fingerprint,
            shard=name,
            split=split,
            cache_key=keys[name],
            code_version=ENSEMBLE_CODE_VERSION,
            settings={"ensemble": [{**m, "cache_key": member_results[i][name]["key"]} for i, m in enumerate(members)]},
        )
        started = time.time()
        mixed = mix_shard(store, keys[name], meta, shards, [m["weight"] for m in members])
        labelled = [r[name] for r in member_results]
        fresh = [r for r in labelled if not r["cache_hit"]]
        results[name] = {
            "key": keys[name],
            **mixed,
            "cache_hit": mixed["cache_hit"] and not fresh,
            "teacher_seconds": sum(r["teacher_seconds"] for r in labelled),
            "members": [{"key": r["key"], "cache_hit": r["cache_hit"]} for r in labelled],
            "labelled_from": min([r["labelled_from"] for r in fresh] + [started]),
            "labelled_until": time.time(),
        }
    return results


def check_shards(cfg: RunConfig, names: Sequence[str]) -> dict:
    """Integrity and coverage of labelled shards against the corpus manifest.

    ``problems`` lists anything wrong (schema, provenance, checksum, counts, logprob sanity);
    ``mean_topk_mass`` is the average teacher probability inside the stored top-k.
    """
    from storage.reader import shard_stats

    corpus = corpus_shards(cfg)
    keys, store = shard_keys(cfg, names), label_store(cfg)
    expect = {split: expected_meta(cfg, split) for split in {split_of(n) for n in names}}
    problems, mass, tokens = [], 0.0, 0
    for name in names:
        try:
            shard = store.open(keys[name], expect=expect[split_of(name)])
        except ShardError as e:
            problems.append(f"{name}: {e}")
            continue
        stats = shard_stats(shard)
        entry = corpus[name]
        want_rows = entry["windows"] * (cfg.teacher.sampling.n if cfg.teacher.mode == "generate" else 1)
        want = entry["labelled_tokens"]  # None for generate: answer lengths are the teacher's
        if (
            stats["rows"] != want_rows
            or (want is not None and stats["tokens"] != want)
            or (want is None and stats["tokens"] < stats["rows"])
        ):
            problems.append(
                f"{name}: {stats['rows']} rows / {stats['tokens']} labels, corpus expects {want_rows} / {want if want is not None else '>= 1 per answer'}"
            )
        if stats["max_logprob"] > 1e-4 or stats["unsorted_positions"]:
            problems.append(f"{name}: logprobs > 0 or unsorted at {stats['unsorted_positions']} positions")
        if stats["tokens"]:
            mass += stats["mean_topk_mass"] * stats["tokens"]
            tokens += stats["tokens"]
    return {"problems": problems, "mean_topk_mass": mass / tokens if tokens else float("nan"), "tokens": tokens}


def _engine_name() -> str:
    import vllm

    return f"vllm-{vllm.__version__}"


def open_split(cfg: RunConfig, split: str, verify_checksum: bool = True) -> list[Shard]:
    """Every committed, verified shard of ``split``; raises naming the missing partitions.
    ``verify_checksum=False`` skips the sha256 (training ranks, once their launcher verified)."""
    names = [n for n in cfg.corpus.shard_names() if n.startswith(split)]
    keys = shard_keys(cfg, names)
    store = label_store(cfg)
    expect = expected_meta(cfg, split)
    missing = [n for n in names if not store.is_committed(keys[n])]
    if missing:
        raise IncompleteLabelsError(
            f"{len(missing)} {split} shard(s) not labelled yet: {missing}; materialize teacher_logits for those partitions"
        )
    shards = []
    for n in names:
        shard = store.open(keys[n], expect=expect, verify_checksum=verify_checksum)
        if shard.rows:
            shards.append(shard)
    if not shards:
        raise ShardError(store.root, f"every {split} shard is empty; add documents or lower corpus.{split}_shards")
    return shards


# the code that shapes a trained student beyond its config and data: the training loop, the
# losses, student construction, and the shard reader (data order) and codec (decoded labels)
TRAINING_CODE = (
    "distill.train.trainer",
    "distill.train.losses",
    "distill.train.student",
    "storage.reader",
    "storage.codec",
)


def source_fingerprint(modules: Sequence[str]) -> str:
    """sha256 of the source files of ``modules`` (found without importing them)."""
    import importlib.util

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


def prepare_student_tokenizer(cfg: RunConfig) -> Path | None:
    """Train the student's ``bpe:N`` tokenizer on the training split once (atomic, locked)."""
    from distill.train.xtok import token_byte_table, train_bpe

    folder = student_tokenizer_dir(cfg)
    if folder is None or not cfg.student.tokenizer.startswith("bpe:") or (folder / "tokenizer.json").exists():
        return folder
    with folder_lock(folder.parent / f".lock-{folder.name}", "training of this tokenizer"):
        if (folder / "tokenizer.json").exists():
            return folder
        table = token_byte_table(tokenizer(cfg))
        texts = [b"".join(table[i] for i in ids).decode("utf-8", errors="ignore") for ids, _ in train_windows(cfg)]
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        train_bpe(texts, int(cfg.student.tokenizer[4:]), tmp)
        os.replace(tmp, folder)
    return folder


def student_tokens(cfg: RunConfig) -> tuple[int, object]:
    """The student's vocabulary size and, when it has its own tokenizer, the
    ``distill.train.xtok.CrossTokenizer`` that aligns it with the teacher's (else None)."""
    folder = prepare_student_tokenizer(cfg)
    if folder is None:
        return len(tokenizer(cfg)), None
    from distill.train.xtok import CrossTokenizer

    cross = CrossTokenizer.load(tokenizer(cfg), folder)
    return len(cross.tokenizer), cross


def student_init_hash(student: StudentConfig) -> str | None:
    """Content hash (weights and model config) of the checkpoint a ``checkpoint`` student starts
    from, so the key follows the weights, not the folder they lie in; None for other inits."""
    if student.init != "checkpoint":
        return None
    path = Path(student.checkpoint).expanduser()
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise ConfigError(
            f"student.checkpoint={student.checkpoint!r} is invalid: expected a local folder with config.json and *.safetensors weights"
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
    names = [n for n in cfg.corpus.shard_names() if n.startswith("train")]
    key = student_key(
        cfg.student,
        cfg.baseline_train if baseline else cfg.train,
        list(shard_keys(cfg, names).values()),
        student_init_hash(cfg.student),
        training_code_fingerprint(),
        student_tokenizer_hash(cfg),
    )
    return cfg.root / "students" / f"{'baseline' if baseline else 'student'}-{key}"


def student_tokenizer_hash(cfg: RunConfig) -> str | None:
    """Content hash of a student's own tokenizer folder; for ``bpe:N`` the folder's key (what it
    is trained from), so the student's folder is known before the tokenizer is trained."""
    folder = student_tokenizer_dir(cfg)
    if folder is None:
        return None
    return folder.name if cfg.student.tokenizer.startswith("bpe:") else checkpoint_hashes(folder)["tokenizer"]


def remove_stale_dirs(out: Path) -> None:
    """Temporary model and checkpoint folders of a trainer that died before renaming them (the
    caller holds the folder's lock, so no live trainer owns them)."""
    for tmp in [*out.glob(".*.tmp-*"), *(out / "checkpoints").glob(".*.tmp-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def train_student(cfg: RunConfig, baseline: bool = False, launcher=None, log=print) -> dict:
    """Train (or resume, or reuse when finished) the distilled student or the CE-only baseline.

    With ``train.nproc_per_node`` x ``train.nnodes`` > 1 the ranks run under ``torchrun``,
    started by ``launcher`` (``distill.run.launch.Launcher``; default: a subprocess); else training
    runs in this process.
    """
    from distill.train.trainer import train

    out = student_dir(cfg, baseline)
    # two runs of one config (two launches, a retry beside a stuck run) must not write the same
    # checkpoints: the second waits, then finds the first one's model
    with folder_lock(out, "training of this student", on_wait=lambda msg: print(msg, file=sys.stderr, flush=True)):
        summary_path = out / "summary.json"
        if summary_path.exists() and (out / "model").exists():
            summary = {**json.loads(summary_path.read_text()), "reused": True, "out_dir": str(out)}
            if not (out / "model" / "README.md").exists():  # trained before model cards existed
                _card(cfg, summary, open_split(cfg, "train", verify_checksum=False), baseline)
            return summary
        remove_stale_dirs(out)
        shards = open_split(cfg, "train")
        atomic_write_text(out / "train_set.json", json.dumps(set_manifest(shards), indent=1))
        atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1, default=str))
        train_cfg = cfg.baseline_train if baseline else cfg.train
        if train_cfg.world_size == 1:
            vocab, cross = student_tokens(cfg)
            summary = train(cfg.student, train_cfg, teacher_dir(cfg), shards, out, vocab, cross=cross)
        else:
            from distill.run.launch import launch
            from distill.train.trainer import CKPT_DIR, latest_checkpoint

            prepare_student_tokenizer(cfg)  # once, here, not by every rank
            try:
                launch(out, cfg.to_dict(), train_cfg, baseline, launcher, log=log)
            except Exception as e:
                last = latest_checkpoint(out / CKPT_DIR)
                raise RuntimeError(
                    f"{out}: training in {train_cfg.world_size} processes failed ({e}); the next run resumes from "
                    f"{f'checkpoint {last.name}' if last else 'the start (no checkpoint yet; see train.checkpoint_every)'}"
                ) from e
            if not summary_path.exists():
                raise RuntimeError(f"{out}: the training processes exited without writing summary.json")
            summary = json.loads(summary_path.read_text())
        summary = {**summary, "reused": False, "out_dir": str(out)}
        _card(cfg, summary, shards, baseline)
        return summary


def _card(cfg: RunConfig, summary: dict, shards, baseline: bool, results=None, table=None) -> None:
    """The student's model card (``model/README.md``), with the evaluation's table when given."""
    from distill.run.card import card_info, write_card

    write_card(
        Path(summary["out_dir"]) / "model", card_info(cfg, summary, shards, baseline, teacher_dir(cfg)), results, table
    )


def evaluate_run(cfg: RunConfig) -> dict:
    """Teacher, distilled student, CE-only baseline and the student at initialization on
    held-out shards; report (markdown + PNG plots + JSON) in ``<root>/evaluations/<key>``."""
    import torch

    from distill.data import load_mc
    from distill.eval.evaluation import (
        MODE_NOTES,
        eval_device,
        evaluate,
        evaluate_model,
        full_distribution_kl,
        full_kl_skip_reason,
        gate,
        markdown_table,
        mc_accuracy,
        summary_line,
        write_plots,
    )
    from distill.train.student import build_student

    shards = open_split(cfg, "heldout")
    models = {"teacher": teacher_dir(cfg)}
    histories = {}
    for name, baseline in (("student", False), ("baseline", True)):
        folder = student_dir(cfg, baseline)
        if not (folder / "model").exists():
            raise FileNotFoundError(
                f"{folder / 'model'}: {name} not trained; materialize the {'baseline_student' if baseline else 'student_model'} asset"
            )
        models[name] = folder / "model"
        histories[name] = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    # the teacher from its stored labels and its vLLM engine (eval.teacher_backend), the students
    # on the training device and precision
    from distill.train.xtok import token_byte_table

    tok = tokenizer(cfg)
    byte_lengths = (
        torch.tensor([len(b) for b in token_byte_table(tok)]) if shards[0].meta.mode != "candidates" else None
    )
    vocab, cross = student_tokens(cfg)
    students = {"student": cross, "baseline": cross} if cross is not None else {}
    results = evaluate(
        models,
        shards,
        cfg.eval,
        cfg.train.precision,
        engine_factory=lambda: get_engine(cfg),
        byte_lengths=byte_lengths,
        cross=students,
    )
    device, bf16 = eval_device(cfg.train.precision)
    init = build_student(teacher_dir(cfg), cfg.student, vocab, cross.tokenizer if cross is not None else None).to(
        device
    )
    with torch.no_grad():
        results["student_init"] = evaluate_model(init, shards, cfg.eval, bf16, byte_lengths, cross)
        if cfg.eval.mc_file:
            results["student_init"].update(
                mc_accuracy(
                    init,
                    cross.tokenizer if cross is not None else tok,
                    load_mc(cfg.eval.mc_file),
                    cfg.eval.mc_length_normalize,
                    cfg.eval.batch_size,
                    bf16,
                )
            )
    # KL to the teacher's full distribution on a sample of held-out windows (reported, not gated)
    full_kl = {
        "skipped": (
            "eval.full_kl_windows is 0"
            if not cfg.eval.full_kl_windows
            else "candidates data has no per-token distribution"
            if shards[0].meta.mode == "candidates"
            else "the students have their own tokenizer"
            if cross is not None
            else "an ensemble's full distribution is its members' mixture (not computed)"
            if cfg.teacher.ensemble
            else full_kl_skip_reason(models["teacher"], device, bf16)
        )
    }
    if full_kl["skipped"] is None:
        from transformers import AutoModelForCausalLM

        def load(path, dtype=torch.float32):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)

        teacher = load(models["teacher"], torch.bfloat16 if bf16 else torch.float32)
        compared = {"student": load(models["student"]), "baseline": load(models["baseline"]), "student_init": init}
        full_kl = {**full_distribution_kl(teacher, compared, shards, cfg.eval, bf16), "skipped": None}
        for name in compared:
            results[name]["kl_full"] = full_kl.pop(name)
        del teacher, compared
    del init
    speedup = None
    if cfg.eval.generation_throughput:
        from distill.eval.generation import generation_throughput

        close_engines()  # the teacher engine evaluate() used: each measurement starts its own engine on the device
        for name in ("teacher", "student"):
            results[name]["generation_tokens_per_s"] = generation_throughput(models[name])["tokens_per_s"]
        speedup = results["student"]["generation_tokens_per_s"] / results["teacher"]["generation_tokens_per_s"]
    passed, gate_text = gate(results, cfg.eval)
    key = content_key(
        {
            "models": {n: str(p) for n, p in models.items()},
            "heldout": [s.meta.cache_key for s in shards],
            "eval": dataclasses.asdict(cfg.eval),
        }
    )
    out = cfg.root / "evaluations" / key
    plots = write_plots(results, histories, out)
    report = {
        "results": results,
        "table": markdown_table(results),
        "summary": summary_line(results),
        "gate_passed": passed,
        "gate": gate_text,
        "full_kl": full_kl,
        "generation_speedup": speedup,
        "plots": {n: str(p) for n, p in plots.items()},
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=1))
    images = "\n".join(f"![{n}]({p.name})" for n, p in plots.items())
    speed = (
        f"Student generates {speedup:.2f}x the teacher's tokens/s under vLLM on this machine.\n\n" if speedup else ""
    )
    note = MODE_NOTES[shards[0].meta.mode]
    note += (
        f" KL full: KL to the teacher's full distribution (a transformers forward) on the first {full_kl['windows']} held-out "
        f"windows ({full_kl['positions']} positions)."
        if full_kl["skipped"] is None
        else f" KL full: not computed ({full_kl['skipped']})."
    )
    atomic_write_text(
        out / "report.md",
        f"# Distillation report\n\n{note}\n\n{report['table']}\n\n{speed}Gate: {gate_text}\n\n{images}\n\n`{report['summary']}`\n",
    )
    report["out_dir"] = str(out)
    train_shards = open_split(cfg, "train", verify_checksum=False)
    for name, baseline in (("student", False), ("baseline", True)):
        folder = student_dir(cfg, baseline)
        summary = {**json.loads((folder / "summary.json").read_text()), "out_dir": str(folder)}
        _card(cfg, summary, train_shards, baseline, results, report["table"])
    return report
