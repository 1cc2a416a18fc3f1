"""Building the corpus: load documents from their source (local json/jsonl/parquet/csv/txt files
or a hub dataset, read through ``datasets``, or Python's own docs), split train/held-out by
document, tokenize with the teacher's tokenizer, cut long documents into overlapping windows and
assign them to shards, under the folder ``distill.data.corpus_dir`` names.

Windows: a document of ``n`` tokens is cut into windows of at most ``window`` tokens starting
every ``stride`` tokens. The label at position ``t`` of a window is the distribution of token
``t + 1``; window ``j > 0`` labels only targets its predecessor did not, so every token after
the document's first is labelled exactly once, with at least ``window - 1 - stride`` tokens of
context beyond the first window.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import itertools
import json
import os
from pathlib import Path
from pydoc_data.topics import topics
from typing import Callable, Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError

from distill.data import (
    CORPUS_MANIFEST,
    PYDOC_SOURCE,
    SYNTHETIC_SEED,
    SYNTHETIC_SOURCE,
    CorpusConfig,
    CorpusError,
    corpus_dir,
    image_store,
    text_lines,
)
from distill.vision import answer_ids, prompt_with_span
from storage.images import ImageError, check_image, image_bytes
from storage.writer import atomic_write_text, temp_name

BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "txt": "text", "text": "text"}


def _hash_unit(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _local_files(source: str) -> list[str] | None:
    """Local files named by ``source`` (comma-separated paths or globs), or None for a hub id."""
    names = [s.strip() for s in source.split(",")]
    files: list[str] = []
    for name in names:
        matches = sorted(glob.glob(str(Path(name).expanduser())))
        if matches:
            files += matches
        elif len(names) == 1 and not Path(name).suffix and not name.startswith((".", "/", "~")):
            return None
        else:
            raise CorpusError(f"{name}: no such file (corpus.source)")
    return files


class _MixedTypes(CorpusError):
    """A JSON column whose values change type between records."""


def _check_local_files(files: list[str], columns: Sequence[str] = ()) -> str:
    """The ``datasets`` builder for local corpus files, after checks that name the file and line
    of what would otherwise surface as a bare StopIteration or UnicodeDecodeError from inside
    ``datasets``: one file type, no empty file, UTF-8 text, one JSON object per JSONL line, a
    readable Parquet footer, and in JSON Lines one JSON type per column of ``columns`` across
    all files (``datasets`` turns a column whose type changes into JSON text: ``"text"`` with its
    quotes, ``["a"]``). Streams line by line (a corpus may be larger than memory)."""
    exts = {f: Path(f).suffix.lstrip(".").lower() for f in files}
    for f, ext in exts.items():
        if ext not in BUILDERS:
            raise CorpusError(
                f"{f}: unsupported file type {ext!r} (corpus.source); use json, jsonl, parquet, csv or txt"
            )
    if len({BUILDERS[e] for e in exts.values()}) > 1:
        listed = ", ".join(f"{f} ({e})" for f, e in exts.items())
        raise CorpusError(f"corpus.source mixes file types: {listed}; use files of one type")
    first_types: dict[str, tuple[str, str]] = {}  # column -> (JSON type, file:line of its first value)
    for f, ext in exts.items():
        if os.path.getsize(f) == 0:
            raise CorpusError(f"{f}: empty file (corpus.source); remove it or add documents")
        if ext == "parquet":
            try:
                pq.ParquetFile(f)  # reads the footer only
            except (pa.ArrowException, OSError) as e:
                raise CorpusError(f"{f}: not a readable Parquet file ({e}) (corpus.source)") from None
        elif ext == "json":  # JSON Lines, or one JSON document
            try:
                _check_text_file(f, jsonl=True, columns=columns, first_types=first_types)
            except _MixedTypes:
                raise
            except CorpusError:
                _check_text_file(f, jsonl=False)
        else:
            _check_text_file(f, jsonl=ext == "jsonl", columns=columns, first_types=first_types)
    return BUILDERS[next(iter(exts.values()))]


def _json_type(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _check_text_file(path: str, jsonl: bool, columns: Sequence[str] = (), first_types: dict | None = None) -> None:
    """Every line UTF-8 (and, for JSONL, one JSON object or blank, whose values in ``columns``
    have the type their first value in ``first_types`` has, nulls aside); errors name file and line."""
    records = 0
    for n, record in text_lines(path, CorpusError, jsonl):
        records += 1
        for col in columns if jsonl else ():
            value = record.get(col)
            if value is None:
                continue
            kind = _json_type(value)
            seen, where = first_types.setdefault(col, (kind, f"{path}:{n}"))
            if kind != seen:
                raise _MixedTypes(
                    f"{path}:{n}: a {kind} in column {col!r}, where {where} holds a {seen}; "
                    "give the column one type in every record"
                )
    if jsonl and not records:
        raise CorpusError(f"{path}: no JSON records, only blank lines (corpus.source)")


def load_documents(cfg: CorpusConfig) -> Iterator[tuple[str, object]]:
    """Yield ``(doc_id, text)`` pairs; ``text`` is whatever the column holds (checked later)."""
    for doc_id, record in load_records(cfg, [cfg.text_column]):
        yield doc_id, record[cfg.text_column]


def load_records(cfg: CorpusConfig, columns: list[str], optional: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
    """Yield ``(doc_id, {column: value})`` for ``columns`` (required) and ``optional`` columns
    present in the data; values are whatever the dataset holds (checked by the caller)."""
    for doc_id, record, _ in _located_records(cfg, columns, optional):
        yield doc_id, record


def _row_locations(path: str) -> Iterator[str]:
    """Where each row ``datasets`` reads from the local file ``path`` comes from, in its order:
    ``file:line`` for JSON Lines and CSV (blank lines skipped, as ``datasets`` skips them; a CSV
    record's first line), ``file row N`` (from 0) for Parquet, a JSON array and text."""
    ext = Path(path).suffix.lstrip(".").lower()
    if ext == "parquet":
        yield from (f"{path} row {r}" for r in range(pq.ParquetFile(path).metadata.num_rows))
    elif ext == "csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            line, header = 0, True
            for record in reader:
                first, line = line + 1, reader.line_num
                if not record:
                    continue
                if header:
                    header = False
                    continue
                yield f"{path}:{first}"
    elif ext in ("json", "jsonl"):
        try:
            lines = [n for n, _ in text_lines(path, CorpusError, jsonl=True)]
        except CorpusError:  # a .json file holding one JSON array
            yield from (f"{path} row {r}" for r in range(len(json.loads(Path(path).read_text("utf-8")))))
        else:
            yield from (f"{path}:{n}" for n in lines)
    else:
        with open(path, "rb") as fh:
            yield from (f"{path} row {r}" for r, _ in enumerate(fh))


def _locate_row(cfg: CorpusConfig, files: list[str] | None, index: int, doc_id: str) -> str:
    """Where row ``index`` of the corpus comes from, for an error message (computed only when
    one is raised: it re-reads the files)."""
    if files is None:
        where = f"{cfg.source} (split {cfg.split!r}) row {index}"
    else:
        rows = itertools.chain.from_iterable(_row_locations(f) for f in files)
        where = next(itertools.islice(rows, index, None), None) or f"{', '.join(files)} row {index}"
    return f"{where} (document id {doc_id!r})" if cfg.id_column else where


def _located_records(
    cfg: CorpusConfig, columns: list[str], optional: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict, Callable[[], str]]]:
    """``load_records`` plus, for each record, a function naming where it comes from
    (``file:line`` and the like), for errors about its values."""
    if cfg.source == PYDOC_SOURCE:
        if columns != [cfg.text_column]:
            raise CorpusError(
                f"{PYDOC_SOURCE}: holds plain documents only; prompt modes need a dataset with columns {columns}"
            )
        for doc_id, text in sorted(topics.items())[: cfg.max_documents]:
            yield doc_id, {cfg.text_column: text}, (lambda doc_id=doc_id: f"{PYDOC_SOURCE} topic {doc_id!r}")
        return
    files = _local_files(cfg.source)
    if files is not None:
        builder = _check_local_files(files, columns + ([cfg.id_column] if cfg.id_column else []))
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        except (DatasetGenerationError, ValueError) as e:
            # what the pre-flight cannot see (the type of a column this config does not read
            # changing between rows; with a blank line in that JSONL file, a bare ValueError)
            raise CorpusError(
                f"{', '.join(files)}: the datasets library cannot read the corpus.source file(s): {e.__cause__ or e}"
            ) from e
    else:
        try:
            ds = datasets.load_dataset(cfg.source, split=cfg.split)
        except (ConnectionError, FileNotFoundError) as e:  # offline, or no such dataset
            hint = (
                "HF_HUB_OFFLINE is on (the Makefile's default), so nothing is downloaded: run once with "
                "HF_HUB_OFFLINE=0 (make demo CONFIG=... HF_HUB_OFFLINE=0) to fetch it into the Hugging Face cache"
                if datasets.config.HF_HUB_OFFLINE
                else "check the dataset id, or give local files"
            )
            raise CorpusError(
                f"corpus.source={cfg.source!r}: no such local file, and the hub dataset cannot be loaded ({e}); {hint}"
            ) from e
    for col in columns + ([cfg.id_column] if cfg.id_column else []):
        if col not in ds.column_names:
            raise CorpusError(
                f"{cfg.source}: no column {col!r}; columns are {ds.column_names} (set the corpus.*_column options)"
            )
    wanted = columns + [c for c in optional if c in ds.column_names]
    if cfg.image_column and isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # the file's own bytes, not a re-encoding
    folders = _row_folders(files) if files is not None and cfg.image_column else None
    n = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    for i in range(n):
        row = ds[i]
        doc_id = str(row[cfg.id_column]) if cfg.id_column else f"row-{i:09d}"
        record = {c: row[c] for c in wanted}
        image = record.get(cfg.image_column)
        if folders is not None and isinstance(image, str) and i < len(folders):
            record[cfg.image_column] = str(folders[i] / image)  # relative to its data file; absolute stays
        yield doc_id, record, (lambda i=i, doc_id=doc_id: _locate_row(cfg, files, i, doc_id))


