"""Training runs: the distilled student and the CE-only baseline, trained (or resumed, or
reused when finished) in their keyed folders, in this process or in several under ``torchrun``,
each with its model card."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from distill.config import RunConfig
from distill.run.card import card_info, write_card
from distill.run.labelling import open_split
from distill.run.launch import launch
from distill.run.paths import run_images, student_dir, teacher_dir
from distill.run.tokenizing import prepare_student_tokenizer, student_tokens
from distill.train.trainer import CKPT_DIR, latest_checkpoint, train
from storage.cache import set_manifest
from storage.writer import atomic_write_text, folder_lock


def remove_stale_dirs(out: Path) -> None:
    """Temporary model and checkpoint folders of a trainer that died before renaming them (the
    caller holds the folder's lock, so no live trainer owns them)."""
    for tmp in [*out.glob(".*.tmp-*"), *(out / "checkpoints").glob(".*.tmp-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def train_student(cfg: RunConfig, baseline: bool = False, launcher=None, log=print) -> dict:
    """Train (or resume, or reuse when finished) the distilled student or the CE-only baseline.

    With ``train.nproc_per_node`` x ``train.nnodes`` > 1 the ranks run under ``torchrun``,
    started by ``launcher`` (``distill.run.launch.Launcher``; default: a subprocess); else training
    runs in this process.
    """
    out = student_dir(cfg, baseline)
    # two runs of one config (two launches, a retry beside a stuck run) must not write the same
    # checkpoints: the second waits, then finds the first one's model
    with folder_lock(out, "training of this student", on_wait=lambda msg: print(msg, file=sys.stderr, flush=True)):
        summary_path = out / "summary.json"
        if summary_path.exists() and (out / "model").exists():
            summary = {**json.loads(summary_path.read_text()), "reused": True, "out_dir": str(out)}
            if not (out / "model" / "README.md").exists():  # trained before model cards existed
                write_student_card(cfg, summary, open_split(cfg, "train", verify_checksum=False), baseline)
            return summary
        remove_stale_dirs(out)
        shards = open_split(cfg, "train")
        atomic_write_text(out / "train_set.json", json.dumps(set_manifest(shards), indent=1))
        atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1, default=str))
        train_cfg = cfg.baseline_train if baseline else cfg.train
        if train_cfg.world_size == 1:
            vocab, cross = student_tokens(cfg)
            summary = train(
                cfg.student, train_cfg, teacher_dir(cfg), shards, out, vocab, cross=cross, images=run_images(cfg)
            )
        else:
            prepare_student_tokenizer(cfg)  # once, here, not by every rank
            try:
                launch(out, cfg.to_dict(), train_cfg, baseline, launcher, log=log)
            except Exception as e:
                last = latest_checkpoint(out / CKPT_DIR)
                resume = (
                    f"checkpoint {last.name}" if last else "the start (no checkpoint yet; see train.checkpoint_every)"
                )
                raise RuntimeError(
                    f"{out}: training in {train_cfg.world_size} processes failed ({e}); the next run resumes from "
                    f"{resume}"
                ) from e
            if not summary_path.exists():
                raise RuntimeError(f"{out}: the training processes exited without writing summary.json")
            summary = json.loads(summary_path.read_text())
        summary = {**summary, "reused": False, "out_dir": str(out)}
        write_student_card(cfg, summary, shards, baseline)
        return summary


def write_student_card(cfg: RunConfig, summary: dict, shards, baseline: bool, results=None, table=None) -> None:
    """The student's model card (``model/README.md``), with the evaluation's table when given."""
    write_card(
        Path(summary["out_dir"]) / "model", card_info(cfg, summary, shards, baseline, teacher_dir(cfg)), results, table
    )
