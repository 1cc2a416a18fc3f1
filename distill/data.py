"""The corpus's config and its built form: ``CorpusConfig``, the corpus folder (keyed by the
config and the teacher's tokenizer), reading a built shard's windows, and the multiple-choice
file of the evaluation. Building the corpus from documents is ``distill.corpus``; this module
stays light (no ``datasets``), since every config load imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from distill.configbase import check
from storage.cache import content_key
from storage.images import ImageStore

PYDOC_SOURCE = "pydoc_topics"
# image questions drawn here with Pillow (``distill.synthetic``), written once under the storage root
# as a folder of PNG files with a JSON Lines file of questions, and read like any such folder
SYNTHETIC_SOURCE = "synthetic_shapes"
SYNTHETIC_SEED = 1_000_003  # not the seeds the vision teacher trains and tests on
BAD_IMAGES = ("error", "skip")
CORPUS_MANIFEST = "corpus.json"
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    source: str = PYDOC_SOURCE
    """``pydoc_topics`` (the Python language reference shipped with Python), a hub dataset id, or local
    json/jsonl/parquet/csv/txt file(s) (comma-separated or a glob)."""
    text_column: str = "text"
    """Column holding the document text."""
    id_column: str | None = None
    """Column holding a stable document id; default: the row index."""
    split: str = "train"
    """Split of the ``datasets`` source to read."""
    max_documents: int | None = None
    """Read at most this many documents (None: all)."""
    heldout_fraction: float = 0.1
    """Fraction of documents held out for evaluation (by a hash of the document id)."""
    window: int = 1024
    """Tokens per window; longer documents are split into several windows."""
    stride: int | None = None
    """Start offset between consecutive windows of a document; default ``window - 1`` (one token of overlap, every
    token labelled once)."""
    min_tokens: int = 2
    """Documents with fewer tokens (after tokenization) are dropped and counted."""
    train_shards: int = 4
    """Number of train shards (one teacher partition each)."""
    heldout_shards: int = 1
    """Number of held-out shards."""
    prompt_column: str = "prompt"
    """``generate`` / ``candidates`` modes: column holding the prompt."""
    candidates_column: str = "candidates"
    """``candidates`` mode: column holding the list of candidate answers (strings)."""
    answer_column: str | None = "answer"
    """``candidates`` mode: column holding the gold answer (an index into the candidates, or the candidate text);
    optional in the data."""
    chat_template: bool = True
    """``generate`` / ``candidates`` modes: wrap prompts in the teacher tokenizer's chat template (user turn +
    assistant start)."""
    system_prompt: str | None = None
    """System message put before each prompt when ``chat_template`` is on (None: the template's default)."""
    image_column: str | None = None
    """Column holding each example's image, for a vision-language teacher (``teacher.vision``): a path
    (relative to the folder of the data file), encoded image bytes, or a ``datasets`` Image. Each row
    is then one question (``prompt_column``) about its image, and in ``score`` mode its answer
    (``response_column``), whose tokens are labelled. ``synthetic_shapes`` sets it to ``image``."""
    response_column: str = "response"
    """``score`` mode with images: column holding the answer to each question."""
    max_image_pixels: int = 16_000_000
    """Largest image accepted, in pixels (width x height, read from the header before decoding)."""
    bad_images: str = "error"
    """An image that is not an image, truncated or too large: ``error`` (stop, naming the file and row,
    before any teacher work) or ``skip`` (drop the example, counted in the manifest as
    ``dropped_bad_image``)."""

    def __post_init__(self):
        check(0.0 < self.heldout_fraction < 1.0, "heldout_fraction", self.heldout_fraction, "a number in (0, 1)")
        check(self.window >= 2, "window", self.window, "an integer >= 2")
        check(
            self.stride is None or 1 <= self.stride <= self.window - 1,
            "stride",
            self.stride,
            f"None or an integer in [1, window - 1 = {self.window - 1}]",
        )
        check(self.train_shards >= 1, "train_shards", self.train_shards, "an integer >= 1")
        check(self.heldout_shards >= 1, "heldout_shards", self.heldout_shards, "an integer >= 1")
        check(self.min_tokens >= 2, "min_tokens", self.min_tokens, "an integer >= 2")
        check(
            self.max_documents is None or self.max_documents >= 2, "max_documents", self.max_documents, "None or >= 2"
        )
        check(self.max_image_pixels >= 1, "max_image_pixels", self.max_image_pixels, "an integer >= 1")
        check(self.bad_images in BAD_IMAGES, "bad_images", self.bad_images, " or ".join(BAD_IMAGES))
        if self.source == SYNTHETIC_SOURCE:
            object.__setattr__(self, "image_column", self.image_column or "image")

    @property
    def images(self) -> bool:
        """Whether rows are image questions (``image_column`` set)."""
        return self.image_column is not None

    @property
    def effective_stride(self) -> int:
        return self.stride if self.stride is not None else self.window - 1

    def shard_names(self) -> list[str]:
        return [f"train-{i:05d}" for i in range(self.train_shards)] + [
            f"heldout-{i:05d}" for i in range(self.heldout_shards)
        ]


class CorpusError(ValueError):
    """The dataset cannot be used: missing column, non-text values..."""


def text_lines(path: str | os.PathLike, error: type[Exception], jsonl: bool) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` of every non-blank line of a UTF-8 text file, streamed: the line's
    text, or for ``jsonl`` its JSON object. ``error`` (naming the file and 1-based line, blank
    lines counted as in an editor) for bytes that are not UTF-8 or a line that is not an object.
    Lines split on ``\n`` only: ``str.splitlines`` would also split on U+2028 inside JSON strings."""
    with open(path, "rb") as fh:
        # UTF-8 never uses the byte 0x0A inside a character, so lines decode independently
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            if not jsonl:
                yield n, line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(
                    f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); a .jsonl file holds one JSON object "
                    "per line"
                ) from None
            if not isinstance(record, dict):
                raise error(f"{path}:{n}: a JSON {type(record).__name__}, expected an object with named fields")
            yield n, record


def corpus_dir(root: Path, cfg: CorpusConfig, tokenizer_hash: str, mode: str = "score") -> Path:
    fields = {"corpus": dataclasses.asdict(cfg), "tokenizer": tokenizer_hash, "v": 1}
    if mode != "score":
        fields["mode"] = mode
    return Path(root) / "corpus" / content_key(fields)


def image_store(root: Path) -> ImageStore:
    """The images of every corpus under the storage root ``root``, by content hash."""
    return ImageStore(Path(root) / "images")


def read_corpus_shard(
    root: Path, cfg: CorpusConfig, tokenizer_hash: str, shard: str, mode: str = "score"
) -> tuple[dict, pa.Table]:
    """The manifest entry and the windows of one corpus shard; errors say to materialize the corpus."""
    out = corpus_dir(root, cfg, tokenizer_hash, mode)
    manifest_path = out / CORPUS_MANIFEST
    if not manifest_path.exists():
        raise CorpusError(f"{manifest_path}: corpus not built for this config; materialize the corpus asset first")
    manifest = json.loads(manifest_path.read_text())
    if shard not in manifest["shards"]:
        raise CorpusError(f"{manifest_path}: no shard {shard!r}; shards are {sorted(manifest['shards'])}")
    entry = manifest["shards"][shard]
    return entry, pq.read_table(out / entry["file"])


def load_mc(path: str | Path) -> list[dict]:
    """Questions of a multiple-choice JSONL file (``eval.mc_file``), validated with errors naming
    the file and the 1-based line (blank lines count, as in an editor)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{path}: multiple-choice file not found (eval.mc_file; relative paths are relative to the working "
            "directory)"
        )
    items = []
    for i, item in text_lines(path, ValueError, jsonl=True):
        where = f"{path}:{i}"
        for field in ("question", "choices", "answer"):
            if field not in item:
                raise ValueError(f"{where}: missing field {field!r} (need question, choices, answer)")
        if not isinstance(item["question"], str):
            raise ValueError(f"{where}: question must be a string, got {item['question']!r}")
        choices = item["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: choices must be a list of at least two strings, got {choices!r}")
        answer = item["answer"]
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer must be an index into choices (0..{len(choices) - 1}), got {answer!r}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no questions")
    return items