def _row_folders(files: list[str]) -> list[Path]:
    """The folder of the data file each row comes from, in ``datasets``' row order: what an image
    path in a row is relative to."""
    return [Path(f).parent for f in files for _ in _row_locations(f)]


def _synthetic_files(cfg: CorpusConfig, root: Path) -> CorpusConfig:
    """``cfg`` reading ``synthetic_shapes`` from its folder of images and questions, written once
    under ``root`` (``max_documents`` questions, default 1000); any other source as it is."""
    if cfg.source != SYNTHETIC_SOURCE:
        return cfg
    from distill.synthetic import write_dataset

    n = cfg.max_documents or 1000
    folder = write_dataset(Path(root) / "corpora" / f"{SYNTHETIC_SOURCE}-{n}-{SYNTHETIC_SEED}", n, SYNTHETIC_SEED)
    return dataclasses.replace(cfg, source=str(folder), id_column=cfg.id_column or "id")


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, label_start)`` for each window of a document of ``n_tokens`` tokens."""
    out = []
    start, last_target = 0, 0  # last_target: absolute index of the last labelled target token
    while True:
        end = min(start + window, n_tokens)
        # position t predicts absolute token start + t + 1; label those beyond last_target
        label_start = max(0, last_target - start)
        out.append((start, end, label_start))
        last_target = end - 1
        if end >= n_tokens:
            return out
        start += stride


def encode_prompt(tokenizer, text: str, cfg: CorpusConfig) -> list[int]:
    """Prompt token ids: the chat template's user turn and assistant start, or the plain text."""
    if not cfg.chat_template:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(
            f"{getattr(tokenizer, 'name_or_path', 'teacher')}: the tokenizer has no chat template; set "
            "corpus.chat_template: false"
        )
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []) + [
        {"role": "user", "content": text}
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _answer_index(where: Callable[[], str], answer, candidates: list[str], cfg: CorpusConfig) -> int:
    if answer is None:
        return -1
    if isinstance(answer, str) and answer in candidates:
        return candidates.index(answer)
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool) and 0 <= answer < len(candidates):
        return int(answer)
    raise CorpusError(
        f"{where()}: {cfg.answer_column}={answer!r}, expected an index into its {len(candidates)} candidates or one "
        "of them"
    )


