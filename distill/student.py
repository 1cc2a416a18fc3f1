"""Student construction: a copy of a subset of the teacher's layers (DistilBERT / Minitron
style), a fresh architecture sharing the teacher's tokenizer, or any local checkpoint that
shares it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distill.configbase import ConfigError, check

INITS = ("teacher_layers", "random", "checkpoint")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    init: str = "teacher_layers"
    """``teacher_layers``: copy ``num_layers`` of the teacher's layers (embeddings, norm and head too); ``random``: fresh weights with the architecture below; ``checkpoint``: load ``checkpoint``."""
    num_layers: int = 4
    """Number of transformer layers of the student."""
    layer_indices: tuple[int, ...] | None = None
    """Which teacher layers to copy (``teacher_layers``); default: evenly spaced, first and last included."""
    hidden_size: int | None = None
    """Hidden size (``random`` only; default: the teacher's)."""
    intermediate_size: int | None = None
    """MLP size (``random`` only; default: the teacher's)."""
    num_attention_heads: int | None = None
    """Attention heads (``random`` only; default: the teacher's)."""
    num_key_value_heads: int | None = None
    """Key/value heads (``random`` only; default: the teacher's)."""
    checkpoint: str | None = None
    """Local checkpoint folder (``checkpoint`` only); must share the teacher's tokenizer."""
    seed: int = 0
    """Seed for random initialization."""
    tokenizer: str | None = None
    """None: the teacher's tokenizer. Otherwise the student has its own: a local tokenizer folder,
    or ``bpe:N`` for a byte-level BPE of N ids trained on the training split with the
    ``tokenizers`` library (built once, cached under ``<root>/tokenizers``). Its labels are the
    teacher's, aligned by bytes (``distill.xtok``) and compared with ``train.cross_tokenizer_loss``;
    the evaluation compares it with the teacher in bits per byte. Needs ``init: random`` (or a
    ``checkpoint`` with that tokenizer) and ``score`` mode."""

    def __post_init__(self):
        check(self.init in INITS, "init", self.init, f"one of {INITS}")
        check(self.num_layers >= 1, "num_layers", self.num_layers, "an integer >= 1")
        if self.layer_indices is not None:
            object.__setattr__(self, "layer_indices", tuple(int(i) for i in self.layer_indices))
            check(len(self.layer_indices) == self.num_layers, "layer_indices", self.layer_indices, f"{self.num_layers} indices (num_layers)")
        check(self.init != "checkpoint" or bool(self.checkpoint), "checkpoint", self.checkpoint, "a folder when init is 'checkpoint'")
        if self.tokenizer is not None:
            check(self.init != "teacher_layers", "tokenizer", self.tokenizer, "null with init: teacher_layers (the copied embeddings are the teacher's vocabulary); use init: random")
            if self.tokenizer.startswith("bpe:"):
                check(self.tokenizer[4:].isdigit() and int(self.tokenizer[4:]) >= 300, "tokenizer", self.tokenizer,
                      "bpe:N with N >= 300 (256 bytes plus merges), or a tokenizer folder")


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    if n_student > n_teacher:
        raise ConfigError(f"student.num_layers={n_student} exceeds the teacher's {n_teacher} layers")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def build_student(teacher_dir: str | Path, cfg: StudentConfig, tokenizer_vocab: int, tokenizer=None):
    """A fp32 causal LM per ``cfg``, sharing the teacher's tokenizer, or with ``tokenizer`` (the
    student's own, ``tokenizer_vocab`` ids: a ``random`` student gets that vocabulary and its
    special ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    if cfg.init == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=torch.float32, use_safetensors=True)
        check_vocab(model.config.vocab_size, teacher_config.vocab_size if tokenizer is None else 0, tokenizer_vocab, f"student checkpoint {cfg.checkpoint}")
        return model
    config_dict = teacher_config.to_dict()
    config_dict["num_hidden_layers"] = cfg.num_layers
    if tokenizer is not None:
        config_dict["vocab_size"] = tokenizer_vocab
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config_dict[name] = getattr(tokenizer, name, None)
    if cfg.init == "random":
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(cfg, name) is not None:
                config_dict[name] = getattr(cfg, name)
        if cfg.hidden_size is not None:
            config_dict["head_dim"] = config_dict["hidden_size"] // config_dict["num_attention_heads"]
        config = AutoConfig.for_model(**config_dict)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    indices = list(cfg.layer_indices or evenly_spaced(teacher_config.num_hidden_layers, cfg.num_layers))
    if max(indices) >= teacher_config.num_hidden_layers or min(indices) < 0:
        raise ConfigError(f"student.layer_indices={indices}: the teacher has layers 0..{teacher_config.num_hidden_layers - 1}")
    config = AutoConfig.for_model(**config_dict)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True)
    teacher_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        src = name
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            parts[at] = str(indices[int(parts[at])])
            src = ".".join(parts)
        state[name] = teacher_state[src]
    student.load_state_dict(state)
    del teacher
    return student


def check_vocab(student_vocab: int, teacher_vocab: int, tokenizer_vocab: int, what: str) -> None:
    """Accept a student whose output covers every tokenizer id; padded embeddings are fine.

    Teacher label ids are < teacher_vocab; a student head smaller than that cannot score them.
    """
    if student_vocab < max(tokenizer_vocab, teacher_vocab):
        raise ConfigError(
            f"{what}: vocab_size {student_vocab} is smaller than the teacher's ({teacher_vocab}) or its tokenizer's "
            f"({tokenizer_vocab}); the student must share the teacher's tokenizer"
        )
