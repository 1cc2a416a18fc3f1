"""Labelling runs: the teacher resolved and checked against the config, fine-tuned ensemble
members, the corpus, label shards (one teacher, or an ensemble's members mixed), their checks,
and the labelled splits opened for training and evaluation."""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Sequence

from transformers import AutoConfig

from distill.config import RunConfig, check_against_teacher, check_member_tokenizers
from distill.corpus import build_corpus
from distill.data import image_store, read_corpus_shard
from distill.run.engines import close_engine, engine_name, get_engine
from distill.run.paths import (
    IncompleteLabelsError,
    corpus_shards,
    ensemble_meta,
    finetuned_dir,
    label_store,
    run_images,
    shard_keys,
    single_run,
    split_of,
    teacher_dir,
    teacher_hashes,
    train_windows,
    vision_teacher_dir,
)
from distill.run.tokenizing import teacher_tokenizer
from distill.teacher.checkpoint import checkpoint_hashes, resolve_teacher, text_config
from distill.teacher.ensemble import ENSEMBLE_CODE_VERSION, mix_shard
from distill.teacher.finetune import FINETUNE_INFO, finetune
from distill.teacher.labels import LABEL_CODE_VERSION, label_shard, mode_settings
from storage.reader import Shard, ShardError, shard_stats
from storage.schema import ShardMeta
from storage.writer import folder_lock, remove_stale_temporaries


