"""Cache keys cover every input of what they name: a changed input gives a new key (relabel,
retrain), an unchanged one the same key (a cache hit). Tiny fake checkpoint folders stand in for
teachers and students; no engine starts."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import storage.kinds
from distill.config import RunConfig
from distill.configbase import ConfigError
from distill.data import CorpusConfig, corpus_dir
from distill.run import engines, paths
from distill.teacher.checkpoint import HASH_CACHE, checkpoint_hashes
from distill.teacher.config import EngineConfig, TeacherConfig
from distill.teacher.labels import shard_key
from distill.train.config import StudentConfig, TrainConfig

HASHES = {"weights": "w", "tokenizer": "t"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_scaling": None}


def fake_checkpoint(folder: Path, fill: float = 0.0, config: dict | None = None) -> Path:
    """A folder that passes ``check_checkpoint``: config.json, one safetensors file, a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    save_file({"embed.weight": torch.full((4, 4), fill)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ---- labels: shard_key ----------------------------------------------------------------------


def test_window_is_keyed_in_generate_mode_only():
    gen = TeacherConfig(mode="generate")
    base = shard_key(HASHES, "fp", gen, "float32", window=64)
    assert base == shard_key(HASHES, "fp", gen, "float32", window=64), "same inputs: cache hit"
    assert base != shard_key(HASHES, "fp", gen, "float32", window=128), "the window caps answers"
    # score / candidates: the window only decides which rows exist, and the data fingerprint
    # hashes every row's tokens, so identical rows keep their labels
    for mode in ("score", "candidates"):
        cfg = TeacherConfig(mode=mode)
        assert shard_key(HASHES, "fp", cfg, "float32", window=64) == shard_key(HASHES, "fp", cfg, "float32", window=128)


def test_labeller_is_keyed_where_the_labels_can_differ():
    """The device labeller's tails are exact and its sampled labels come from the whole
    vocabulary, so its shards are keyed apart; generate mode labels answers as vLLM samples them
    whatever the setting, so its key does not move."""

    def key(labeller, **teacher):
        cfg = TeacherConfig(engine=EngineConfig(labeller=labeller), **teacher)
        return shard_key(HASHES, "fp", cfg, "float32", window=64)

    for teacher in ({}, {"labels": "sampled"}, {"mode": "candidates"}):
        assert key("device", **teacher) != key("logprobs", **teacher), teacher
    assert key("device", mode="generate") == key("logprobs", mode="generate")
    # the device draws from the whole vocabulary: the shard says so (proposal_k 0) and the engine
    # is asked for no proposal
    device = TeacherConfig(labels="sampled").label_kind("train")["kind_params"]
    host = TeacherConfig(labels="sampled", engine=EngineConfig(labeller="logprobs")).label_kind("train")["kind_params"]
    assert device["proposal_k"] == 0 and host["proposal_k"] == 2048
    assert storage.kinds.KINDS["sampled"].engine_request(device) == {"k": 1, "draws": 80}
    assert storage.kinds.KINDS["sampled"].engine_request(host) == {"k": 2048}
    assert TeacherConfig(labels="sampled").max_logprobs == 32


def test_relabel_tag_forces_relabelling_in_every_mode():
    for mode in ("score", "generate", "candidates"):
        cfg = TeacherConfig(mode=mode)
        base = shard_key(HASHES, "fp", cfg, "float32", window=64)
        assert base == shard_key(HASHES, "fp", TeacherConfig(mode=mode, relabel_tag=""), "float32", window=64)
        tagged = shard_key(HASHES, "fp", dataclasses.replace(cfg, relabel_tag="vllm-upgrade"), "float32", window=64)
        assert tagged != base


def test_relabel_tag_builds_from_yaml():
    from distill.config import from_mapping

    assert from_mapping({"teacher": {"relabel_tag": "after-vllm-0.12"}}).teacher.relabel_tag == "after-vllm-0.12"
    with pytest.raises(ConfigError, match="relabel_tag"):
        from_mapping({"teacher": {"relabel_tag": 3}})


# ---- labels: checkpoint_hashes --------------------------------------------------------------


def test_config_json_is_hashed_with_the_weights(tmp_path):
    folder = fake_checkpoint(tmp_path / "teacher")
    before = checkpoint_hashes(folder)
    assert (folder / HASH_CACHE).exists()
    assert checkpoint_hashes(folder) == before, "unchanged folder: same hashes"
    edit_config(folder, rms_norm_eps=1e-6)
    after = checkpoint_hashes(folder)
    assert after["weights"] != before["weights"], "editing config.json must invalidate the hash cache"
    assert after["tokenizer"] == before["tokenizer"]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert checkpoint_hashes(folder)["weights"] != after["weights"], "the generation config sets stop tokens"


def test_same_size_config_edit_invalidates_the_cache(tmp_path):
    folder = fake_checkpoint(tmp_path / "teacher", config={**CONFIG, "rms_norm_eps": 1e-5})
    before = checkpoint_hashes(folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace("1e-05", "2e-05"))  # same length: only mtime and content differ
    stat = (folder / "config.json").stat()  # an edit a moment later, even on coarse-mtime filesystems
    os.utime(folder / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert checkpoint_hashes(folder)["weights"] != before["weights"]


def test_hash_cache_is_used_and_survives_a_move(tmp_path, monkeypatch):
    folder = fake_checkpoint(tmp_path / "teacher")
    before = checkpoint_hashes(folder)
    moved = tmp_path / "elsewhere" / "teacher"
    # plain copies (new mtimes) without the cache: hashed again, to the same values
    shutil.copytree(folder, moved, copy_function=shutil.copy, ignore=shutil.ignore_patterns(HASH_CACHE))
    assert not (moved / HASH_CACHE).exists()
    assert checkpoint_hashes(moved) == before

    from distill.teacher import checkpoint

    def no_hashing(files):
        raise AssertionError("the hash cache should have answered")

    monkeypatch.setattr(checkpoint, "_hash_files", no_hashing)
    assert checkpoint_hashes(folder) == before


def test_old_or_torn_hash_caches_are_rebuilt(tmp_path):
    folder = fake_checkpoint(tmp_path / "teacher")
    hashes = checkpoint_hashes(folder)
    cached = json.loads((folder / HASH_CACHE).read_text())
    # a cache from before config.json was hashed: no version, right stamp, stale hashes
    (folder / HASH_CACHE).write_text(
        json.dumps({"stamp": cached["stamp"], "hashes": {"weights": "old", "tokenizer": "old"}})
    )
    assert checkpoint_hashes(folder) == hashes
    (folder / HASH_CACHE).write_text('{"stamp": [[')
    assert checkpoint_hashes(folder) == hashes


# ---- labels through the pipeline: shard_keys ------------------------------------------------


def run_config(tmp_path: Path, teacher: Path, mode: str = "score", window: int = 64, **teacher_fields) -> RunConfig:
    return RunConfig(
        storage_root=str(tmp_path / "data"),
        teacher=TeacherConfig(
            model=str(teacher), k=4, mode=mode, engine=EngineConfig(dtype="float32"), **teacher_fields
        ),
        corpus=CorpusConfig(window=window, train_shards=2, heldout_shards=1),
    )


def write_manifest(cfg: RunConfig) -> None:
    """The corpus manifest ``shard_keys`` reads, with one fixed fingerprint per shard."""
    hashes = checkpoint_hashes(cfg.teacher.model)
    path = corpus_dir(cfg.root, cfg.corpus, hashes["tokenizer"], cfg.teacher.mode) / "corpus.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"shards": {n: {"fingerprint": f"fp-{n}"} for n in cfg.corpus.shard_names()}}))


def keys_of(cfg: RunConfig) -> dict[str, str]:
    write_manifest(cfg)
    return paths.shard_keys(cfg, cfg.corpus.shard_names())


def test_shard_keys_follow_the_teacher_config_and_the_generate_window(tmp_path):
    teacher = fake_checkpoint(tmp_path / "teacher")
    base = keys_of(run_config(tmp_path, teacher))
    assert keys_of(run_config(tmp_path, teacher)) == base
    edit_config(teacher, rope_scaling={"rope_type": "linear", "factor": 2.0})
    changed = keys_of(run_config(tmp_path, teacher))
    assert not set(changed.values()) & set(base.values()), "a new teacher config relabels every shard"

    gen = keys_of(run_config(tmp_path, teacher, "generate", window=64))
    assert keys_of(run_config(tmp_path, teacher, "generate", window=64)) == gen
    assert not set(keys_of(run_config(tmp_path, teacher, "generate", window=128)).values()) & set(gen.values())


def test_engine_version_is_recorded_not_keyed(tmp_path, monkeypatch):
    teacher = fake_checkpoint(tmp_path / "teacher")
    cfg = run_config(tmp_path, teacher)
    names = []
    for version in ("0.11.0", "0.12.0"):
        monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))
        names.append((engines.engine_name(), keys_of(cfg)))
    (engine_a, keys_a), (engine_b, keys_b) = names
    assert engine_a != engine_b and keys_a == keys_b, "an engine upgrade alone must not relabel"
    tagged = keys_of(run_config(tmp_path, teacher, relabel_tag="vllm-0.12.0"))
    assert not set(tagged.values()) & set(keys_a.values()), "relabel_tag is the opt-in"


# ---- students: student_key, student_init_hash, training_code_fingerprint ---------------------


def test_student_key_covers_code_and_init_weights():
    student, train = StudentConfig(), TrainConfig()
    base = paths.student_key(student, train, ["b", "a"], None, "code-1")
    assert base == paths.student_key(student, train, ["a", "b"], None, "code-1"), "shard order does not matter"
    assert base != paths.student_key(student, train, ["a", "b"], None, "code-2"), "edited training code retrains"
    assert base != paths.student_key(student, train, ["a", "c"], None, "code-1")
    assert base != paths.student_key(student, dataclasses.replace(train, lr=train.lr * 2), ["a", "b"], None, "code-1")
    assert base == paths.student_key(
        student, dataclasses.replace(train, progress=not train.progress), ["a", "b"], None, "code-1"
    )
    uld = dataclasses.replace(train, cross_tokenizer_loss="uld")
    assert base == paths.student_key(student, uld, ["a", "b"], None, "code-1"), (
        "no own tokenizer: the cross-tokenizer loss is unused"
    )
    own = StudentConfig(init="random", tokenizer="bpe:1000")
    assert paths.student_key(own, train, ["a"], None, "code-1", "tok-1") != paths.student_key(
        own, uld, ["a"], None, "code-1", "tok-1"
    )
    assert paths.student_key(own, train, ["a"], None, "code-1", "tok-1") != paths.student_key(
        own, train, ["a"], None, "code-1", "tok-2"
    )

    at_a = StudentConfig(init="checkpoint", checkpoint="/a/student")
    at_b = StudentConfig(init="checkpoint", checkpoint="/b/student")
    key_a = paths.student_key(at_a, train, ["a"], "weights-1", "code-1")
    assert key_a == paths.student_key(at_b, train, ["a"], "weights-1", "code-1"), "keyed by weights, not path"
    assert key_a != paths.student_key(at_a, train, ["a"], "weights-2", "code-1")


def test_student_init_hash_follows_the_weights_not_the_path(tmp_path):
    assert paths.student_init_hash(StudentConfig()) is None
    first = fake_checkpoint(tmp_path / "a" / "student", fill=1.0)
    h = paths.student_init_hash(StudentConfig(init="checkpoint", checkpoint=str(first)))
    moved = tmp_path / "b" / "student"
    shutil.move(str(first), moved)
    assert paths.student_init_hash(StudentConfig(init="checkpoint", checkpoint=str(moved))) == h
    fake_checkpoint(moved, fill=2.0)  # new weights at the same path
    replaced = paths.student_init_hash(StudentConfig(init="checkpoint", checkpoint=str(moved)))
    assert replaced != h
    edit_config(moved, rms_norm_eps=1e-6)
    assert paths.student_init_hash(StudentConfig(init="checkpoint", checkpoint=str(moved))) != replaced
    with pytest.raises(ConfigError, match="student.checkpoint"):
        paths.student_init_hash(StudentConfig(init="checkpoint", checkpoint=str(tmp_path / "missing")))


def test_student_dir_retrains_on_code_or_init_weights(tmp_path, monkeypatch):
    teacher = fake_checkpoint(tmp_path / "teacher")
    init = fake_checkpoint(tmp_path / "init", fill=1.0)
    cfg = dataclasses.replace(
        run_config(tmp_path, teacher), student=StudentConfig(init="checkpoint", checkpoint=str(init))
    )
    write_manifest(cfg)
    base = paths.student_dir(cfg, baseline=False)
    assert paths.student_dir(cfg, baseline=False) == base
    assert paths.student_dir(cfg, baseline=True) != base

    moved = tmp_path / "moved" / "init"
    shutil.copytree(init, moved)
    moved_cfg = dataclasses.replace(cfg, student=StudentConfig(init="checkpoint", checkpoint=str(moved)))
    assert paths.student_dir(moved_cfg, baseline=False) == base, "the same weights elsewhere: reuse"
    fake_checkpoint(init, fill=3.0)
    assert paths.student_dir(cfg, baseline=False) != base, "new weights at the same path: retrain"

    monkeypatch.setattr(paths, "training_code_fingerprint", lambda: "edited")
    assert paths.student_dir(moved_cfg, baseline=False) != base, "edited training code: retrain"


def test_training_code_fingerprint_is_cached_and_covers_the_sources():
    first = paths.training_code_fingerprint()
    hits = paths.training_code_fingerprint.cache_info().hits
    assert paths.training_code_fingerprint() == first
    assert paths.training_code_fingerprint.cache_info().hits == hits + 1, "computed once per process"
    assert first == paths.source_fingerprint(paths.TRAINING_CODE)
    assert {"distill.train.trainer", "distill.train.losses", "distill.train.student", "storage.reader"} <= set(
        paths.TRAINING_CODE
    )
    # every label kind's decoding feeds training: a new kind module cannot be left out of the key
    kinds = Path(storage.kinds.__file__).parent
    assert {f"storage.kinds.{m.stem}" for m in kinds.glob("*.py") if m.stem != "__init__"} <= set(paths.TRAINING_CODE)


def test_source_fingerprint_changes_with_any_source(tmp_path, monkeypatch):
    pkg = tmp_path / "fp_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "loss.py").write_text("def loss(x):\n    return x\n")
    (pkg / "loop.py").write_text("STEPS = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    modules = ("fp_pkg.loss", "fp_pkg.loop")
    base = paths.source_fingerprint(modules)
    assert paths.source_fingerprint(modules) == base
    (pkg / "loss.py").write_text("def loss(x):\n    return 2 * x\n")
    assert paths.source_fingerprint(modules) != base
    with pytest.raises(FileNotFoundError, match="fp_pkg.missing"):
        paths.source_fingerprint(("fp_pkg.missing",))
