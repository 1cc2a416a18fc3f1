"""Teacher features: the seeded orthogonal projection of hidden states, the quantizer the engine
runs on its device and the codec that reads it back, their packing through the device labeller,
the features companion kind in a shard, and the config errors."""

import os

import numpy as np
import pytest
import torch

from distill.teacher.features import orthogonal_projection, project, quantize
from distill.teacher.vllm_labeller import FeatureCapture, feature_width, unpack, width
from storage.codec import decode_features


def test_projection_is_orthonormal_and_reproducible():
    p = orthogonal_projection(576, 256, seed=3)
    assert p.shape == (576, 256) and p.dtype == torch.float32
    torch.testing.assert_close(p.T @ p, torch.eye(256), atol=1e-5, rtol=0)
    assert torch.equal(p, orthogonal_projection(576, 256, seed=3))
    assert not torch.equal(p, orthogonal_projection(576, 256, seed=4))
    # a vector in the projection's span keeps its norm; a random one keeps about dim / H of its square
    x = p @ torch.randn(256, generator=torch.Generator().manual_seed(0))
    assert project(x, p).norm().item() == pytest.approx(x.norm().item(), rel=1e-5)
    h = torch.randn(2000, 576, generator=torch.Generator().manual_seed(1))
    share = (project(h, p).norm(dim=-1) ** 2 / h.norm(dim=-1) ** 2).mean().item()
    assert share == pytest.approx(256 / 576, rel=0.02)


def test_projection_refuses_a_dim_above_the_hidden_size_and_mismatched_states():
    with pytest.raises(ValueError, match=r"dim=600 must be in \[1, 576\]"):
        orthogonal_projection(576, 600)
    with pytest.raises(ValueError, match="hidden states of size 64 for a projection from 576"):
        project(torch.zeros(3, 64), orthogonal_projection(576, 8))


def test_feature_codec_round_trips_within_half_a_step_in_260_bytes_per_position():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 256, generator=g) * torch.empty(64, 3, 1).uniform_(0.01, 50, generator=g)
    x[5, 1] = 0.0  # an all-zero position
    scales, codes = quantize(x)
    assert scales.dtype == torch.float32 and codes.dtype == torch.int8 and codes.shape == x.shape
    back = decode_features(scales.numpy(), codes.numpy())
    assert (np.abs(back - x.numpy()) <= scales.numpy()[..., None] / 2 * (1 + 1e-6) + 1e-30).all()
    assert (back[5, 1] == 0).all() and scales[5, 1] == 0
    assert codes.abs().amax(dim=-1)[scales > 0].eq(127).all()  # each vector uses the whole range
    assert (scales.element_size() + codes.shape[-1] * codes.element_size()) == 260  # bytes per position and layer
    assert not torch.isfinite(quantize(torch.tensor([[1.0, float("inf")]]))[0]).all()  # the writer refuses it


@pytest.mark.parametrize("dim", [8, 10])
def test_features_pack_after_the_labels_and_unpack_exactly(dim):
    """What the pooler appends to a request's labels: per layer the scale's bits and the int8
    codes four to a column (padded when dim is not a multiple of 4); ``unpack`` reads them back."""
    g = torch.Generator().manual_seed(1)
    capture = FeatureCapture([0, 2, 3], dim, seed=5, num_layers=3, hidden_size=16)
    hidden = torch.randn(7, 16, generator=g)  # the pooler's input: the last layer, after the norm
    capture.aux = [torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)]  # layers 0 and 2, padded rows
    packed = capture.packed(hidden)
    assert packed.shape == (7, feature_width(3, dim)) and packed.dtype == torch.int32
    labels = torch.zeros(7, width(2, 0), dtype=torch.int32)
    out = unpack(torch.cat([labels, packed], dim=1).numpy(), 2, 0, (3, dim))
    states = torch.stack([capture.aux[0][:7], capture.aux[1][:7], hidden], dim=1) @ capture.projection
    scales, codes = quantize(states)
    np.testing.assert_array_equal(out["feature_scales"], scales.numpy())
    np.testing.assert_array_equal(out["feature_codes"], codes.numpy())
    assert out["topk_ids"].shape == (7, 2)


# -- the features companion kind in a shard ----------------------------------------------------------