def _on_wait(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_teacher(cfg: RunConfig) -> dict:
    """Resolve (and, for the bundled teacher, convert once) the teacher checkpoint, and check the
    config against it (``distill.config.check_against_teacher``)."""
    vision = prepare_vision_teacher(cfg) if cfg.teacher.vision is not None else {}
    path = teacher_dir(cfg)
    members = [resolve_teacher(m.model, cfg.root) for m in cfg.teacher.members] if cfg.teacher.models else []
    model_config = AutoConfig.from_pretrained(path)
    language = model_config.get_text_config()
    check_against_teacher(
        cfg, language.to_dict(), [(str(folder), checkpoint_hashes(folder)["tokenizer"]) for folder in members]
    )
    return {
        "path": str(path),
        **checkpoint_hashes(path),
        "members": len(cfg.teacher.members),
        "vocab_size": language.vocab_size,
        "layers": language.num_hidden_layers,
        "architecture": (model_config.architectures or ["?"])[0],
        **{f"vision_{k}": v for k, v in vision.items() if k in ("accuracy", "chance", "seconds", "reused")},
    }


def prepare_vision_teacher(cfg: RunConfig, progress: bool = True) -> dict:
    """Build the vision-language teacher of ``teacher.vision`` once (a finished one is reused):
    ``distill.teacher.vlm.build_vlm`` from the text teacher, under a folder keyed like the
    fine-tuned teachers. Returns its build summary."""
    from distill.teacher.vlm import VLM_INFO, build_vlm

    out = vision_teacher_dir(cfg)
    with folder_lock(out, "building of this vision-language teacher", on_wait=_on_wait):
        info = out / "model" / VLM_INFO
        if info.exists():
            return {**json.loads(info.read_text()), "path": str(out / "model"), "reused": True}
        for tmp in out.glob(".model.tmp-*"):  # left by a run that died while saving
            shutil.rmtree(tmp, ignore_errors=True)
        summary = build_vlm(resolve_teacher(cfg.teacher.model, cfg.root), cfg.teacher.vision, out / "model", progress)
        return {**summary, "path": str(out / "model"), "reused": False}


def prepare_finetuned(cfg: RunConfig, progress: bool = True) -> list[dict]:
    """Fine-tune every ``teacher.models`` member that asks for it (a finished one is reused)."""
    done = []
    for member in cfg.teacher.members:
        if member.finetune is None:
            continue
        out = finetuned_dir(cfg, member)
        with folder_lock(out, "fine-tuning of this teacher", on_wait=_on_wait):
            info = out / "model" / FINETUNE_INFO
            if info.exists():
                done.append({**json.loads(info.read_text()), "path": str(out / "model"), "reused": True})
                continue
            for tmp in out.glob(".model.tmp-*"):  # left by a run that died while saving
                shutil.rmtree(tmp, ignore_errors=True)
            summary = finetune(
                resolve_teacher(member.model, cfg.root),
                train_windows(cfg),
                member.finetune,
                out / "model",
                progress=progress,
            )
            done.append({**summary, "path": str(out / "model"), "reused": False})
    return done


def prepare_corpus(cfg: RunConfig) -> dict:
    """Build (or find) the corpus: documents split, tokenized by the teacher's tokenizer, windowed, sharded."""
    processor = None
    if cfg.corpus.images:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(teacher_dir(cfg))
    return build_corpus(
        cfg.corpus,
        teacher_tokenizer(cfg),
        teacher_hashes(cfg)["tokenizer"],
        cfg.root,
        mode=cfg.teacher.mode,
        processor=processor,
    )


def expected_meta(cfg: RunConfig, split: str) -> dict:
    """Fields every shard of this run's ``split`` must carry (checked by the reader)."""
    if cfg.teacher.ensemble:
        _, ensemble_hash, members = ensemble_meta(cfg)
        return {
            "teacher_hash": ensemble_hash,
            "tokenizer_hash": teacher_hashes(cfg)["tokenizer"],
            "vocab_size": text_config(teacher_dir(cfg)).vocab_size,
            **cfg.teacher.label_kind(split),
            "mode": cfg.teacher.mode,
            "temperature": 1.0,
            "images": cfg.corpus.images,
        }
    cfg = single_run(cfg)
    hashes = teacher_hashes(cfg)
    return {
        "teacher_hash": hashes["weights"],
        "tokenizer_hash": hashes["tokenizer"],
        "vocab_size": text_config(teacher_dir(cfg)).vocab_size,
        **cfg.teacher.label_kind(split),
        "mode": cfg.teacher.mode,
        "temperature": 1.0,
        "features": cfg.teacher.feature_params,
        "images": cfg.corpus.images,
    }


def label_shards(cfg: RunConfig, names: Sequence[str], engine_factory=None) -> dict[str, dict]:
    """Label the named corpus shards (cache hits cost nothing); returns per-shard results."""
    if cfg.teacher.ensemble:
        return label_ensemble(cfg, names, engine_factory)
    cfg = single_run(cfg)
    hashes = teacher_hashes(cfg)
    keys = shard_keys(cfg, names)
    store = label_store(cfg)
    factory = engine_factory or (lambda: get_engine(cfg))
    if store.is_local and store.root.exists():
        remove_stale_temporaries(store.root)  # left by writers that crashed
    # the corpus's images, and the store the labels name when it is another (beside remote labels)
    images, beside = (image_store(cfg.root), run_images(cfg)) if cfg.corpus.images else (None, None)
    beside = beside if beside is not None and beside.location != images.location else None
    results = {}
    for name in names:
        entry, windows = read_corpus_shard(cfg.root, cfg.corpus, hashes["tokenizer"], name, cfg.teacher.mode)
        split = split_of(name)
        expect = expected_meta(cfg, split)
        meta = ShardMeta(
            teacher=cfg.teacher.model,
            teacher_hash=hashes["weights"],
            tokenizer_hash=hashes["tokenizer"],
            vocab_size=expect["vocab_size"],
            kind=expect["kind"],
            kind_params=expect["kind_params"],
            temperature=1.0,
            mode=cfg.teacher.mode,
            engine=engine_name(),
            data_fingerprint=entry["fingerprint"],
            shard=name,
            split=split,
            cache_key=keys[name],
            code_version=LABEL_CODE_VERSION,
            settings=mode_settings(cfg.teacher),
            features=expect["features"],
            images=expect["images"],
        )
        results[name] = {
            "key": keys[name],
            **label_shard(factory, store, keys[name], meta, windows, cfg.teacher, images=images, images_beside=beside),
        }
    return results


def label_ensemble(cfg: RunConfig, names: Sequence[str], engine_factory=None) -> dict[str, dict]:
    """Label the named shards with every member (each cached on its own), one member after the
    other (a member's engine is closed before the next member labels), then mix them."""
    runs, ensemble_hash, members = ensemble_meta(cfg)
    # fine-tuned members label from their own folders, whose tokenizer files must still be the base's
    check_member_tokenizers(cfg, [(run.teacher.model, teacher_hashes(run)["tokenizer"]) for run, _ in runs])
    pending = [
        any(not label_store(run).is_committed(key) for key in shard_keys(run, names).values()) for run, _ in runs
    ]
    member_results = []
    for i, (run, _) in enumerate(runs):
        member_results.append(label_shards(run, names, engine_factory if i == 0 else None))
        if pending[i] and any(pending[i + 1 :]):
            close_engine(run)  # the next member's engine needs the device
    keys = shard_keys(cfg, names)
    store = label_store(cfg)
    expect = expected_meta(cfg, "train")
    results = {}
    for name in names:
        split = split_of(name)
        shards = [
            label_store(run).open(member_results[i][name]["key"], expect=expected_meta(run, split))
            for i, (run, _) in enumerate(runs)
        ]
        meta = ShardMeta(
            teacher="ensemble:" + "+".join(f"{m['model']}@{m['weight']:.4g}" for m in members),
            teacher_hash=ensemble_hash,
            tokenizer_hash=expect["tokenizer_hash"],
            vocab_size=expect["vocab_size"],
            kind=expect["kind"],
            kind_params=expect["kind_params"],
            temperature=1.0,
            mode=cfg.teacher.mode,
            engine=shards[0].meta.engine,
            data_fingerprint=shards[0].meta.data_fingerprint,
            shard=name,
            split=split,
            cache_key=keys[name],
            code_version=ENSEMBLE_CODE_VERSION,
            settings={"ensemble": [{**m, "cache_key": member_results[i][name]["key"]} for i, m in enumerate(members)]},
        )
        started = time.time()
        mixed = mix_shard(store, keys[name], meta, shards, [m["weight"] for m in members])
        labelled = [r[name] for r in member_results]
        fresh = [r for r in labelled if not r["cache_hit"]]
        results[name] = {
            "key": keys[name],
            **mixed,
            "cache_hit": mixed["cache_hit"] and not fresh,
            "teacher_seconds": sum(r["teacher_seconds"] for r in labelled),
            "members": [{"key": r["key"], "cache_hit": r["cache_hit"]} for r in labelled],
            "labelled_from": min([r["labelled_from"] for r in fresh] + [started]),
            "labelled_until": time.time(),
        }
    return results


def check_shards(cfg: RunConfig, names: Sequence[str]) -> dict:
    """Integrity and coverage of labelled shards against the corpus manifest.

    ``problems`` lists anything wrong (schema, provenance, checksum, counts, logprob sanity);
    ``mean_topk_mass`` is the average teacher probability inside the stored top-k.
    """
    corpus = corpus_shards(cfg)
    keys, store = shard_keys(cfg, names), label_store(cfg)
    expect = {split: expected_meta(cfg, split) for split in {split_of(n) for n in names}}
    problems, mass, tokens = [], 0.0, 0
    for name in names:
        try:
            shard = store.open(keys[name], expect=expect[split_of(name)])
        except ShardError as e:
            problems.append(f"{name}: {e}")
            continue
        stats = shard_stats(shard)
        entry = corpus[name]
        want_rows = entry["windows"] * (cfg.teacher.sampling.n if cfg.teacher.mode == "generate" else 1)
        want = entry["labelled_tokens"]  # None for generate: answer lengths are the teacher's
        if (
            stats["rows"] != want_rows
            or (want is not None and stats["tokens"] != want)
            or (want is None and stats["tokens"] < stats["rows"])
        ):
            problems.append(
                f"{name}: {stats['rows']} rows / {stats['tokens']} labels, corpus expects {want_rows} / "
                f"{want if want is not None else '>= 1 per answer'}"
            )
        problems += [f"{name}: {problem}" for problem in stats["problems"]]  # as the label kind reports them
        if stats["tokens"]:
            mass += stats["mean_topk_mass"] * stats["tokens"]
            tokens += stats["tokens"]
    return {"problems": problems, "mean_topk_mass": mass / tokens if tokens else float("nan"), "tokens": tokens}


def open_split(cfg: RunConfig, split: str, verify_checksum: bool = True) -> list[Shard]:
    """Every committed, verified shard of ``split``; raises naming the missing partitions.
    ``verify_checksum=False`` skips the sha256 (training ranks, once their launcher verified)."""
    names = [n for n in cfg.corpus.shard_names() if split_of(n) == split]
    keys = shard_keys(cfg, names)
    store = label_store(cfg)
    expect = expected_meta(cfg, split)
    missing = [n for n in names if not store.is_committed(keys[n])]
    if missing:
        raise IncompleteLabelsError(
            f"{len(missing)} {split} shard(s) not labelled yet: {missing}; materialize teacher_logits for those "
            "partitions"
        )
    shards = []
    for n in names:
        shard = store.open(keys[n], expect=expect, verify_checksum=verify_checksum)
        if shard.rows:
            shards.append(shard)
    if not shards:
        raise ShardError(store.root, f"every {split} shard is empty; add documents or lower corpus.{split}_shards")
    return shards
