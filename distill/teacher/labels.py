"""Teacher labelling of corpus shards into the content-addressed label store.

A shard's content key covers everything its labels depend on; a committed key is reused with
no teacher work at all (not even an engine start: engines are created lazily). The engine
returns the teacher's top-K of every row; the shard's label kind (``storage.kinds``) says how
large K is and makes its labels from them (the top-k as they are, or draws from them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from distill.teacher.config import TeacherConfig
from storage.cache import LabelStore, content_key
from storage.kinds import POSITIONS, LabelKind, kind_of
from storage.kinds import features as feature_columns
from storage.schema import SCHEMA_VERSION, ShardMeta

LABEL_CODE_VERSION = "labels-3"


def mode_settings(cfg: TeacherConfig) -> dict:
    """The settings of ``cfg.mode`` that the labels depend on (in the cache key and the shard
    metadata); the label kind's own parameters are ``TeacherConfig.label_kind``'s."""
    settings = {}
    if cfg.mode == "generate":
        settings["sampling"] = dataclasses.asdict(cfg.sampling)
    if cfg.mode == "candidates":
        settings["length_normalize"] = cfg.length_normalize
    return settings


def shard_key(
    teacher_hashes: dict,
    fingerprint: str,
    cfg: TeacherConfig,
    dtype: str,
    window: int | None = None,
    split: str = "train",
) -> str:
    """Content key of one labelled shard: everything its labels depend on.

    ``teacher_hashes`` (``checkpoint_hashes``): the weights hash covers ``config.json`` too, so a
    changed rope scaling or norm eps relabels. ``fingerprint``: the shard's token content.
    ``window`` (``corpus.window``) is keyed in ``generate`` mode only, where it caps each answer
    at ``window - len(prompt)`` tokens; in ``score`` and ``candidates`` mode it only decides
    which rows exist (how documents are cut, which examples are dropped), and the fingerprint
    already hashes every row's tokens and ``label_start``, so keying it there would relabel
    identical rows (``distill.corpus.build_corpus`` hashes ``input_ids`` and ``label_start`` of
    each row into the fingerprint). ``distill.run.paths.shard_keys`` passes it.

    The engine (vLLM) version is recorded in each shard's metadata but deliberately not keyed:
    relabelling every shard on each upgrade costs a full teacher pass for differences at
    numerical-noise level. To relabel after an upgrade anyway, change ``teacher.relabel_tag``.
    """
    fields = {
        "weights": teacher_hashes["weights"],
        "tokenizer": teacher_hashes["tokenizer"],
        "data": fingerprint,
        "mode": cfg.mode,
        **cfg.label_kind(split),
        "temperature": 1.0,
        "dtype": dtype,
        "code": LABEL_CODE_VERSION,
        "schema": SCHEMA_VERSION,
        "relabel_tag": cfg.relabel_tag,
        **mode_settings(cfg),
    }
    if cfg.labeller == "device":  # exact tails, whole-vocabulary draws: labels the logprobs path does not make
        fields["labeller"] = "device"
    if cfg.features is not None:  # hidden states stored beside the labels, in their own columns' format
        fields["features"] = {**cfg.feature_params, "format": feature_columns.FORMAT}
    if cfg.mode == "generate":  # answers are capped at window - len(prompt); the fingerprint has prompts only
        fields["window"] = window
    return content_key(fields)


def prompt_seed(base: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}\x1f{doc_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


class RowLabels:
    """What the engine computes for one label kind (``request``: top ``k`` and any ``draws``; and
    the teacher features, with ``features``: ``ShardMeta.features``) and how a row's written label
    columns are made from it (``of``)."""

    def __init__(self, kind: LabelKind, params: dict, features: dict | None = None):
        self.kind, self.params, self.features = kind, params, features or {}
        self.request = kind.engine_request(params) if kind.layout == POSITIONS else {"k": 0}  # candidates: no top-k

    @property
    def k(self) -> int:
        return self.request["k"]

    def score(self, engine, windows: list, label_starts: list, doc_ids: list, window_idx: list, images=None):
        """``engine.score`` of these rows, with the draws and their per-row seeds where asked
        (``images``: one per row, for a vision-language teacher)."""
        draws = self.request.get("draws", 0)
        extra = {"features": True} if self.features else {}
        if images is not None:
            extra["images"] = images
        if not draws:
            return engine.score(windows, label_starts, k=self.k, **extra)
        seeds = [self.kind.row_seed(self.params, d, w) for d, w in zip(doc_ids, window_idx)]
        return engine.score(windows, label_starts, k=self.k, draws=draws, seeds=seeds, **extra)

    def of(self, labels: dict, doc_id: str, window_index: int) -> dict:
        row = self.kind.from_teacher(labels, self.params, doc_id, window_index)
        if self.features:
            row["feature_scales"] = labels["feature_scales"].reshape(-1)
            row["feature_codes"] = labels["feature_codes"].reshape(-1)
        return row


class _Images:
    """The images of a part of a corpus shard that names them (column ``image``), opened from the
    image store: what the engine is given beside each row's tokens, and the hash each label row keeps."""

    def __init__(self, part: pa.Table, store):
        self.hashes = part.column("image").to_pylist() if store is not None else None
        self.engine_args = {}
        if store is not None:  # each image with where its expansion lies in the row's ids (distill.vision)
            spans = part.column("image_span").to_pylist()
            self.engine_args["images"] = [(store.open(h), span) for h, span in zip(self.hashes, spans)]

    def column(self, i: int) -> dict:
        return {"image": self.hashes[i]} if self.hashes is not None else {}