def _check_record(where: Callable[[], str], record: dict, mode: str, cfg: CorpusConfig) -> dict | None:
    """A validated record, None for a counted skip (empty text); raises for unusable values,
    naming where the record comes from (``where()``: ``file:line``, file and row...)."""
    column = cfg.prompt_column if mode != "score" or cfg.images else cfg.text_column
    text = record[column]
    if text is None:
        return None
    if not isinstance(text, str):
        kind = type(text).__name__
        raise CorpusError(
            f"{where()}: {'an' if kind[0] in 'aeiou' else 'a'} {kind} in column {column!r}, expected text"
        )
    if not text.strip():
        return None
    out = {"text": text}
    if cfg.images:
        out["image"] = record[cfg.image_column]
        if mode == "score":
            response = record[cfg.response_column]
            if not isinstance(response, str) or not response.strip():
                raise CorpusError(
                    f"{where()}: column {cfg.response_column!r} needs the answer as non-empty text, got {response!r}"
                )
            out["response"] = response
    if mode == "candidates":
        cands = record[cfg.candidates_column]
        if not isinstance(cands, (list, tuple)) or len(cands) < 2 or not all(isinstance(c, str) and c for c in cands):
            raise CorpusError(
                f"{where()}: column {cfg.candidates_column!r} must be a list of at least two non-empty strings, got "
                f"{cands!r}"
            )
        out["candidates"] = list(cands)
        out["answer"] = _answer_index(
            where, record.get(cfg.answer_column) if cfg.answer_column else None, out["candidates"], cfg
        )
    return out


