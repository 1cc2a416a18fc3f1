"""A real two-teacher ensemble: the bundled teacher and the same teacher fine-tuned on the
training split (its own cached stage), each labelled by a real vLLM engine and cached on its
own, mixed into one shard set, then a student trained on the mixture."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

from distill.config import from_mapping
from distill.configbase import ConfigError
from distill.run import engines, labelling, paths, training
from distill.teacher.config import FinetuneConfig, TeacherMember
from storage.kinds.mixture import mix
from storage.reader import ShardStream
from tests.conftest import TINY_K


def _rows(shard):
    return [r for r, _ in ShardStream([shard], shuffle=False).rows(epochs=1)]


def test_ensemble_of_the_teacher_and_its_finetuned_self(tiny_config, engine, teacher_dir):
    base = tiny_config
    names = base.corpus.shard_names()
    labelling.prepare_corpus(base)
    labelling.label_shards(base, names, engine_factory=lambda: engine)  # the first teacher alone, as a user had it
    tuned = FinetuneConfig(steps=3, batch_size=2, lr=1e-4)
    cfg = dataclasses.replace(
        base,
        teacher=dataclasses.replace(
            base.teacher,
            models=(
                TeacherMember(str(teacher_dir), weight=1.0),
                TeacherMember(str(teacher_dir), weight=3.0, finetune=tuned),
            ),
        ),
    )
    with pytest.raises(paths.IncompleteLabelsError, match="materialize finetuned_teachers"):
        paths.shard_keys(cfg, names)

    done = labelling.prepare_finetuned(cfg, progress=False)
    assert len(done) == 1 and not done[0]["reused"] and done[0]["windows"] > 0
    assert labelling.prepare_finetuned(cfg, progress=False)[0]["reused"], "the fine-tuned teacher is cached"
    runs = paths.member_runs(cfg)
    tuned_run = runs[1][0]
    assert paths.teacher_hashes(tuned_run)["weights"] != paths.teacher_hashes(base)["weights"]
    assert paths.teacher_hashes(tuned_run)["tokenizer"] == paths.teacher_hashes(base)["tokenizer"]

    try:
        results = labelling.label_shards(cfg, names)
    finally:
        engines.close_engine(tuned_run)  # the session's engine (the first member) stays
    # adding a teacher labels only that teacher: the first member's shards were cache hits
    assert all(r["members"][0]["cache_hit"] and not r["members"][1]["cache_hit"] for r in results.values())
    assert all(not r["cache_hit"] for r in results.values())
    assert labelling.check_shards(cfg, names)["problems"] == []

    train = labelling.open_split(cfg, "train")
    meta = train[0].meta
    assert (meta.kind, meta.slots) == ("mixture", 2 * TINY_K) and meta.teacher.startswith("ensemble:")
    members = meta.settings["ensemble"]
    assert [m["weight"] for m in members] == [0.25, 0.75]
    assert members[0]["weights_hash"] == paths.teacher_hashes(base)["weights"]
    assert (
        members[1]["weights_hash"] == paths.teacher_hashes(tuned_run)["weights"]
        and members[1]["finetune"]["steps"] == 3
    )

    # the stored mixture is the mixture of the members' stored labels
    store = paths.label_store(cfg)
    name = meta.shard
    a = store.open(members[0]["cache_key"])
    b = store.open(members[1]["cache_key"])
    assert a.meta.teacher_hash != b.meta.teacher_hash
    cols = ("teacher_ids", "teacher_logprobs", "rest_mass", "target_logprobs")
    disagree = 0
    for x, y, m in zip(_rows(a), _rows(b), _rows(train[0])):
        n = len(x["rest_mass"])
        want = mix([{c: x[c] for c in cols}, {c: y[c] for c in cols}], [0.25, 0.75])
        got = m["teacher_logprobs"].reshape(n, 2 * TINY_K)
        live = np.isfinite(want["teacher_logprobs"])
        np.testing.assert_array_equal(np.isfinite(got), live)
        np.testing.assert_array_equal(m["teacher_ids"].reshape(n, -1)[live], want["teacher_ids"][live])
        np.testing.assert_allclose(m["target_logprobs"], want["target_logprobs"], atol=1e-3)
        disagree += int((live.sum(1) > TINY_K).sum())
    assert disagree > 0, f"{name}: the fine-tuned teacher's top-k differs from the base's somewhere"

    again = labelling.label_shards(cfg, names, engine_factory=lambda: pytest.fail("no engine for cached labels"))
    assert all(r["cache_hit"] for r in again.values())

    student = training.train_student(cfg)
    assert student["steps"] == cfg.train.steps and np.isfinite(student["final_loss"])
    assert paths.student_dir(cfg, False) != paths.student_dir(base, False)


def test_ensemble_members_must_share_a_tokenizer(tiny_config, teacher_dir, tmp_path):
    other = tmp_path / "other-teacher"
    other.mkdir()
    for f in teacher_dir.iterdir():
        if f.is_file() and not f.name.startswith("."):
            if f.suffix == ".safetensors":
                os.symlink(f, other / f.name)
            else:
                shutil.copyfile(f, other / f.name)
    config = (other / "tokenizer_config.json").read_text()
    (other / "tokenizer_config.json").write_text(
        config.replace("{", '{"model_max_length_note": "another tokenizer",', 1)
    )
    cfg = dataclasses.replace(
        tiny_config,
        teacher=dataclasses.replace(
            tiny_config.teacher, models=(TeacherMember(str(teacher_dir)), TeacherMember(str(other)))
        ),
    )
    with pytest.raises(ConfigError, match="does not share the first member's tokenizer"):
        labelling.prepare_teacher(cfg)


def test_ensemble_config_is_checked():
    with pytest.raises(ConfigError, match="not both"):
        from_mapping({"teacher": {"model": "a", "models": [{"model": "a"}, {"model": "b"}]}})
    with pytest.raises(ConfigError, match=r"teacher\.models\[1\].*weight"):
        from_mapping({"teacher": {"models": [{"model": "a"}, {"model": "b", "weight": 0}]}})
    with pytest.raises(ConfigError, match="score mode"):
        from_mapping({"teacher": {"mode": "generate", "models": [{"model": "a"}, {"model": "b"}]}})
    cfg = from_mapping({"teacher": {"models": [{"model": "a"}, {"model": "b", "finetune": {"steps": 10}}]}})
    assert cfg.teacher.ensemble and cfg.teacher.members[1].finetune.steps == 10