def _score_rows(engine, part: pa.Table, cfg: TeacherConfig, labels: RowLabels, images=None) -> list[dict]:
    input_ids = part.column("input_ids").to_pylist()
    label_starts = part.column("label_start").to_pylist()
    doc_ids = part.column("doc_id").to_pylist()
    window_idx = part.column("window_index").to_pylist()
    pictures = _Images(part, images)
    rows = []
    scored = labels.score(engine, input_ids, label_starts, doc_ids, window_idx, **pictures.engine_args)
    for i, row in enumerate(scored):
        rows.append(
            {
                "doc_id": doc_ids[i],
                "window_index": window_idx[i],
                "input_ids": np.asarray(input_ids[i], np.int64),
                "label_start": label_starts[i],
                **pictures.column(i),
                **labels.of(row, doc_ids[i], window_idx[i]),
            }
        )
    return rows


def _generate_rows(engine, part: pa.Table, cfg: TeacherConfig, labels: RowLabels, images=None) -> list[dict]:
    """One row per answer: prompt + answer tokens, labels on the answer tokens only."""
    prompts = part.column("input_ids").to_pylist()
    doc_ids = part.column("doc_id").to_pylist()
    texts = part.column("prompt_text").to_pylist()
    seeds = [prompt_seed(cfg.sampling.seed, d) for d in doc_ids]
    pictures = _Images(part, images)
    rows = []
    answers = engine.generate(prompts, seeds, cfg.sampling, k=labels.k, **pictures.engine_args)
    for i, samples in enumerate(answers):
        for j, sample in enumerate(samples):
            rows.append(
                {
                    "doc_id": doc_ids[i],
                    "window_index": j,
                    "input_ids": np.concatenate([np.asarray(prompts[i], np.int64), sample["response_ids"]]),
                    "label_start": len(prompts[i]) - 1,
                    "prompt_text": texts[i],
                    "response_text": sample["text"],
                    "finish_reason": sample["finish_reason"],
                    **pictures.column(i),
                    **labels.of(sample, doc_ids[i], j),
                }
            )
    return rows


def _answer_rows(engine, part: pa.Table, cfg: TeacherConfig, labels: RowLabels, images=None) -> list[dict]:
    """``generate`` rows whose answers are given (``response_ids``: another model's, e.g. the
    student's in an on-policy round): prompt + answer scored teacher-forced, labels on the
    answer tokens only, exactly the rows ``_generate_rows`` writes for the teacher's own answers."""
    prompts = part.column("input_ids").to_pylist()
    answers = part.column("response_ids").to_pylist()
    seqs = [np.asarray(p + a, np.int64) for p, a in zip(prompts, answers)]
    cols = {
        c: part.column(c).to_pylist()
        for c in ("doc_id", "window_index", "prompt_text", "response_text", "finish_reason")
    }
    rows = []
    scored = labels.score(engine, seqs, [len(p) - 1 for p in prompts], cols["doc_id"], cols["window_index"])
    for i, row in enumerate(scored):
        rows.append(
            {
                "doc_id": cols["doc_id"][i],
                "window_index": cols["window_index"][i],
                "input_ids": seqs[i],
                "label_start": len(prompts[i]) - 1,
                "prompt_text": cols["prompt_text"][i],
                "response_text": cols["response_text"][i],
                "finish_reason": cols["finish_reason"][i],
                **labels.of(row, cols["doc_id"][i], cols["window_index"][i]),
            }
        )
    return rows


