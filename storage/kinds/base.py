"""What every label kind provides, and the pieces the kinds of per-token labels share.

A label kind is what a shard's teacher targets are: how they are written (checked, then encoded
into stored columns), read (decoded and validated), laid out for batching, which training
losses they are a faithful target for, and how a report names them. Each kind is one module of
this package, registered in ``storage.kinds.KINDS``; ``ShardMeta.kind`` names a shard's kind and
``ShardMeta.kind_params`` holds that kind's parameters under the names it declares.

Layouts: what a decoded row holds, and how training collates it.

- ``positions``: a row is one window (``doc_id``, ``window_index``, ``input_ids``,
  ``label_start``, plus the mode's text columns). Each of its ``n`` labelled positions holds
  ``slots`` teacher ids and their target logprobs, flat and position-major:
  ``teacher_ids`` (n * slots), ``teacher_logprobs`` (n * slots; ``-inf`` in unused slots, whose
  id repeats the position's first), ``rest_mass`` (n): the target's probability outside
  ``teacher_ids``, so ``sum(exp(teacher_logprobs)) + rest_mass = 1``, and ``target_logprobs``
  (n): the teacher's logprob of the realized next token. These are also the writer's input
  columns. Training collates them to (B, T, slots) ids and logprobs, ``-inf`` where unlabelled
  (``distill.train.trainer.collate``); ``rest_mass`` is the ``tail: bucket`` outcome.
- ``examples``: a row is one example with its candidate answers and the teacher's
  distribution over them (``storage.kinds.candidates``), collated per example
  (``distill.train.trainer.collate_candidates``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa

from storage import codec

POSITIONS, EXAMPLES = "positions", "examples"


def id_type(vocab_size: int) -> pa.DataType:
    """Narrowest unsigned integer type that holds every token id of the vocabulary."""
    if vocab_size <= 1 << 16:
        return pa.uint16()
    return pa.uint32()


@dataclasses.dataclass(frozen=True)
class LossRules:
    """The training settings under which a kind's targets are faithful (``None``: any value).
    ``distill.config.RunConfig`` refuses a run whose train shards' kind rules out its losses."""

    divergences: tuple[str, ...] | None = None
    """``train.divergence`` values the targets are unbiased for."""
    tails: tuple[str, ...] | None = None
    """``train.tail`` modes."""
    temperatures: tuple[float, ...] | None = None
    """``train.temperature`` values."""
    own_tokenizer: bool = True
    """Whether a student with its own tokenizer (cross-tokenizer distillation) may learn from them."""
    why: str = ""
    """One clause saying why the others are refused, for the error message."""

    def refusals(self, divergence: str, tail: str, temperature: float, own_tokenizer: bool) -> list[tuple[str, str]]:
        """``(setting, accepted)`` for every given setting these rules refuse."""
        out = []
        for setting, value, accepted in (
            ("divergence", divergence, self.divergences),
            ("tail", tail, self.tails),
            ("temperature", temperature, self.temperatures),
        ):
            if accepted is not None and value not in accepted:
                out.append((setting, " or ".join(str(a) for a in accepted)))
        if own_tokenizer and not self.own_tokenizer:
            out.append(("tokenizer", "the teacher's tokenizer"))
        return out


