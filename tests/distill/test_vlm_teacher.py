"""The synthetic image task (``distill.synthetic``) and the vision-language teacher built on it
(``distill.teacher.vlm``): answers agree with what is drawn, and a tiny built teacher reloads under
plain transformers as the model that was measured."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from distill import synthetic
from distill.teacher.config import VisionTeacherConfig
from distill.vision import CHAT_TEMPLATE, prompt_ids


def _mask(image: Image.Image) -> np.ndarray:
    """Pixels that are not background (the corner pixel's shade: no shape reaches a corner)."""
    pixels = np.asarray(image).astype(int)  # (S, S, 3)
    return (pixels != pixels[0, 0]).any(-1)


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected regions of True pixels."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start], queue = True, deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def _shape_of(mask: np.ndarray) -> str:
    """The shape from its silhouette: how much of its bounding box it fills, and top against bottom."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    if fill > 0.92:
        return "square"
    if fill > 0.7:
        return "circle"
    top, bottom = box[: len(box) // 2].sum(), box[len(box) - len(box) // 2 :].sum()
    return "triangle" if bottom > 1.5 * top else "cross"


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_answers_match_the_drawing(kind):
    rng = np.random.default_rng(7)
    for _ in range(40):
        image, question, answer = synthetic.make_example(rng, 64, kind=kind)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert synthetic.kind_of(question) == kind and answer in synthetic.ANSWERS[kind]
        mask = _mask(image)
        if kind == "colour":
            mean = np.asarray(image)[mask].mean(0)
            nearest = min(synthetic.COLOURS, key=lambda c: np.sum((np.array(synthetic.COLOURS[c]) - mean) ** 2))
            assert nearest == answer
        elif kind == "shape":
            assert _shape_of(mask) == answer
        elif kind == "count":
            assert _components(mask) == synthetic.COUNTS.index(answer) + 1
        else:
            ys, xs = np.nonzero(mask)
            dy, dx = ys.mean() - 31.5, xs.mean() - 31.5  # from the image's centre; y grows downwards
            side = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top")
            assert side == answer


def test_examples_are_deterministic_per_seed_and_stream():
    def key(examples):
        return [(np.asarray(im).tobytes(), q, a) for im, q, a in examples]

    first = key(synthetic.examples(30, seed=3))
    assert first == key(synthetic.examples(30, seed=3))
    assert first != key(synthetic.examples(30, seed=4))
    assert first != key(synthetic.examples(30, seed=3, stream=synthetic.STREAM_TEACHER_TRAIN))
    kinds = {synthetic.kind_of(q) for _, q, _ in synthetic.examples(200, seed=0)}
    assert kinds == set(synthetic.KINDS)
    assert synthetic.CHANCE == {"colour": 1 / 6, "shape": 1 / 4, "count": 1 / 4, "position": 1 / 4}
    with pytest.raises(ValueError, match="not a question"):
        synthetic.kind_of("What is this?")


def test_write_dataset(tmp_path):
    folder = tmp_path / "shapes"
    jsonl = synthetic.write_dataset(folder, n=12, seed=5)
    assert jsonl == folder / "questions.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    for row, (image, question, answer) in zip(rows, synthetic.examples(12, seed=5)):
        with Image.open(jsonl.parent / row["image"]) as stored:
            assert stored.size == (64, 64)
            assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(image))  # PNG is lossless
        assert (row["prompt"], row["response"], row["kind"]) == (question, answer, synthetic.kind_of(question))
    written = jsonl.stat().st_mtime_ns
    assert synthetic.write_dataset(folder, n=12, seed=5) == jsonl and jsonl.stat().st_mtime_ns == written  # reused
    with pytest.raises(ValueError, match="remove it or write to another folder"):
        synthetic.write_dataset(folder, n=13, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary folder left


def test_built_teacher_reloads_as_measured(tmp_path, teacher_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from distill.teacher import vlm

    cfg = VisionTeacherConfig(
        vision_layers=1, vision_hidden=32, vision_heads=2, train_examples=16, eval_examples=8, steps=3, batch_size=4
    )
    out = tmp_path / "vlm"
    summary = vlm.build_vlm(teacher_dir, cfg, out, progress=False)
    assert json.loads((out / vlm.VLM_INFO).read_text()) == summary
    assert 0 <= summary["accuracy"] <= 1 and summary["examples"] == 8 and len(summary["losses"]) == 3
    assert summary["per_kind_chance"] == {k: synthetic.CHANCE[k] for k in summary["per_kind"]}
    kinds = [synthetic.kind_of(question) for _, question, _ in vlm.held_out_examples(cfg)]
    assert summary["chance"] == pytest.approx(sum(synthetic.CHANCE[k] for k in kinds) / len(kinds))
    assert [p.name for p in tmp_path.iterdir()] == ["vlm"]

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    tokenizer = processor.tokenizer
    assert processor.chat_template == CHAT_TEMPLATE and tokenizer.chat_template == CHAT_TEMPLATE
    assert (
        model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert model.config.pad_token_id == tokenizer.pad_token_id

    image, question, _ = vlm.held_out_examples(cfg)[0]
    ids = prompt_ids(processor, image, question)
    assert ids.count(model.config.image_token_id) == cfg.image_tokens
    assert tokenizer.decode(ids).startswith("<|im_start|>user\n<fake_token_around_image><global-img><image>")

    # the saved weights are the measured ones: the held-out evaluation repeats to float precision
    again = vlm.evaluate(model, processor, vlm.encode(processor, vlm.held_out_examples(cfg)))
    assert again["accuracy"] == summary["accuracy"] and again["per_kind"] == summary["per_kind"]
    assert again["loss"] == pytest.approx(summary["loss"], rel=1e-5)

    # the text model is the text teacher's, untouched (text_lr 0), the image tokens' rows appended
    base = load_file(teacher_dir / "model.safetensors")
    embed = model.model.text_model.embed_tokens.weight
    assert torch.equal(embed[: len(base["model.embed_tokens.weight"])], base["model.embed_tokens.weight"])
    layer = model.model.text_model.layers[7].mlp.down_proj.weight
    assert torch.equal(layer, base["model.layers.7.mlp.down_proj.weight"])

    # the plain transformers forward agrees with the teacher-forced answer logits used for training
    data = vlm.encode(processor, [(image, question, "red")])
    with torch.no_grad():
        picked, _, _ = vlm.answer_logits(model, data, [0], tokenizer.pad_token_id)
        full = model(
            input_ids=torch.tensor([data.prompts[0]]),
            pixel_values=data.pixel_values,
            pixel_attention_mask=data.pixel_attention_mask,
        ).logits  # (1, T, V)
    assert full.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(full).all()
    torch.testing.assert_close(picked[0, 0], full[0, -1], rtol=1e-4, atol=1e-4)