FEATURES = {"layers": [3, 7], "dim": 12, "projection": "orthogonal", "seed": 0, "dtype": "int8"}


def with_features(rows, params=FEATURES, seed=0):
    """Rows of ``make_rows`` with stored features made by the device's quantizer."""
    g = torch.Generator().manual_seed(seed)
    layers, dim = len(params["layers"]), params["dim"]
    for r in rows:
        n = len(r["target_logprobs"])
        scales, codes = quantize(torch.randn(n, layers, dim, generator=g) * 3)
        r["feature_scales"], r["feature_codes"] = scales.numpy().reshape(-1), codes.numpy().reshape(-1)
    return rows


def test_shard_with_features_round_trips_and_refuses_bad_rows(tmp_path):
    from storage.reader import decode_row_group, open_shard
    from storage.writer import ShardWriter
    from tests.storage.test_shards import make_meta, make_rows

    rows = with_features(make_rows(20, 49152, 4))
    meta = make_meta(k=4, features=FEATURES)
    with ShardWriter(tmp_path / "s.parquet", meta, row_group_rows=8) as w:
        w.write_many(rows)
    shard = open_shard(tmp_path / "s.parquet", expect={"features": FEATURES})
    assert shard.meta.features == FEATURES
    pf = shard.parquet()
    decoded = [r for g in range(pf.num_row_groups) for r in decode_row_group(shard, pf.read_row_group(g))]
    got = {(r["doc_id"], r["window_index"]): r for r in decoded}
    assert len(got) == len(rows)
    for r in rows:
        want = decode_features(r["feature_scales"], r["feature_codes"].reshape(-1, 12)).reshape(-1)
        np.testing.assert_array_equal(got[(r["doc_id"], r["window_index"])]["teacher_features"], want)
    with ShardWriter(tmp_path / "plain.parquet", make_meta(k=4)) as w:
        w.write_many(make_rows(3, 49152, 4))
    with pytest.raises(ValueError, match="field 'features' is {} but the run expects"):
        open_shard(tmp_path / "plain.parquet", expect={"features": FEATURES})
    bad = with_features(make_rows(2, 49152, 4, seed=3, length=(8, 9)))
    bad[1]["feature_codes"] = bad[1]["feature_codes"][:-1]
    with pytest.raises(ValueError, match=r"s2.parquet: row doc-0#1: feature_scales holds .* expected"):
        with ShardWriter(tmp_path / "s2.parquet", meta) as w:
            w.write_many(bad)
    assert not (tmp_path / "s2.parquet").exists()
    bad = with_features(make_rows(2, 49152, 4, seed=3, length=(8, 9)))
    bad[0]["feature_scales"][0] = np.inf
    with pytest.raises(ValueError, match="feature_scales must be finite"):
        with ShardWriter(tmp_path / "s3.parquet", meta) as w:
            w.write_many(bad)


# -- the loss, the layer maps and the config --------------------------------------------------------


