"""Students with their own tokenizer: byte tables, a BPE tokenizer trained on the training
split, and the alignment of teacher and student positions by byte offsets.

Both tokenizations cover the same bytes. A teacher position ``i`` predicts teacher token
``i + 1``, which starts at byte ``B_t[i + 1]``; a student position ``j`` predicts student token
``j + 1``, starting at ``S[j + 1]``. Where ``B_t[i + 1] == S[j + 1]`` both models have read
exactly the same text and are about to predict the text from the same byte on: those pairs are
*aligned*, and only there is the teacher's distribution compared with the student's
(``distill.train.losses.uld_distance`` and the span-aligned KL over exactly matching tokens). Cross-entropy
covers every student token of the labelled span.

Tokens are read as bytes (``token_byte_table``): byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
maps each token's characters back through the byte-to-unicode table; SentencePiece-style
vocabularies map ``▁`` to a space and ``<0xNN>`` to its byte. Special tokens are empty.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BPE_SPECIAL = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def token_byte_table(tokenizer) -> list[bytes]:
    """The bytes each id of ``tokenizer`` stands for (special tokens: empty)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {
        i for i, t in enumerate(vocab) if t in getattr(tokenizer, "added_tokens_encoder", {})
    }
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    plain = [t for i, t in enumerate(vocab) if i not in special and t]
    byte_level = sum(all(c in decoder for c in t) for t in plain) >= 0.99 * len(plain)
    table = []
    for i, tok in enumerate(vocab):
        if i in special or tok is None:
            table.append(b"")
        elif byte_level:
            table.append(bytes(decoder[c] for c in tok if c in decoder))
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            table.append(bytes([int(tok[3:5], 16)]))
        else:
            table.append(tok.replace("\u2581", " ").encode("utf-8"))
    return table


def train_bpe(texts: Sequence[str], vocab_size: int, out: Path) -> None:
    """A byte-level BPE tokenizer of ``vocab_size`` ids trained on ``texts`` (the ``tokenizers``
    library), saved as a transformers tokenizer folder at ``out`` (lossless: any bytes encode)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BPE_SPECIAL, eos_token=BPE_SPECIAL, pad_token=BPE_SPECIAL, unk_token=None
    )
    wrapped.save_pretrained(out)


def window_bytes(ids: Sequence[int], table: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
    """The bytes of a token sequence and each token's start offset (``len(ids) + 1`` offsets)."""
    parts = [table[i] for i in ids]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return b"".join(parts), offsets


def decodable(data: bytes) -> tuple[int, int]:
    """``(lead, end)``: the longest ``data[lead:end]`` that is whole UTF-8 (a window cut from a
    tokenized document may start or end inside a multi-byte character)."""
    lead = 0
    while lead < len(data) and lead < 3 and (data[lead] & 0xC0) == 0x80:
        lead += 1
    end = len(data)
    for cut in range(4):
        try:
            data[lead : end - cut].decode("utf-8")
            return lead, end - cut
        except UnicodeDecodeError:
            continue
    data[lead:].decode("utf-8", errors="strict")  # raises, naming the position
    return lead, end


