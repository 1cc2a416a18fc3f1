"""Teacher features on the real engine (the bundled teacher under vLLM's CPU engine): what the
device labeller captures equals a transformers forward's hidden states through the same
projection, within the quantization step; capturing features leaves the labels as they were; and
labelled shards with features train a student with the feature term, end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from storage.codec import decode_features

LAYERS = (0, 15, 30)  # the embeddings, a middle layer, the last layer's output after the final norm
DIM = 64


@pytest.fixture(scope="module")
def features_config(tiny_config):
    from distill.teacher.config import FeaturesConfig

    teacher = dataclasses.replace(tiny_config.teacher, features=FeaturesConfig(layers=LAYERS, dim=DIM, seed=3))
    train = dataclasses.replace(tiny_config.train, feature_weight=1.0, steps=4)
    return dataclasses.replace(tiny_config, teacher=teacher, train=train)


@pytest.fixture(scope="module")
def features_engine(features_config, engine):
    """An engine started with feature capture (closed at the end of this module; the session's
    ``engine`` stays)."""
    from distill.run import engines
    from tests.conftest import SessionEngine

    eng = SessionEngine(features_config)
    eng.current()
    yield eng
    engines.close_engine_of(features_config)


def test_captured_features_equal_transformers_hidden_states_through_the_projection(features_engine, engine, hf_teacher):
    from distill.teacher.features import orthogonal_projection

    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 49152, 40).tolist(), rng.integers(0, 49152, 64).tolist(), [1, 2]]
    starts = [0, 10, 0]
    got = list(features_engine.score(windows, starts, k=8, features=True))
    plain = list(engine.score(windows, starts, k=8))
    projection = orthogonal_projection(hf_teacher.config.hidden_size, DIM, seed=3)
    for ids, start, row, labels in zip(windows, starts, got, plain):
        n = len(ids) - 1 - start
        assert row["feature_codes"].shape == (n, len(LAYERS), DIM) and row["feature_scales"].shape == (n, 3)
        for name in ("topk_ids", "topk_logprobs", "target_logprobs", "tail_mass"):  # capture changes no label
            np.testing.assert_array_equal(row[name], labels[name])
        with torch.no_grad():
            states = hf_teacher(torch.tensor([ids]), output_hidden_states=True).hidden_states
        reference = (torch.stack([states[x][0] for x in LAYERS], dim=1)[start : len(ids) - 1] @ projection).numpy()
        decoded = decode_features(row["feature_scales"], row["feature_codes"])
        # half a quantization step, plus what separates vLLM's float32 forward from transformers'
        bound = row["feature_scales"][..., None] / 2 + 1e-4 * np.abs(reference).max(axis=-1, keepdims=True)
        assert (np.abs(decoded - reference) <= bound).all(), np.abs(decoded - reference).max()
        assert (row["feature_scales"] > 0).all()
    with pytest.raises(ValueError, match="teacher features asked of an engine started without them"):
        list(engine.score(windows, starts, k=8, features=True))


def test_labelled_shards_carry_features_and_train_a_student_with_the_feature_term(features_config, features_engine):
    from distill.run import labelling, training
    from distill.run.paths import student_dir
    from distill.train.features import HEADS_FILE

    cfg = features_config
    labelling.prepare_teacher(cfg)
    labelling.prepare_corpus(cfg)
    names = cfg.corpus.shard_names()
    results = labelling.label_shards(cfg, names, engine_factory=features_engine.current)
    assert all(not r["cache_hit"] for r in results.values())  # features are keyed: no plain shard is reused
    for split in ("train", "heldout"):
        for shard in labelling.open_split(cfg, split):
            assert shard.meta.features == cfg.teacher.feature_params
            assert shard.meta.features["layers"] == list(LAYERS)
    assert labelling.check_shards(cfg, names)["problems"] == []
    summary = training.train_student(cfg)
    assert np.isfinite(summary["final_feat"]) and summary["final_feat"] > 0
    out = student_dir(cfg, False)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all("feat" in h for h in history)
    assert (out / HEADS_FILE).exists() and not (out / "model" / HEADS_FILE).exists()
    baseline = training.train_student(cfg, baseline=True)
    assert "final_feat" not in baseline  # the CE-only baseline never uses the features