def test_feature_distance_matches_its_formulas():
    from distill.train.losses import feature_distance

    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g) * 40
    pn, tn = p.double().numpy(), t.double().numpy()
    mse = ((pn - tn) ** 2).sum(-1) / (tn**2).sum(-1)
    np.testing.assert_allclose(feature_distance(p, t, "mse").numpy(), mse, rtol=1e-5)
    cos = (pn * tn).sum(-1) / np.linalg.norm(pn, axis=-1) / np.linalg.norm(tn, axis=-1)
    np.testing.assert_allclose(feature_distance(p, t, "cosine").numpy(), 1 - cos, rtol=1e-5, atol=1e-6)
    assert feature_distance(torch.zeros(16), t[0, 0], "mse").item() == pytest.approx(1.0)  # scale-free
    assert feature_distance(t[0, 0] * 3, t[0, 0], "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert feature_distance(t[0, 0], torch.zeros(16), "mse").item() == pytest.approx(float((t[0, 0] ** 2).sum()))


def test_feature_pairs_default_and_errors():
    from distill.configbase import ConfigError
    from distill.train.features import feature_pairs

    assert feature_pairs((), [10, 20, 30], 30, 4, "s") == ((1, 0), (3, 1), (4, 2))
    assert feature_pairs(((2, 20),), [10, 20], 30, 4, "s") == ((2, 1),)
    with pytest.raises(ConfigError, match=r"maps teacher layer 15, but s stores teacher layers \[10, 20\]"):
        feature_pairs(((2, 15),), [10, 20], 30, 4, "s")
    with pytest.raises(ConfigError, match=r"maps student layer 6, but the student has layers 0..4"):
        feature_pairs(((6, 20),), [10, 20], 30, 4, "s")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"teacher": {"features": {"layers": []}}}, r"teacher\.features\.layers=\[\] is invalid"),
        ({"teacher": {"features": {"layers": [3, 3]}}}, r"features\.layers=\[3, 3\] is invalid"),
        ({"teacher": {"features": {"layers": [3], "dtype": "fp4"}}}, r"features\.dtype='fp4' is invalid"),
        ({"teacher": {"features": {"layers": [3], "projection": "pca"}}}, r"features\.projection='pca'"),
        ({"train": {"feature_weight": 1.0}}, r"train\.feature_weight=1\.0 needs teacher\.features"),
        (
            {"teacher": {"features": {"layers": [3]}}, "student": {"feature_layers": [[1, 4]]}},
            r"maps teacher layer 4, which teacher\.features\.layers=\[3\] does not capture",
        ),
        (
            {"teacher": {"features": {"layers": [3]}}, "student": {"feature_layers": [[9, 3]]}},
            r"student layers in \[0, 4\]",
        ),
        (
            {"teacher": {"features": {"layers": [3]}, "engine": {"labeller": "logprobs"}}},
            r"teacher\.engine\.labeller: device",
        ),
        ({"teacher": {"features": {"layers": [3]}, "mode": "generate"}}, r"teacher\.mode: score, not 'generate'"),
        (
            {"teacher": {"features": {"layers": [3]}}, "student": {"init": "random", "tokenizer": "bpe:400"}},
            r"teacher\.features needs a student with the teacher's tokenizer",
        ),
    ],
)
def test_feature_settings_are_config_errors_naming_the_field(data, match):
    from distill.config import from_mapping
    from distill.configbase import ConfigError

    with pytest.raises(ConfigError, match=match):
        from_mapping(data)


