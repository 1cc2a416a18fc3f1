"""The soft-label shard schema: one constant with a version, and the metadata every shard carries.

A row is one window of one document. For a window of ``L`` tokens, the label at position ``t``
is the teacher's distribution over token ``t + 1``; positions ``label_start .. L - 2`` are
labelled (earlier positions are context shared with the previous window), so a row has
``n = L - 1 - label_start`` labelled positions and the flat per-position columns hold
``n * k`` (top-k) or ``n`` (scalars) values, position-major.

Modes: ``score`` rows are corpus windows. ``generate`` rows are one teacher answer each
(``input_ids`` = chat-templated prompt + response, ``label_start`` = last prompt position, so
only response tokens are labelled) plus the prompt and response text. ``candidates`` rows are
one example each: the prompt, its candidate answers (text and ids), the gold index (-1: none)
and the teacher's normalized log-distribution over the candidates (no per-token columns).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 5  # 4: row and token counts in the footer; 5: log-odds tail mass code
METADATA_KEY = b"distill.shard"
ENCODING_KEY = b"distill.encoding"
ID_TABLE_KEY = b"distill.id_table"
COUNTS_KEY = b"distill.counts"  # rows and labelled tokens, checked against the commit record
ROW_GROUP_ROWS = 64  # windows per row group: bounds reader memory and is the unit of resumption
ZSTD_LEVEL = 9  # writing is dwarfed by teacher time; level 9 saves ~8% over level 3 on ids


def id_type(vocab_size: int) -> pa.DataType:
    """Narrowest unsigned integer type that holds every token id of the vocabulary."""
    if vocab_size <= 1 << 16:
        return pa.uint16()
    return pa.uint32()


def _base_fields(vocab_size: int) -> list[pa.Field]:
    return [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(id_type(vocab_size)), nullable=False),
        pa.field("label_start", pa.int32(), nullable=False),
    ]


MODES = ("score", "generate", "candidates")
TOKEN_MODES = ("score", "generate")  # per-token top-k labels


GENERATE_TEXT_COLUMNS = ("prompt_text", "response_text", "finish_reason")  # finish_reason: stop | length


def text_columns(mode: str) -> tuple[str, ...]:
    """Plain string columns a token-label shard of ``mode`` carries beside its labels."""
    return GENERATE_TEXT_COLUMNS if mode == "generate" else ()


def _text_fields(mode: str) -> list[pa.Field]:
    return [pa.field(name, pa.string(), nullable=False) for name in text_columns(mode)]


def candidates_schema(vocab_size: int) -> pa.Schema:
    """Stored and decoded columns of a ``candidates`` shard (small: stored plain)."""
    ids = id_type(vocab_size)
    return pa.schema(
        [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("prompt_text", pa.string(), nullable=False),
            pa.field("prompt_ids", pa.list_(ids), nullable=False),
            pa.field("candidates", pa.list_(pa.string()), nullable=False),
            pa.field("candidate_ids", pa.list_(pa.list_(ids)), nullable=False),
            pa.field("answer", pa.int32(), nullable=False),  # gold index, -1 when unknown
            pa.field("candidate_scores", pa.list_(pa.float32()), nullable=False),  # sum (or mean) token logprob
            pa.field("teacher_logprobs", pa.list_(pa.float32()), nullable=False),  # log-softmax of the scores
        ]
    )


def _schema(vocab_size: int, mode: str, label_fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    if mode == "candidates":
        return candidates_schema(vocab_size)
    labels = [pa.field("topk_ids", pa.list_(id_type(vocab_size)), nullable=False)]
    labels += [pa.field(name, pa.list_(t), nullable=False) for name, t in label_fields]
    return pa.schema(_base_fields(vocab_size) + _text_fields(mode) + labels)


def arrow_schema(vocab_size: int, mode: str = "score") -> pa.Schema:
    """The stored (encoded) columns; see ``storage.codec`` for the encodings. Stored
    ``topk_ids`` are remapped by the shard's id table."""
    return _schema(
        vocab_size,
        mode,
        [("topk_logprob_codes", pa.uint8()), ("target_logprob_codes", pa.uint16()), ("tail_mass_codes", pa.uint16())],
    )


def decoded_schema(vocab_size: int, mode: str = "score") -> pa.Schema:
    """Plain columns (float32 logprobs, original ids): the writer's input, the export format."""
    return _schema(
        vocab_size,
        mode,
        [("topk_logprobs", pa.float32()), ("target_logprobs", pa.float32()), ("tail_mass", pa.float32())],
    )


def sampled_draws(meta: "ShardMeta") -> int:
    """Draws per position of a shard of sampled labels (``settings['labels'] == 'sampled'``); 0 for top-k labels."""
    if meta.settings.get("labels") != "sampled":
        return 0
    return int(meta.settings["draws"])


@dataclasses.dataclass(frozen=True)
class ShardMeta:
    """Provenance of one shard, stored in the Parquet footer and in its commit record."""

    teacher: str
    """Teacher name or path as configured."""
    teacher_hash: str
    """Content hash of the teacher weights."""
    tokenizer_hash: str
    """Content hash of the tokenizer files."""
    vocab_size: int
    """Size of the teacher's output distribution."""
    k: int
    """Number of top-k entries per labelled position."""
    temperature: float
    """Temperature the stored logprobs were computed at (1.0: raw model distribution)."""
    mode: str
    """Labelling mode: ``score`` (teacher-forced), ``generate`` (teacher answers) or ``candidates``."""
    engine: str
    """Engine name and version that produced the labels."""
    data_fingerprint: str
    """Hash of the token content of this shard's windows."""
    shard: str
    """Shard name (``train-00000``), also its partition key."""
    split: str
    """``train`` or ``heldout``."""
    cache_key: str
    """Content key of the shard (see ``storage.cache``)."""
    code_version: str
    """Version of the labelling code."""
    created: str = ""
    """UTC creation time, ISO 8601."""
    settings: dict = dataclasses.field(default_factory=dict)
    """Mode settings the labels depend on (sampling for ``generate``, length normalization for ``candidates``)."""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d) - {"created", "schema_version", "settings"}
        if missing:
            raise ValueError(f"shard metadata lacks fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})
