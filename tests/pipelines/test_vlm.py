"""Image teachers end to end on the real engine: a tiny vision-language teacher built from the
bundled text teacher (``teacher.vision``), a corpus of image questions read from a local folder with
a JSON Lines file (``synthetic_shapes``), score-mode labels from the device labeller, the student
and its baseline, and the evaluation with answer accuracy, all through the Dagster graph; then
generate-mode labels of the same images, and the student in transformers and in vLLM."""

from __future__ import annotations

import dataclasses

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from distill.config import load_config
from distill.data import image_store, read_corpus_shard
from distill.run import engines, labelling, paths, training
from distill.teacher.config import EngineConfig, SamplingConfig
from distill.teacher.vllm_engine import VllmTeacher
from distill.vision import pixel_inputs, prompt_with_span
from tests.conftest import TINY_K, TINY_WINDOW

TINY_VISION = {
    "steps": 2,
    "train_examples": 8,
    "eval_examples": 8,
    "vision_layers": 1,
    "vision_hidden": 64,
    "vision_heads": 2,
    "batch_size": 4,
}


@pytest.fixture(scope="module")
def vlm_config_path(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("vlm")
    config = {
        "storage_root": str(root / "data"),
        "teacher": {"model": str(teacher_dir), "k": TINY_K, "vision": TINY_VISION},
        "corpus": {
            "source": "synthetic_shapes",
            "max_documents": 16,
            "window": TINY_WINDOW,
            "train_shards": 1,
            "heldout_shards": 1,
            "heldout_fraction": 0.3,
        },
        "student": {"num_layers": 2},
        "train": {"steps": 2, "batch_size": 4, "progress": False},
        "eval": {"batch_size": 8},
    }
    path = root / "vlm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def vlm_materialized(vlm_config_path):
    """The whole graph on the tiny image config, in-process; its engines closed however the module ends."""
    from pipelines.definitions import build_definitions
    from pipelines.run import materialize_all

    cfg = load_config(vlm_config_path)
    defs = build_definitions(str(vlm_config_path), keep_engine_alive=True)
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = materialize_all(defs, instance, cfg.corpus.shard_names())
        yield cfg, instance, result
    finally:
        if cfg.teacher.vision is not None and (paths.vision_teacher_dir(cfg) / "model").exists():
            engines.close_engine(cfg)


def _meta(instance, key):
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was not materialized"
    return event.asset_materialization.metadata


def test_graph_labels_trains_and_evaluates_image_questions(vlm_materialized):
    cfg, instance, result = vlm_materialized
    teacher = _meta(instance, "teacher_model")
    assert teacher["architecture"].value == "Idefics3ForConditionalGeneration"
    assert 0.0 <= teacher["vision_accuracy"].value <= 1.0 and 0 < teacher["vision_chance"].value < 1
    # every label row names its image, and the image store holds those exact bytes
    store = image_store(cfg.root)
    for split in ("train", "heldout"):
        for shard in labelling.open_split(cfg, split):
            assert shard.meta.images
            hashes = pq.read_table(shard.path, columns=["image"]).column("image").to_pylist()
            assert hashes and all(len(h) == 64 for h in hashes)
            for h in set(hashes):
                assert store.open(h).size == (64, 64)
    assert labelling.check_shards(cfg, cfg.corpus.shard_names())["problems"] == []
    # relabelling is all cache hits: no engine work
    assert all(r["cache_hit"] for r in labelling.label_shards(cfg, cfg.corpus.shard_names()).values())
    summary = _meta(instance, "evaluation")["summary"].value
    for name in ("teacher_acc=", "student_acc=", "baseline_acc="):
        assert name in summary, summary
    table = _meta(instance, "evaluation")["table"].value
    assert "answer accuracy" in table
    assert [c.check_name for c in result.get_asset_check_evaluations()] == ["distillation_gate"]


def test_student_loads_in_transformers_and_vllm(vlm_materialized):
    cfg, _, _ = vlm_materialized
    student = paths.student_dir(cfg, False) / "model"
    model = AutoModelForImageTextToText.from_pretrained(student, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(student)
    assert model.config.text_config.num_hidden_layers == cfg.student.num_layers
    from distill.synthetic import examples

    image, question, _ = examples(1, seed=7)[0]
    ids, span = prompt_with_span(processor, image, question)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **pixel_inputs(processor, [image])).logits
    assert logits.shape == (1, len(ids), model.config.text_config.vocab_size) and torch.isfinite(logits).all()
    engine = VllmTeacher(student, k=TINY_K, max_len=TINY_WINDOW, cfg=EngineConfig(labeller="logprobs"))
    try:
        (answer,) = next(
            engine.generate([ids], [0], SamplingConfig(temperature=0.0, max_tokens=4), images=[(image, span)])
        )
        # greedy: the engine's first answer token is the transformers model's most likely one
        assert len(answer["response_ids"]) <= 4 and int(answer["response_ids"][0]) == int(logits[0, -1].argmax())
        # the engine's distribution of the prompt's last position is the transformers model's
        scored = next(engine.score([ids + [int(answer["response_ids"][0])]], [len(ids) - 1], images=[(image, span)]))
        top = torch.log_softmax(logits[0, -1].double(), -1).topk(TINY_K)
        assert scored["topk_ids"][0].tolist() == top.indices.tolist()
        assert np.allclose(scored["topk_logprobs"][0], top.values.numpy(), atol=2e-3)
    finally:
        engine.close()


def test_generate_mode_labels_teacher_answers_to_images(vlm_materialized):
    cfg, _, _ = vlm_materialized
    gen = dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, mode="generate", sampling=SamplingConfig(max_tokens=4))
    )
    manifest = labelling.prepare_corpus(gen)
    name = "heldout-00000"
    try:
        result = labelling.label_shards(gen, [name])[name]
    finally:
        engines.close_engine(gen)
    assert not result["cache_hit"] and result["rows"] == manifest["shards"][name]["windows"]
    (shard,) = labelling.open_split(gen, "heldout")
    table = pq.read_table(shard.path, columns=["image", "prompt_text", "response_text", "label_start", "input_ids"])
    assert all(t for t in table.column("prompt_text").to_pylist())
    corpus = read_corpus_shard(gen.root, gen.corpus, paths.teacher_hashes(gen)["tokenizer"], name, "generate")[1]
    assert table.column("image").to_pylist() == corpus.column("image").to_pylist()
    for ids, start in zip(table.column("input_ids").to_pylist(), table.column("label_start").to_pylist()):
        assert len(ids) - 1 - start >= 1  # at least one answer token labelled