def test_teacher_layers_and_dim_are_checked_against_the_teacher():
    from distill.config import check_against_teacher, from_mapping
    from distill.configbase import ConfigError

    teacher = {"num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152, "max_position_embeddings": 8192}
    ok = from_mapping({"teacher": {"features": {"layers": [0, 30], "dim": 576}}})
    check_against_teacher(ok, teacher)
    ok_cfg = from_mapping({"teacher": {"features": {"layers": [10, 31]}}})
    with pytest.raises(ConfigError, match=r"teacher\.features\.layers=\[10, 31\]: the teacher has 30 layers"):
        check_against_teacher(ok_cfg, teacher)
    with pytest.raises(ConfigError, match=r"teacher\.features\.dim=600 exceeds the teacher's hidden size \(576\)"):
        check_against_teacher(from_mapping({"teacher": {"features": {"layers": [3], "dim": 600}}}), teacher)


def test_features_are_keyed_and_the_baseline_never_uses_them():
    from distill.config import from_mapping
    from distill.teacher.labels import shard_key

    hashes = {"weights": "w", "tokenizer": "t"}
    plain = from_mapping({})
    feats = from_mapping({"teacher": {"features": {"layers": [3, 1]}}, "train": {"feature_weight": 0.5}})
    other = from_mapping({"teacher": {"features": {"layers": [1, 3], "seed": 1}}})
    keys = {shard_key(hashes, "fp", c.teacher, "float32") for c in (plain, feats, other)}
    assert len(keys) == 3
    same = from_mapping({"teacher": {"features": {"layers": [1, 3]}}})  # the order of layers is not a setting
    assert shard_key(hashes, "fp", same.teacher, "float32") == shard_key(hashes, "fp", feats.teacher, "float32")
    assert feats.baseline_train.feature_weight == 0.0 and feats.baseline_train.kd_weight == 0.0


def write_feature_shards(folder) -> list:
    from storage.reader import open_shard
    from storage.writer import ShardWriter
    from tests.storage.test_shards import make_meta, make_rows

    for s in range(2):
        rows = with_features(make_rows(16, 49152, 4, seed=s, length=(10, 33)), seed=s)
        for r in rows:
            r["doc_id"] = f"s{s}-{r['doc_id']}"
        meta = make_meta(k=4, shard=f"train-{s:05d}", features=FEATURES)
        with ShardWriter(folder / f"shard{s}.parquet", meta, row_group_rows=4) as w:
            w.write_many(rows)
    return [open_shard(folder / f"shard{s}.parquet") for s in range(2)]


def test_feature_maps_train_resume_exactly_and_stay_out_of_the_export(tmp_path, teacher_dir):
    """4 steps in one go, and 2 + 2 with a stop (as a crash) in between: the same student, the same
    maps, the same history; the maps are saved beside the model, which loads without them."""
    import dataclasses
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distill.train.features import HEADS_FILE
    from distill.train.trainer import train
    from tests.distill.features_worker import STUDENT as student
    from tests.distill.features_worker import config
    from tests.distill.train_worker import TINY_STUDENT

    shards = write_feature_shards(tmp_path)
    cfg = config()
    full = train(student, cfg, teacher_dir, shards, tmp_path / "a", 49152)
    train(student, cfg, teacher_dir, shards, tmp_path / "b", 49152, stop_after=2)
    assert not (tmp_path / "b" / HEADS_FILE).exists() and not (tmp_path / "b" / "model").exists()
    assert (tmp_path / "b" / "checkpoints" / "step-00000002" / HEADS_FILE).exists()
    resumed = train(student, cfg, teacher_dir, shards, tmp_path / "b", 49152)
    for name in ("model/model.safetensors", HEADS_FILE):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"

    def history_of(run):  # peak memory is the process's, not the run's
        lines = (tmp_path / run / "history.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "peak_memory_mib"} for line in lines]

    history = history_of("a")
    assert history == history_of("b")
    assert all(np.isfinite(h["feat"]) and h["feat"] > 0 for h in history)
    assert full["final_feat"] == resumed["final_feat"] == history[-1]["feat"]
    heads = load_file(tmp_path / "a" / HEADS_FILE)
    assert {k: tuple(v.shape) for k, v in heads.items()} == {"maps.0.weight": (12, 32), "maps.1.weight": (12, 32)}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / HEADS_FILE), "pt") as f:
        assert json.loads(f.metadata()["feature_layers"]) == [[0, 3], [1, 7]]
    exported = load_file(tmp_path / "a" / "model" / "model.safetensors")
    assert not any("maps" in k for k in exported)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model", use_safetensors=True)
    assert model.config.num_hidden_layers == 1
    # a checkpoint saved without maps does not resume a run with them
    plain = dataclasses.replace(cfg, feature_weight=0.0, steps=6)
    train(TINY_STUDENT, dataclasses.replace(plain, steps=2), teacher_dir, shards, tmp_path / "c", 49152, stop_after=2)
    with pytest.raises(ValueError, match="saved without feature maps"):
        train(student, dataclasses.replace(cfg, steps=6), teacher_dir, shards, tmp_path / "c", 49152)


def test_feature_maps_train_under_torchrun_ddp_and_fsdp_alike(tmp_path, teacher_dir):
    """Two ranks: the maps sit outside the DDP or FSDP wrapper and their gradients are all-reduced
    by the step; both strategies see the same data and give the same losses and maps."""
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from distill.train.features import HEADS_FILE
    from tests.processes import run_group

    repo = Path(__file__).resolve().parents[2]
    write_feature_shards(tmp_path)
    torchrun = Path(sys.executable).parent / "torchrun"
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TRAIN_STRATEGY": strategy}
        cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "tests.distill.features_worker"]
        done = run_group([*cmd, str(tmp_path), str(out), str(teacher_dir)], timeout=600, cwd=repo, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        runs[strategy] = (history, load_file(out / HEADS_FILE))
        assert len(history) == 4 and all(np.isfinite(h["feat"]) for h in history)
        assert (out / "checkpoints" / "step-00000004" / HEADS_FILE).exists()
    for a, b in zip(runs["ddp"][0], runs["fsdp"][0]):
        for name in ("loss", "ce", "kd", "feat"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), (name, a, b)
    for name, weight in runs["ddp"][1].items():
        torch.testing.assert_close(weight, runs["fsdp"][1][name], rtol=1e-4, atol=1e-6)