class LabelKind:
    """The interface of a label kind; one instance per kind module (its ``KIND``)."""

    name: str
    """Its key in ``storage.kinds.KINDS`` and its ``ShardMeta.kind``."""
    layout: str
    """``positions`` or ``examples`` (see this module's docstring)."""
    params: tuple[str, ...] = ()
    """The names ``ShardMeta.kind_params`` must hold for this kind."""
    rules: LossRules = LossRules()
    """The losses its targets are faithful for."""
    byte_stream_split: tuple[str, ...] = ()
    """Stored columns written with Parquet's byte-stream split (ids, whose high bytes repeat)."""

    def check_params(self, params: Mapping) -> None:
        """Raise ``ValueError`` unless ``params`` holds exactly this kind's parameters."""
        if set(params) != set(self.params):
            raise ValueError(f"label kind {self.name!r} takes kind_params {sorted(self.params)}, got {sorted(params)}")

    def slots(self, params: Mapping) -> int:
        """Teacher ids stored per labelled position (the K of (B, T, K)); 0 for ``examples``."""
        return 0

    def describe(self, params: Mapping) -> str:
        """What the labels are, for model cards and reports."""
        raise NotImplementedError

    def stored_fields(self, vocab_size: int) -> list[pa.Field]:
        """The label columns as stored (encoded)."""
        raise NotImplementedError

    def decoded_fields(self, vocab_size: int) -> list[pa.Field]:
        """The label columns as written and decoded (the writer's input)."""
        raise NotImplementedError

    def encoding(self, params: Mapping) -> dict:
        """The encoding constants a reader needs, stored in the footer."""
        return {}

    def check_row(self, row: Mapping, params: Mapping, vocab_size: int, where: str) -> int:
        """Validate one written row (``ValueError`` naming ``where``); returns its labelled positions
        (``positions``) or 1 (``examples``)."""
        raise NotImplementedError

    def encode(self, raw: pa.Table, params: Mapping, table: np.ndarray, vocab_size: int) -> dict[str, pa.Array]:
        """Stored label columns of one row group of written rows; ``table``: the shard's id table."""
        raise NotImplementedError

    def decode(
        self, stored: pa.Table, params: Mapping, encoding: Mapping, table: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Decoded label columns of one stored row group, ``{name: (flat values, row offsets)}``;
        ``ValueError`` when the stored values are impossible (corrupt)."""
        raise NotImplementedError

    def teacher_k(self, params: Mapping) -> int:
        """How many top ids per position the teacher's engine must return to make these labels."""
        raise ValueError(f"{self.name} labels are not made from one teacher's top-k")

    def engine_request(self, params: Mapping) -> dict:
        """What the labelling engine computes per position for these labels: ``{"k": top ids}``, and
        ``"draws"`` where the device labeller draws the labels itself (seeded by ``row_seed``)."""
        return {"k": self.teacher_k(params)}

    def row_seed(self, params: Mapping, doc_id: str, window_index: int) -> int:
        """The seed of one row's draws on the device: the same whatever shard or batch it is in."""
        return 0

    def from_teacher(self, labels: Mapping, params: Mapping, doc_id: str, window_index: int) -> dict:
        """This kind's written label columns of one row (flat, see ``positions``) from the
        teacher's top-K labels of that row, as the engines return them: ``topk_ids`` and
        ``topk_logprobs`` (n, K), ``target_logprobs`` (n,) and ``tail_mass`` (n,), the teacher's
        probability outside its top-K, plus ``draw_ids``/``draw_counts`` (n, draws) where
        ``engine_request`` asked for draws. ``doc_id``/``window_index`` seed any randomness, so a
        row gets the same labels whatever shard or batch it is in."""
        raise ValueError(f"{self.name} labels are not made from one teacher's top-k")

    def rows(self, stored: pa.Table) -> list[dict]:
        """``examples`` kinds: the decoded rows of one stored row group (``ValueError`` when corrupt)."""
        raise NotImplementedError

    def stats(self, groups: Iterable, params: Mapping) -> dict:
        """Counts and sanity of a shard's decoded row groups (``(num_rows, decoded columns)`` for
        ``positions``, lists of rows for ``examples``): ``rows``, ``tokens`` (labelled
        positions, or examples), ``mean_topk_mass`` (mean target mass on the stored ids),
        ``max_logprob`` and ``problems`` (what is wrong, as sentences)."""
        raise NotImplementedError


def flat(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column's flat values and its row offsets (starting at 0)."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    return col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]], offsets - offsets[0]


def list_column(offsets, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(offsets, pa.array(values, value_type))


class PositionKind(LabelKind):
    """The shared part of kinds with the ``positions`` layout: the decoded columns, the row
    checks every such kind makes, the realized-token column, the stats."""

    layout = POSITIONS

    def decoded_fields(self, vocab_size: int) -> list[pa.Field]:
        return [
            pa.field("teacher_ids", pa.list_(id_type(vocab_size)), nullable=False),
            pa.field("teacher_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("rest_mass", pa.list_(pa.float32()), nullable=False),
        ]

    def check_row(self, row: Mapping, params: Mapping, vocab_size: int, where: str) -> int:
        k = self.slots(params)
        n = len(row["target_logprobs"])
        expected = len(row["input_ids"]) - 1 - int(row["label_start"])
        if (
            n != expected
            or len(row["rest_mass"]) != n
            or len(row["teacher_ids"]) != n * k
            or len(row["teacher_logprobs"]) != n * k
        ):
            raise ValueError(
                f"{where} has inconsistent lengths (input_ids={len(row['input_ids'])}, "
                f"label_start={row['label_start']}, target_logprobs={n}, rest_mass={len(row['rest_mass'])}, "
                f"teacher_ids={len(row['teacher_ids'])}, {self.name} slots={k})"
            )
        ids = np.asarray(row["teacher_ids"], np.int64)
        if n and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{where}: teacher_ids outside [0, vocab_size={vocab_size})")
        lp = np.asarray(row["teacher_logprobs"], np.float32).reshape(n, k)
        if n:
            self.check_values(lp, np.asarray(row["rest_mass"], np.float64), params, where)
        return n

    def check_values(self, logprobs: np.ndarray, rest_mass: np.ndarray, params: Mapping, where: str) -> None:
        """Kind-specific checks of a row's (n, slots) teacher logprobs and (n,) rest mass."""
        raise NotImplementedError

    def stats(self, groups: Iterable, params: Mapping) -> dict:
        rows = tokens = unsorted = 0
        mass_sum, max_logprob = 0.0, -np.inf
        for num_rows, cols in groups:
            lp = cols["teacher_logprobs"][0].reshape(-1, self.slots(params))
            rows += num_rows
            tokens += lp.shape[0]
            if lp.size:
                mass_sum += float(np.exp(lp.astype(np.float64)).sum())
                max_logprob = max(max_logprob, float(lp.max()))
                padded = np.where(np.isneginf(lp), -1e30, lp)  # -inf: unused slots, last
                unsorted += int((np.diff(padded, axis=1) > 1e-6).any(axis=1).sum())
        problems = []
        if max_logprob > 1e-4 or unsorted:
            problems.append(f"logprobs > 0 or unsorted at {unsorted} positions")
        return {
            "rows": rows,
            "tokens": tokens,
            "mean_topk_mass": mass_sum / tokens if tokens else float("nan"),
            "max_logprob": max_logprob,
            "problems": problems,
        }


def check_sorted_logprobs(logprobs: np.ndarray, where: str) -> None:
    """Logprobs <= 0, sorted descending, finite but for trailing ``-inf`` padding."""
    if (
        not np.isfinite(logprobs[:, 0]).all()
        or np.isnan(logprobs).any()
        or np.isposinf(logprobs).any()
        or logprobs.max() > 1e-4
        or (np.diff(np.where(np.isneginf(logprobs), -1e30, logprobs), axis=1) > 1e-5).any()
    ):
        raise ValueError(
            f"{where}: teacher_logprobs must be <= 0 and sorted descending, finite but for trailing -inf padding"
        )


def remapped_ids(raw: pa.Table, table: np.ndarray, vocab_size: int) -> pa.ListArray:
    """The written ``teacher_ids`` renumbered by the shard's id table (frequent ids small)."""
    col = raw.column("teacher_ids").combine_chunks()
    ids = codec.remap_ids(col.values.to_numpy().astype(np.int64), table, vocab_size)
    return list_column(col.offsets, ids, id_type(vocab_size))


def stored_ids(stored: pa.Table, name: str, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stored id column mapped back through the id table, and its offsets."""
    ids, offsets = flat(stored, name)
    if ids.size and int(ids.max()) >= len(table):
        raise ValueError(f"{name} holds remapped id {int(ids.max())} beyond the id table ({len(table)})")
    return table[ids], offsets


def target_field() -> pa.Field:
    """The realized token's logprob, uint16 steps of ``codec.TARGET_STEP`` nats."""
    return pa.field("target_logprob_codes", pa.list_(pa.uint16()), nullable=False)


def encode_target(raw: pa.Table) -> pa.ListArray:
    col = raw.column("target_logprobs").combine_chunks()
    return list_column(col.offsets, codec.encode_target(col.values.to_numpy()), pa.uint16())


def decode_target(stored: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    codes, offsets = flat(stored, "target_logprob_codes")
    return codec.decode_target(codes), offsets