def _image_rows(doc_id: str, record: dict, ids: list[int], mode: str, cfg: CorpusConfig, tokenizer) -> list[dict] | str:
    """The corpus row of one image question (``ids``: its prompt, image tokens expanded): in score
    mode with its answer's tokens, which are the labelled ones; or the name of a skip's counter."""
    row = {
        "doc_id": doc_id,
        "window_index": 0,
        "label_start": len(ids) - 1,
        "image": record["image_hash"],
        "image_span": record["image_span"],
    }
    if mode == "generate":
        return "dropped_long" if len(ids) >= cfg.window else [{**row, "input_ids": ids, "prompt_text": record["text"]}]
    full = ids + answer_ids(tokenizer, record["response"])
    return "dropped_long" if len(full) > cfg.window else [{**row, "input_ids": full}]


def _rows_for(
    doc_id: str, record: dict, ids: list[int], mode: str, cfg: CorpusConfig, tokenizer, where: Callable[[], str]
) -> list[dict] | str:
    """Corpus rows of one document or prompt, or the name of the counter of a skip."""
    if cfg.images:
        return _image_rows(doc_id, record, ids, mode, cfg, tokenizer)
    if mode == "score":
        if len(ids) < cfg.min_tokens:
            return "dropped_short"
        return [
            {"doc_id": doc_id, "window_index": w, "input_ids": ids[start:end], "label_start": label_start}
            for w, (start, end, label_start) in enumerate(windows(len(ids), cfg.window, cfg.effective_stride))
        ]
    row = {
        "doc_id": doc_id,
        "window_index": 0,
        "input_ids": ids,
        "label_start": len(ids) - 1,
        "prompt_text": record["text"],
    }
    if mode == "generate":
        return "dropped_long" if len(ids) >= cfg.window else [row]
    cand_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in record["candidates"]]
    for c, t in zip(record["candidates"], cand_ids):
        if not t:
            raise CorpusError(f"{where()}: candidate {c!r} has no tokens")
    if len(ids) + max(map(len, cand_ids)) > cfg.window:
        return "dropped_long"
    return [{**row, "candidates": record["candidates"], "candidate_ids": cand_ids, "answer": record["answer"]}]


def _corpus_table(rows: list[dict], mode: str, images: bool = False) -> pa.Table:
    cols = {
        "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
        "window_index": pa.array([r["window_index"] for r in rows], pa.int32()),
        "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
        "label_start": pa.array([r["label_start"] for r in rows], pa.int32()),
    }
    if mode != "score":
        cols["prompt_text"] = pa.array([r["prompt_text"] for r in rows], pa.string())
    if images:
        cols["image"] = pa.array([r["image"] for r in rows], pa.string())
        cols["image_span"] = pa.array([r["image_span"] for r in rows], pa.list_(pa.int32()))
    if mode == "candidates":
        cols["candidates"] = pa.array([r["candidates"] for r in rows], pa.list_(pa.string()))
        cols["candidate_ids"] = pa.array([r["candidate_ids"] for r in rows], pa.list_(pa.list_(pa.int32())))
        cols["answer"] = pa.array([r["answer"] for r in rows], pa.int32())
    return pa.table(cols)