def test_image_corpus_from_a_folder_and_a_datasets_image_column(vlm_materialized, tmp_path):
    import json

    import datasets

    from distill.corpus import build_corpus
    from distill.data import CorpusError
    from distill.synthetic import examples, write_dataset

    cfg, _, _ = vlm_materialized
    teacher = paths.teacher_dir(cfg)
    processor, tokenizer = AutoProcessor.from_pretrained(teacher), labelling.teacher_tokenizer(cfg)
    token_hash = paths.teacher_hashes(cfg)["tokenizer"]
    questions = write_dataset(tmp_path / "shapes", 6, seed=3)
    folder = questions.parent
    (folder / "images" / "cut.png").write_bytes((folder / "images").glob("*.png").__next__().read_bytes()[:-40])
    (folder / "notes.txt").write_text("not a picture")
    with open(questions, "a") as fh:
        for i, image in enumerate(("images/cut.png", "notes.txt")):
            fh.write(
                json.dumps({"id": f"bad{i}", "image": image, "prompt": "What colour is the shape?", "response": "red"})
                + "\n"
            )
    corpus = dataclasses.replace(
        cfg.corpus, source=str(questions), id_column="id", max_documents=None, heldout_fraction=0.3
    )
    with pytest.raises(CorpusError, match=r"questions.jsonl:7 \(document id 'bad0'\): column 'image'.*unreadable"):
        build_corpus(corpus, tokenizer, token_hash, tmp_path / "a", processor=processor)
    assert not list((tmp_path / "a").rglob("*.parquet")), "no corpus shard written before the error"
    skipping = dataclasses.replace(corpus, bad_images="skip")
    manifest = build_corpus(skipping, tokenizer, token_hash, tmp_path / "b", processor=processor)
    assert manifest["dropped_bad_image"] == 2 and manifest["documents"] == 6
    # a datasets Image column (stored in Parquet as bytes): the same rows, keyed by the same hashes
    items = examples(4, seed=5)
    table = datasets.Dataset.from_dict(
        {
            "id": [f"q{i}" for i in range(4)],
            "image": [image for image, _, _ in items],
            "prompt": [q for _, q, _ in items],
            "response": [a for _, _, a in items],
        }
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "shapes.parquet"))
    from_column = dataclasses.replace(corpus, source=str(tmp_path / "shapes.parquet"), heldout_fraction=0.5)
    manifest = build_corpus(from_column, tokenizer, token_hash, tmp_path / "c", processor=processor)
    assert manifest["documents"] == 4 and manifest["dropped_bad_image"] == 0
    store = image_store(tmp_path / "c")
    assert len(list(store.root.rglob("*"))) >= 4


def test_labels_on_s3_carry_their_images_to_a_machine_without_them(vlm_materialized, s3_server, tmp_path):
    """``labels_uri`` on an object store: labelling copies each shard's images beside the labels
    (``<labels_uri>/images``) before the shard is committed, once; a machine with the teacher and
    the corpus manifests but no image store of its own trains from the labels and those images."""
    cfg, _, _ = vlm_materialized
    remote = dataclasses.replace(cfg, labels_uri=s3_server)
    names = cfg.corpus.shard_names()
    results = labelling.label_shards(remote, names)
    local = image_store(cfg.root)
    token_hash = paths.teacher_hashes(cfg)["tokenizer"]
    hashes = {
        name: set(read_corpus_shard(cfg.root, cfg.corpus, token_hash, name)[1].column("image").to_pylist())
        for name in names
    }
    beside = paths.run_images(remote)
    assert beside.display_location == "s3://labels/run/images"
    copied = [results[name]["images_copied"] for name in names]
    assert sum(copied) == len(set.union(*hashes.values())) and all(not r["cache_hit"] for r in results.values())
    for digest in set.union(*hashes.values()):
        assert beside.read(digest) == local.read(digest)
    again = labelling.label_shards(remote, names)
    assert all(r["cache_hit"] and "images_copied" not in r for r in again.values())
    # another machine: the teacher and the corpus manifests, no images
    node = dataclasses.replace(remote, storage_root=str(tmp_path / "node"))
    node.root.mkdir(parents=True)
    for part in ("models", "corpus"):
        (node.root / part).symlink_to(cfg.root / part)
    summary = training.train_student(node)
    assert summary["steps"] == cfg.train.steps and not (node.root / "images").exists()
    assert (paths.student_dir(node, False) / "model" / "processor_config.json").exists()