def candidate_distribution(
    sums: np.ndarray, counts: np.ndarray, length_normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate scores (sum, or mean, of token logprobs) and their log-softmax."""
    scores = sums / counts if length_normalize else sums
    shifted = scores - scores.max()
    return scores, shifted - np.log(np.exp(shifted).sum())


def _candidate_rows(engine, part: pa.Table, cfg: TeacherConfig, labels: RowLabels, images=None) -> list[dict]:
    prompts = part.column("input_ids").to_pylist()
    cand_ids = part.column("candidate_ids").to_pylist()
    texts, cands = part.column("prompt_text").to_pylist(), part.column("candidates").to_pylist()
    doc_ids, answers = part.column("doc_id").to_pylist(), part.column("answer").to_pylist()
    rows = []
    for i, (sums, counts) in enumerate(engine.score_candidates(prompts, cand_ids)):
        scores, logprobs = candidate_distribution(sums, counts, cfg.length_normalize)
        rows.append(
            {
                "doc_id": doc_ids[i],
                "prompt_text": texts[i],
                "prompt_ids": prompts[i],
                "candidates": cands[i],
                "candidate_ids": cand_ids[i],
                "answer": answers[i],
                "candidate_scores": scores.astype(np.float32),
                "teacher_logprobs": logprobs.astype(np.float32),
            }
        )
    return rows


_MODE_ROWS = {"score": _score_rows, "generate": _generate_rows, "candidates": _candidate_rows}


def label_shard(
    engine_factory: Callable[[], object],
    store: LabelStore,
    key: str,
    meta: ShardMeta,
    windows: pa.Table,
    cfg: TeacherConfig | None = None,
    progress: bool = True,
    images=None,
    images_beside=None,
) -> dict:
    """Label ``windows`` (corpus rows of ``cfg.mode``) into ``store`` under ``key`` unless already committed,
    as labels of ``meta.kind``: the engine returns the teacher's top ``kind.teacher_k`` of every
    row and the kind makes its labels from them. In ``generate`` mode a ``response_ids`` column
    gives the answers (scored, not generated).

    ``images``: the image store (``storage.images.ImageStore``) of windows that name their image
    (column ``image``), for a vision-language teacher; each label row keeps the hash.
    ``images_beside``: another image store (the one beside a remote ``store``) that gets every
    image the shard names before the shard is committed, so its readers find them there.

    Engine work and Parquet writing overlap: the rows of one macro-batch are written by a
    background thread while the engine runs the next; memory stays bounded by one macro-batch
    of Python objects whatever the shard size.
    """
    cfg = cfg or TeacherConfig()
    existing = store.lookup(key)
    if existing is not None:
        return {
            "cache_hit": True,
            "rows": existing.rows,
            "tokens": existing.tokens,
            "teacher_seconds": 0.0,
            "path": str(existing.path),
        }
    copied = images_beside.copy_from(images, windows.column("image").to_pylist()) if images_beside else 0
    engine = engine_factory()
    labels = RowLabels(kind_of(meta.kind), meta.kind_params, meta.features)
    if cfg.mode == "score":
        lengths = pc.list_value_length(windows.column("input_ids"))
        total, unit = (
            int(pc.sum(lengths).as_py() or 0)
            - int(pc.sum(windows.column("label_start")).as_py() or 0)
            - windows.num_rows,
            "tok",
        )
    else:
        total, unit = windows.num_rows, "prompt"
    bar = tqdm(total=total, desc=f"label {meta.shard} ({cfg.mode})", unit=unit, unit_scale=True, disable=not progress)
    step = getattr(getattr(engine, "cfg", None), "batch_windows", 64)
    make_rows = (
        _answer_rows if cfg.mode == "generate" and "response_ids" in windows.column_names else _MODE_ROWS[cfg.mode]
    )
    t0 = time.perf_counter()
    with store.writer(key, meta) as writer, ThreadPoolExecutor(1) as pool, bar:
        pending = None
        for offset in range(0, windows.num_rows, step):
            part = windows.slice(offset, step)
            batch = make_rows(engine, part, cfg, labels, images)
            bar.update(sum(len(r["target_logprobs"]) for r in batch) if cfg.mode == "score" else part.num_rows)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_many, batch)
        if pending is not None:
            pending.result()
    seconds = time.perf_counter() - t0
    if writer.lost_race:
        # another run or node committed this key while we labelled: its shard stands and ours
        # was discarded, so this is a cache hit (the teacher time spent is still reported)
        return {
            "cache_hit": True,
            "lost_race": True,
            "rows": writer.record["rows"],
            "tokens": writer.record["tokens"],
            "teacher_seconds": seconds,
            "path": str(store.path_for(key)),
        }
    return {
        "cache_hit": False,
        "rows": writer.rows,
        "tokens": writer.tokens,
        "teacher_seconds": seconds,
        "path": str(store.path_for(key)),
        "labelled_from": time.time() - seconds,
        "labelled_until": time.time(),
        "slot": getattr(getattr(engine, "slot", None), "index", None),
        **({"images_copied": copied} if images_beside else {}),
    }