@dataclasses.dataclass
class CrossTokenizer:
    """What aligning a teacher's labels with a student of another tokenizer needs."""

    tokenizer: object
    """The student's (transformers) tokenizer."""
    teacher_bytes: list[bytes]
    student_bytes: list[bytes]
    teacher_to_student: np.ndarray
    """Student id of the token with the same bytes as each teacher id, -1 where none."""

    @classmethod
    def load(cls, teacher_tokenizer, student_dir: str | Path) -> "CrossTokenizer":
        student = AutoTokenizer.from_pretrained(student_dir)
        teacher_bytes, student_bytes = token_byte_table(teacher_tokenizer), token_byte_table(student)
        index = {b: i for i, b in enumerate(student_bytes) if b}
        mapping = np.array([index.get(b, -1) if b else -1 for b in teacher_bytes], np.int64)
        probe = "Ünïcode, tabs\tand  spaces: naïve café 123"
        ids = student(probe, add_special_tokens=False)["input_ids"]
        if b"".join(student_bytes[i] for i in ids) != probe.encode():
            raise ValueError(
                f"student tokenizer {student_dir}: its tokens do not spell the text they encode (a normalizing "
                "tokenizer); cross-tokenizer distillation aligns tokens by bytes and needs a lossless one"
            )
        return cls(student, teacher_bytes, student_bytes, mapping)

    @property
    def matched_fraction(self) -> float:
        return float((self.teacher_to_student >= 0).mean())

    def student_ids(self, text_bytes: bytes) -> tuple[list[int], np.ndarray]:
        """The student's tokens of ``text_bytes`` and their byte offsets (``len + 1``), offsets
        counted in ``text_bytes`` (undecodable edge bytes are left out)."""
        lead, end = decodable(text_bytes)
        ids = list(self.tokenizer(text_bytes[lead:end].decode("utf-8"), add_special_tokens=False)["input_ids"])
        _, offsets = window_bytes(ids, self.student_bytes)
        return ids, offsets + lead

    def align(self, row: dict, k: int) -> dict:
        """One labelled teacher row (``input_ids``, ``label_start``, ``teacher_ids``/``teacher_logprobs``
        flat (n * k), ``target_logprobs``) seen from the student: its token ids, the student
        positions it trains CE on (those predicting a token that starts inside the labelled
        span), and the aligned pairs ``(student position, teacher label index)``."""
        ids = np.asarray(row["input_ids"], np.int64)
        start = int(row["label_start"])
        data, t_off = window_bytes(ids, self.teacher_bytes)
        s_ids, s_off = self.student_ids(data)
        span_from = int(t_off[start + 1]) if start + 1 < len(t_off) else len(data)
        # student position j predicts token j + 1 (start s_off[j + 1]); CE where that token starts in the span
        ce_pos = np.nonzero(s_off[1 : len(s_ids)] >= span_from)[0]
        # teacher label index m (position start + m) predicts the token starting at t_off[start + 1 + m]
        n = len(ids) - 1 - start
        teacher_next = t_off[start + 1 : start + 1 + n].copy()
        # a special (empty) token shares its offset with the token after it: only the position
        # predicting real text is aligned
        teacher_next[np.diff(t_off)[start + 1 : start + 1 + n] == 0] = -1
        s_next = s_off[1 : len(s_ids)]
        _, s_idx, t_idx = np.intersect1d(s_next, teacher_next, return_indices=True)
        s_len = np.diff(s_off)[1 : len(s_ids)]  # bytes of the token each student position predicts
        return {
            "input_ids": s_ids,
            "ce_positions": ce_pos,
            "kd_positions": s_idx,
            "kd_labels": t_idx,
            "span_bytes": len(data) - span_from,
            "ce_bytes": int(s_len[ce_pos].sum()),
        }


def collate_cross(rows: Sequence[dict], k: int, cross: CrossTokenizer) -> dict:
    """A batch for a student with another tokenizer: its ``input_ids``/``attention_mask``/
    ``targets``/``mask`` (CE), and at aligned positions (``kd_mask``) the teacher's labels both
    as they are (``teacher_logprobs`` (B, T, K), for ULD) and restricted to ids the student
    vocabulary has exactly (``teacher_ids`` mapped to student ids, ``matched_logprobs`` with
    ``-inf`` where the student has no such token, for the span-aligned KL)."""
    aligned = [cross.align(r, k) for r in rows]
    B, T = len(rows), max(max(len(a["input_ids"]) for a in aligned), 2)
    input_ids = np.zeros((B, T), np.int64)
    attention = np.zeros((B, T), np.int64)
    targets = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), bool)
    kd_mask = np.zeros((B, T), bool)
    teacher_lp = np.full((B, T, k), -np.inf, np.float32)
    mapped = np.zeros((B, T, k), np.int64)
    matched_lp = np.full((B, T, k), -np.inf, np.float32)
    for b, (row, a) in enumerate(zip(rows, aligned)):
        ids = np.asarray(a["input_ids"], np.int64)
        L = len(ids)
        input_ids[b, :L] = ids
        attention[b, :L] = 1
        # L may be 0: a window holding only part of one character (a document's last two teacher
        # tokens can be the trailing bytes of an emoji) leaves the student nothing; the row stays padding
        targets[b, : max(L - 1, 0)] = ids[1:]
        mask[b, a["ce_positions"]] = True
        pos, lab = a["kd_positions"], a["kd_labels"]
        n = len(row["target_logprobs"])
        lp = np.asarray(row["teacher_logprobs"], np.float32).reshape(n, k)[lab]
        tid = np.asarray(row["teacher_ids"], np.int64).reshape(n, k)[lab]
        sid = cross.teacher_to_student[tid]
        kd_mask[b, pos] = True
        teacher_lp[b, pos] = lp
        mapped[b, pos] = np.maximum(sid, 0)
        matched_lp[b, pos] = np.where(sid >= 0, lp, -np.inf)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "targets": torch.from_numpy(targets),
        "mask": torch.from_numpy(mask),
        "kd_mask": torch.from_numpy(kd_mask),
        "teacher_logprobs": torch.from_numpy(teacher_lp),
        "teacher_ids": torch.from_numpy(mapped),
        "matched_logprobs": torch.from_numpy(matched_lp),
    }
