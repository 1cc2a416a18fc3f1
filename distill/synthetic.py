"""A synthetic image-question task drawn with Pillow: what a vision-language teacher is trained and
measured on, and what a distillation run's image corpus can be made of, with no download.

Each example is one small image and one question about it, answered by a single short word:

- ``colour``: one shape; its colour (one of six far-apart colours);
- ``shape``: one shape; which of four it is;
- ``count``: one to four circles of one size in distinct cells of a 3x3 grid; how many;
- ``position``: one shape near an edge of the image; which edge.

The shape's size, place, colour and the background's shade vary inside limits that keep every answer
unambiguous. ``CHANCE`` is each kind's accuracy when guessing uniformly among its answers, the level
a trained teacher's held-out accuracy is compared with.

An example depends only on its random generator, so a seed fixes a whole list (``examples``).
``stream`` keeps apart lists that must not overlap: a dataset written with any seed never repeats
the examples the vision teacher was trained or measured on.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_JITTER = 15  # per channel: nearest palette colour stays the true one (palette distances >= 70)
SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour is the shape?"),
    "shape": ("What shape is this?", "Which shape is shown?"),
    "count": ("How many circles are there?", "How many dots do you see?"),
    "position": ("Where is the shape?", "Which side is the shape on?"),
}
ANSWERS = {"colour": COLOUR_NAMES, "shape": SHAPES, "count": COUNTS, "position": POSITIONS}
KINDS = tuple(QUESTIONS)
CHANCE = {kind: 1 / len(answers) for kind, answers in ANSWERS.items()}
"""Accuracy of a uniform guess among a kind's answers (kinds are drawn uniformly, so the overall
chance level is the mean of these)."""
STREAM_DATASET, STREAM_TEACHER_TRAIN, STREAM_TEACHER_EVAL = 0, 1, 2
DATASET_INFO = "dataset.json"
DATASET_VERSION = 1  # bumped when the drawing changes, so an older folder is not reused
_KIND_OF = {q: kind for kind, questions in QUESTIONS.items() for q in questions}


def kind_of(question: str) -> str:
    """The kind (a key of ``QUESTIONS``) a question of this task asks about."""
    if question not in _KIND_OF:
        raise ValueError(f"{question!r} is not a question of the synthetic task; expected one of {sorted(_KIND_OF)}")
    return _KIND_OF[question]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw ``shape`` centred at (cx, cy) inside a square of half-side ``r``; each shape covers its centre."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:
        raise ValueError(f"shape {shape!r}: expected one of {SHAPES}")


def _colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(c) for c in np.clip(np.array(COLOURS[name]) + jitter, 0, 255))


def make_example(rng: np.random.Generator, size: int = 64, kind: str | None = None) -> tuple[Image.Image, str, str]:
    """One example: a ``size`` x ``size`` RGB image, a question about it and its one-word answer.
    The kind is drawn uniformly unless given."""
    if size < 32:
        raise ValueError(f"size {size}: expected >= 32 pixels (smaller shapes are not told apart)")
    kind = KINDS[rng.integers(len(KINDS))] if kind is None else kind
    if kind not in QUESTIONS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    question = QUESTIONS[kind][rng.integers(len(QUESTIONS[kind]))]
    shade = int(rng.integers(225, 256))
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    if kind == "count":
        n = int(rng.integers(1, 5))
        cell = size / 3
        for c in rng.choice(9, size=n, replace=False):
            r = cell * rng.uniform(0.28, 0.38)
            slack = cell / 2 - r - 1
            cx = (c % 3 + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (c // 3 + 0.5) * cell + rng.uniform(-slack, slack)
            draw_shape(
                draw,
                SHAPES[rng.integers(len(SHAPES))],
                cx,
                cy,
                r,
                _colour(rng, COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]),
            )
        return image, question, COUNTS[n - 1]
    if kind == "position":
        side = POSITIONS[rng.integers(len(POSITIONS))]
        r = size * rng.uniform(0.1, 0.15)
        along = size * rng.uniform(0.35, 0.65)  # the centre stays in the middle band of the other axis
        edge = rng.uniform(r + 1, size * 0.3)  # distance of the centre from its edge
        cx, cy = {
            "left": (edge, along),
            "right": (size - edge, along),
            "top": (along, edge),
            "bottom": (along, size - edge),
        }[side]
        draw_shape(draw, shape, cx, cy, r, _colour(rng, colour))
        return image, question, side
    if kind == "shape":  # large and near the centre: a small encoder learns outlines at few places quickly
        r = size * rng.uniform(0.25, 0.35)
        cx, cy = size / 2 + rng.uniform(-1, 1, size=2) * min(size / 10, size / 2 - r - 1)
    else:
        r = size * rng.uniform(0.12, 0.3)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    draw_shape(draw, shape, cx, cy, r, _colour(rng, colour))
    return image, question, colour if kind == "colour" else shape


def examples(n: int, seed: int, size: int = 64, stream: int = STREAM_DATASET) -> list[tuple[Image.Image, str, str]]:
    """``n`` examples (image, question, answer), the same for the same seed, size and stream."""
    rng = np.random.default_rng([stream, seed])
    return [make_example(rng, size) for _ in range(n)]


def write_dataset(folder: Path, n: int, seed: int, size: int = 64) -> Path:
    """Write ``n`` examples as PNG files under ``folder/images/`` and ``folder/questions.jsonl``, one
    object per line: ``id``, ``image`` (its path relative to the JSONL file), ``prompt``, ``response``
    and ``kind``. Returns the JSONL file's path. Written into a temporary folder renamed into place, so
    a folder that exists is complete; it is reused when it holds the same settings."""
    folder = Path(folder)
    settings = {"n": n, "seed": seed, "size": size, "version": DATASET_VERSION}
    if folder.exists():
        info = folder / DATASET_INFO
        found = json.loads(info.read_text()) if info.exists() else None
        if found != settings:
            raise ValueError(
                f"{folder}: holds a dataset with settings {found}, not {settings}; remove it or write to another folder"
            )
        return folder / "questions.jsonl"
    if n < 1:
        raise ValueError(f"n {n}: expected >= 1 examples")
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "images").mkdir(parents=True)
        with open(tmp / "questions.jsonl", "w") as f:
            for i, (image, question, answer) in enumerate(examples(n, seed, size)):
                name = f"images/{i:06d}.png"
                image.save(tmp / name)
                row = {"id": f"{seed}-{i:06d}", "image": name, "prompt": question, "response": answer}
                f.write(json.dumps({**row, "kind": kind_of(question)}) + "\n")
        (tmp / DATASET_INFO).write_text(json.dumps(settings))
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "questions.jsonl"
