"""Teacher features (``teacher.features``): hidden states of chosen teacher layers at every
labelled position, projected to ``dim`` values and quantized, stored beside a ``positions``
kind's labels in the same rows. A companion kind: ``ShardMeta.features`` holds its parameters
(``layers``, ``dim``, ``projection``, ``seed``, ``dtype``; empty for a shard without features),
and the shard's cache key covers them, so a row's features are always its labels' positions.

Written columns, position-major then layer-major: ``feature_scales`` (n * layers float32: each
vector's largest magnitude / 127) and ``feature_codes`` (n * layers * dim int8), made on the
engine's device (``distill.teacher.features.quantize``): ``dim + 4`` bytes per position and layer.
Stored: the scales as written (byte-stream split), the codes as one binary value per row, which
spares Parquet's per-value repetition and definition levels (about 2 bits per code as a list).
Decoded: ``teacher_features`` (n * layers * dim float32, ``storage.codec.decode_features``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa

from storage import codec
from storage.kinds.base import flat

PARAMS = ("layers", "dim", "projection", "seed", "dtype")
FORMAT = 2  # of the stored feature columns, in the shards' cache key: bump it when they change


def check_params(params: Mapping) -> None:
    """``ValueError`` unless ``params`` is empty (no features) or holds exactly ``PARAMS``."""
    if params and set(params) != set(PARAMS):
        raise ValueError(f"features take {sorted(PARAMS)}, got {sorted(params)}")


def shape(params: Mapping) -> tuple[int, int]:
    """(layers, dim) of one position's features."""
    return len(params["layers"]), int(params["dim"])


BYTE_STREAM_SPLIT = ("feature_scales",)


def written_fields() -> list[pa.Field]:
    """The feature columns as written (the writer's input)."""
    return [
        pa.field("feature_scales", pa.list_(pa.float32()), nullable=False),
        pa.field("feature_codes", pa.list_(pa.int8()), nullable=False),
    ]


def stored_fields() -> list[pa.Field]:
    """The feature columns as stored."""
    return [
        pa.field("feature_scales", pa.list_(pa.float32()), nullable=False),
        pa.field("feature_codes", pa.binary(), nullable=False),
    ]


def check_row(row: Mapping, params: Mapping, positions: int, where: str) -> None:
    """A written row's features: the lengths of ``positions`` labelled positions, finite scales."""
    layers, dim = shape(params)
    scales, codes = np.asarray(row["feature_scales"], np.float32), np.asarray(row["feature_codes"])
    if len(scales) != positions * layers or len(codes) != positions * layers * dim:
        raise ValueError(
            f"{where}: feature_scales holds {len(scales)} and feature_codes {len(codes)} values, expected "
            f"{positions * layers} and {positions * layers * dim} ({positions} positions x {layers} layers x dim {dim})"
        )
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(
            f"{where}: feature_scales must be finite and >= 0 (non-finite teacher hidden states: an overflow?)"
        )
    if codes.size and int(codes.min()) < -codec.FEATURE_LEVELS:
        raise ValueError(f"{where}: feature_codes below -{codec.FEATURE_LEVELS}")


def encode(raw: pa.Table) -> dict[str, pa.Array]:
    """The stored columns: the device's scales as written, each row's codes as one binary value."""
    values, offsets = flat(raw, "feature_codes")
    binary = pa.BinaryArray.from_buffers(
        pa.binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(values.tobytes())]
    )
    return {"feature_scales": raw.column("feature_scales").combine_chunks(), "feature_codes": binary}


def decode(stored: pa.Table, params: Mapping, positions: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``teacher_features`` of one stored row group: (flat float32, row offsets); ``positions``:
    each row's labelled positions. ``ValueError`` when the lengths disagree (corrupt)."""
    layers, dim = shape(params)
    scales, scale_offsets = flat(stored, "feature_scales")
    codes, code_offsets = binary_values(stored, "feature_codes")
    if not np.array_equal(np.diff(scale_offsets), positions * layers) or not np.array_equal(
        np.diff(code_offsets), positions * layers * dim
    ):
        raise ValueError(
            f"feature_scales / feature_codes lengths disagree with the rows' labelled positions ({layers} layers, "
            f"dim {dim})"
        )
    if scales.size and not np.isfinite(scales).all():
        raise ValueError("feature_scales hold non-finite values")
    values = codec.decode_features(scales, codes.reshape(-1, dim)).reshape(-1)
    return {"teacher_features": (values, code_offsets)}


def binary_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's bytes as one flat int8 array, and its row offsets (starting at 0)."""
    col = table.column(name).combine_chunks()
    _, offsets_buffer, data = col.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32)[col.offset : col.offset + len(col) + 1]
    values = np.frombuffer(data, np.int8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.int8)
    return values, offsets - offsets[0]
