"""The soft-label shard schema: one constant with a version, and the metadata every shard carries.

A row is one window of one document. For a window of ``L`` tokens, the label at position ``t``
is the teacher's distribution over token ``t + 1``; positions ``label_start .. L - 2`` are
labelled (earlier positions are context shared with the previous window), so a row has
``n = L - 1 - label_start`` labelled positions and the flat per-position columns hold
``n * slots`` (ids and logprobs) or ``n`` (scalars) values, position-major. What the label
columns hold, stored and decoded, is the shard's label kind's (``storage.kinds``).

Modes: ``score`` rows are corpus windows. ``generate`` rows are one teacher answer each
(``input_ids`` = chat-templated prompt + response, ``label_start`` = last prompt position, so
only response tokens are labelled) plus the prompt and response text. ``candidates`` rows are
one example each (the ``candidates`` kind: no per-token columns).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

from storage.kinds import EXAMPLES, features, kind_of
from storage.kinds.base import id_type

SCHEMA_VERSION = 6  # 4: row and token counts in the footer; 5: log-odds tail mass code; 6: label kinds
METADATA_KEY = b"distill.shard"
ENCODING_KEY = b"distill.encoding"
ID_TABLE_KEY = b"distill.id_table"
COUNTS_KEY = b"distill.counts"  # rows and labelled tokens, checked against the commit record
ROW_GROUP_ROWS = 64  # windows per row group: bounds reader memory and is the unit of resumption
ZSTD_LEVEL = 9  # writing is dwarfed by teacher time; level 9 saves ~8% over level 3 on ids

__all__ = ["ShardMeta", "arrow_schema", "decoded_schema", "id_type", "text_columns"]


def _base_fields(vocab_size: int) -> list[pa.Field]:
    return [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(id_type(vocab_size)), nullable=False),
        pa.field("label_start", pa.int32(), nullable=False),
    ]


GENERATE_TEXT_COLUMNS = ("prompt_text", "response_text", "finish_reason")  # finish_reason: stop | length


IMAGE_COLUMN = "image"  # the sha256 of the row's image in the run's image store (storage.images)


def text_columns(mode: str, images: bool = False) -> tuple[str, ...]:
    """Plain string columns a token-label shard of ``mode`` carries beside its labels (``images``:
    with the row's image hash)."""
    return (GENERATE_TEXT_COLUMNS if mode == "generate" else ()) + ((IMAGE_COLUMN,) if images else ())


def _schema(meta: "ShardMeta", label_fields: list[pa.Field]) -> pa.Schema:
    if kind_of(meta.kind).layout == EXAMPLES:
        return pa.schema(label_fields)
    text = [pa.field(name, pa.string(), nullable=False) for name in text_columns(meta.mode, meta.images)]
    return pa.schema(_base_fields(meta.vocab_size) + text + label_fields)


def arrow_schema(meta: "ShardMeta") -> pa.Schema:
    """The stored (encoded) columns of a shard with ``meta``: its kind's label columns, and the
    features' (``storage.kinds.features``) when it stores them."""
    extra = features.stored_fields() if meta.features else []
    return _schema(meta, kind_of(meta.kind).stored_fields(meta.vocab_size) + extra)


def decoded_schema(meta: "ShardMeta") -> pa.Schema:
    """Plain columns (float32 logprobs, original ids; the device's feature codes): the writer's input."""
    extra = features.written_fields() if meta.features else []
    return _schema(meta, kind_of(meta.kind).decoded_fields(meta.vocab_size) + extra)


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
    kind: str
    """Label kind, a key of ``storage.kinds.KINDS``: ``topk``, ``sampled``, ``mixture`` or ``candidates``."""
    kind_params: dict
    """The kind's parameters, named by the kind: ``{"k"}`` (topk), ``{"draws", "proposal_k", "sampler",
    "seed"}`` (sampled), ``{"k", "members"}`` (mixture: each member's k), ``{}`` (candidates)."""
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
    features: dict = dataclasses.field(default_factory=dict)
    """Teacher features stored beside the labels (``storage.kinds.features``): ``{"layers", "dim",
    "projection", "seed", "dtype"}``, or empty for none."""
    images: bool = False
    """Whether every row names its image (column ``image``: the sha256 of the image's bytes in the
    run's image store, ``storage.images``): labels of a vision-language teacher."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        kind = kind_of(self.kind)
        kind.check_params(self.kind_params)
        if (self.mode == "candidates") != (kind.layout == EXAMPLES):
            raise ValueError(f"mode {self.mode!r} cannot hold {self.kind!r} labels")
        features.check_params(self.features)
        if self.images and kind.layout == EXAMPLES:
            raise ValueError(f"{self.kind!r} labels cannot name images (candidates mode reads no images)")
        if self.features and kind.layout == EXAMPLES:
            raise ValueError(f"{self.kind!r} labels cannot carry teacher features (no per-token positions)")

    @property
    def slots(self) -> int:
        """Teacher ids stored per labelled position (the K of (B, T, K)): ``k`` for top-k,
        ``draws`` for sampled, ``k x members`` for a mixture; 0 for candidates."""
        return kind_of(self.kind).slots(self.kind_params)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d) - {"created", "schema_version", "settings", "features", "images"}
        if missing:
            raise ValueError(f"shard metadata lacks fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})
