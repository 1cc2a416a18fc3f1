"""The run's tokenizers: the teacher's, which cuts the corpus, and the student's own
(``student.tokenizer``), trained once on the training split for ``bpe:N``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from distill.config import RunConfig
from distill.run.paths import student_tokenizer_dir, teacher_dir, train_windows
from distill.train.xtok import CrossTokenizer, token_byte_table, train_bpe
from storage.writer import folder_lock


def teacher_tokenizer(cfg: RunConfig):
    """The (reference) teacher's tokenizer."""
    return AutoTokenizer.from_pretrained(teacher_dir(cfg), trust_remote_code=cfg.teacher.engine.trust_remote_code)


def prepare_student_tokenizer(cfg: RunConfig) -> Path | None:
    """Train the student's ``bpe:N`` tokenizer on the training split once (atomic, locked)."""
    folder = student_tokenizer_dir(cfg)
    if folder is None or not cfg.student.tokenizer.startswith("bpe:") or (folder / "tokenizer.json").exists():
        return folder
    with folder_lock(folder.parent / f".lock-{folder.name}", "training of this tokenizer"):
        if (folder / "tokenizer.json").exists():
            return folder
        table = token_byte_table(teacher_tokenizer(cfg))
        texts = [b"".join(table[i] for i in ids).decode("utf-8", errors="ignore") for ids, _ in train_windows(cfg)]
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        train_bpe(texts, int(cfg.student.tokenizer[4:]), tmp)
        os.replace(tmp, folder)
    return folder


def student_tokens(cfg: RunConfig) -> tuple[int, CrossTokenizer | None]:
    """The student's vocabulary size and, when it has its own tokenizer, the ``CrossTokenizer``
    that aligns it with the teacher's (else None)."""
    folder = prepare_student_tokenizer(cfg)
    if folder is None:
        return len(teacher_tokenizer(cfg)), None
    cross = CrossTokenizer.load(teacher_tokenizer(cfg), folder)
    return len(cross.tokenizer), cross