def build_corpus(
    cfg: CorpusConfig,
    tokenizer,
    tokenizer_hash: str,
    root: Path,
    batch_docs: int = 256,
    mode: str = "score",
    processor=None,
) -> dict:
    """Read, tokenize and shard the corpus under ``corpus_dir``; return its manifest.

    ``mode``: ``score`` cuts documents (``text_column``) into windows; ``generate`` makes one
    row per prompt (``prompt_column``, chat template applied); ``candidates`` one row per
    example (prompt, ``candidates_column`` list, optional ``answer_column``).
    With ``corpus.image_column`` each row is one image question (``processor``: the vision-language
    teacher's, which expands the image placeholder): every image is checked and put in the image
    store (``distill.data.image_store``) before any row is cut, and rows name its hash.

    Always re-reads the source (the data may have changed); shard files are replaced
    atomically and the manifest is written last. Shard fingerprints depend only on content,
    so unchanged shards keep their teacher-label cache keys.
    """
    out = corpus_dir(root, cfg, tokenizer_hash, mode)
    manifest_path = out / CORPUS_MANIFEST
    source = _synthetic_files(cfg, root)
    if cfg.images:
        if processor is None:
            raise CorpusError(
                f"corpus.image_column={cfg.image_column!r}: images need a vision-language teacher (teacher.vision), "
                "whose processor puts them into the prompts"
            )
        if mode == "candidates":
            raise CorpusError("corpus.image_column: candidates mode reads no images; use score or generate mode")
        columns = [cfg.prompt_column, cfg.image_column] + ([cfg.response_column] if mode == "score" else [])
    elif mode == "score":
        columns = [cfg.text_column]
    else:
        columns = [cfg.prompt_column] + ([cfg.candidates_column] if mode == "candidates" else [])
    images = image_store(root)
    optional = (cfg.answer_column,) if mode == "candidates" and cfg.answer_column else ()
    docs: list[tuple[str, dict, Callable[[], str]]] = []
    counts = {"documents_read": 0, "dropped_empty": 0, "dropped_short": 0, "dropped_long": 0, "dropped_duplicate_id": 0}
    if cfg.images:
        counts["dropped_bad_image"] = 0
    seen: set[str] = set()
    for doc_id, raw, where in _located_records(source, columns, optional):
        counts["documents_read"] += 1
        record = _check_record(where, raw, mode, cfg)
        if record is None:
            counts["dropped_empty"] += 1
            continue
        if doc_id in seen:
            counts["dropped_duplicate_id"] += 1
            continue
        if cfg.images:
            try:
                data = image_bytes(record["image"], f"{where()}: column {cfg.image_column!r}")
                check_image(data, f"{where()}: column {cfg.image_column!r}", cfg.max_image_pixels)
            except ImageError as e:
                if cfg.bad_images == "skip":
                    counts["dropped_bad_image"] += 1
                    continue
                raise CorpusError(f"{e} (corpus.bad_images: skip drops such examples instead)") from None
            record["image_hash"] = images.put(data)
            del record["image"]
        seen.add(doc_id)
        docs.append((doc_id, record, where))
    if not docs:
        raise CorpusError(f"{cfg.source}: no non-empty documents in column {columns[0]!r}")
    # split by document: a hash of the id, so adding or editing one document moves no other
    heldout = {d for d, _, _ in docs if _hash_unit(d, "split") < cfg.heldout_fraction}
    if not heldout:  # a small corpus still gets one held-out document
        heldout = {min(docs, key=lambda d: _hash_unit(d[0], "split"))[0]}
    if len(docs) < 2:
        raise CorpusError(
            f"{cfg.source}: only {len(docs)} non-empty document(s); need at least 2 to split train/held-out"
        )
    shards: dict[str, list[dict]] = {name: [] for name in cfg.shard_names()}
    kept = {"train": 0, "heldout": 0}
    for b in range(0, len(docs), batch_docs):
        batch = docs[b : b + batch_docs]
        if cfg.images:
            encoded = []
            for _, r, _ in batch:
                ids, span = prompt_with_span(processor, images.open(r["image_hash"]), r["text"], cfg.system_prompt)
                encoded.append(ids)
                r["image_span"] = span
        elif mode == "score":
            encoded = tokenizer([r["text"] for _, r, _ in batch])["input_ids"]
        else:
            encoded = [encode_prompt(tokenizer, r["text"], cfg) for _, r, _ in batch]
        for (doc_id, record, where), ids in zip(batch, encoded):
            rows = _rows_for(doc_id, record, list(ids), mode, cfg, tokenizer, where)
            if isinstance(rows, str):
                counts[rows] += 1
                continue
            split = "heldout" if doc_id in heldout else "train"
            kept[split] += 1
            n = cfg.heldout_shards if split == "heldout" else cfg.train_shards
            shards[f"{split}-{int(_hash_unit(doc_id, 'shard') * n):05d}"] += rows
    if not sum(kept.values()):
        raise CorpusError(f"{cfg.source}: every document was dropped ({counts}); check corpus.window and the data")
    # checked before any shard is written: an empty split otherwise surfaces only at evaluation,
    # after the teacher has labelled and the students have trained
    for split, advice in (("train", "lower it"), ("heldout", "raise it")):
        if not kept[split]:
            drops = {k: v for k, v in counts.items() if k.startswith("dropped") and v}
            raise CorpusError(
                f"{cfg.source}: corpus.heldout_fraction={cfg.heldout_fraction} leaves the {split} split empty "
                f"({kept['train']} train and {kept['heldout']} held-out documents kept of "
                f"{counts['documents_read']} read{f', dropped {drops}' if drops else ''}); {advice} or add documents"
            )
    # a document lives in one shard: fewer documents than shards leaves shards with nothing in
    # them that the teacher would still be started for and training would read
    for split, field, advice in (
        ("train", "train_shards", "lower corpus.heldout_fraction"),
        ("heldout", "heldout_shards", "raise corpus.heldout_fraction"),
    ):
        shards_wanted = getattr(cfg, field)
        if kept[split] < shards_wanted:
            raise CorpusError(
                f"{cfg.source}: corpus.heldout_fraction={cfg.heldout_fraction} leaves {kept[split]} {split} "
                f"document(s) for corpus.{field}={shards_wanted} shards ({kept['train']} train and "
                f"{kept['heldout']} held-out documents kept of {counts['documents_read']} read), so "
                f"{shards_wanted - kept[split]} shard(s) would be empty; set corpus.{field} to at most {kept[split]}, "
                f"{advice} or add documents"
            )
    out.mkdir(parents=True, exist_ok=True)
    shard_info = {}
    for name, rows in shards.items():
        rows.sort(key=lambda r: (r["doc_id"], r["window_index"]))
        table = _corpus_table(rows, mode, cfg.images)
        h = hashlib.sha256(tokenizer_hash.encode())
        for r in rows:
            h.update(f"{r['doc_id']}\x1f{r['window_index']}\x1f{r['label_start']}\x1f".encode())
            h.update(np.asarray(r["input_ids"], np.int64).tobytes())
            if mode == "candidates":
                h.update(json.dumps([r["candidate_ids"], r["answer"]]).encode())
            if cfg.images:
                h.update(f"image\x1f{r['image']}".encode())
        path = out / f"{name}.parquet"
        tmp = temp_name(path)  # host, boot and pid: nodes sharing the folder never write one temporary
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
        shard_info[name] = {
            "file": path.name,
            "fingerprint": h.hexdigest()[:32],
            "windows": len(rows),
            "documents": len({r["doc_id"] for r in rows}),
            # generate: response lengths are the teacher's to decide; candidates: one label per example
            "labelled_tokens": None
            if mode == "generate"
            else len(rows)
            if mode == "candidates"
            else int(sum(len(r["input_ids"]) - 1 - r["label_start"] for r in rows)),
        }
    manifest = {
        "source": cfg.source,
        "mode": mode,
        "config": dataclasses.asdict(cfg),
        "tokenizer_hash": tokenizer_hash,
        "documents": sum(kept.values()),
        "heldout_documents": kept["heldout"],
        **counts,
        "shards": shard_info,
    }
    if mode == "candidates":
        manifest["gold_answers"] = sum(r["answer"] >= 0 for rows in shards.values() for r in rows)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
