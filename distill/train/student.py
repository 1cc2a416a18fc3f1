"""Student construction: a copy of a subset of the teacher's layers (DistilBERT / Minitron
style), a fresh architecture sharing the teacher's tokenizer, or any local checkpoint that
shares it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from distill.configbase import ConfigError
from distill.train.config import StudentConfig


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
    torch.manual_seed(cfg.seed)
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    if hasattr(teacher_config, "vision_config"):
        return _vision_student(teacher_dir, teacher_config, cfg)
    if cfg.init == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint, dtype=torch.float32, use_safetensors=True)
        check_vocab(
            model.config.vocab_size,
            teacher_config.vocab_size if tokenizer is None else 0,
            tokenizer_vocab,
            f"student checkpoint {cfg.checkpoint}",
        )
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
        raise ConfigError(
            f"student.layer_indices={indices}: the teacher has layers 0..{teacher_config.num_hidden_layers - 1}"
        )
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


def _vision_student(teacher_dir: str | Path, teacher_config, cfg: StudentConfig):
    """A vision-language student: ``init: teacher_layers`` keeps the teacher's vision encoder and
    connector whole and ``num_layers`` of its text layers (``layer_indices``, default evenly
    spaced); ``init: checkpoint`` loads a vision-language checkpoint as it is."""
    if cfg.init == "checkpoint":
        return AutoModelForImageTextToText.from_pretrained(cfg.checkpoint, dtype=torch.float32, use_safetensors=True)
    if cfg.init != "teacher_layers":
        raise ConfigError(
            f"student.init={cfg.init!r}: a vision-language teacher's student is cut from it (teacher_layers) or "
            "loaded (checkpoint)"
        )
    text = teacher_config.get_text_config()
    indices = list(cfg.layer_indices or evenly_spaced(text.num_hidden_layers, cfg.num_layers))
    if max(indices) >= text.num_hidden_layers or min(indices) < 0:
        raise ConfigError(
            f"student.layer_indices={indices}: the teacher has text layers 0..{text.num_hidden_layers - 1}"
        )
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True)
    language = getattr(teacher.model, "text_model", None) or teacher.model.language_model
    language.layers = torch.nn.ModuleList(language.layers[i] for i in indices)
    teacher.config.text_config.num_hidden_layers = len(indices)
    for i, layer in enumerate(language.layers):  # KV-cache slots follow the new order
        layer.self_attn.layer_idx = i
    layer_types = getattr(teacher.config.text_config, "layer_types", None)
    if layer_types:
        teacher.config.text_config.layer_types = [layer_types[i] for i in indices]
    return teacher


def check_vocab(student_vocab: int, teacher_vocab: int, tokenizer_vocab: int, what: str) -> None:
    """Accept a student whose output covers every tokenizer id; padded embeddings are fine.

    Teacher label ids are < teacher_vocab; a student head smaller than that cannot score them.
    """
    if student_vocab < max(tokenizer_vocab, teacher_vocab):
        raise ConfigError(
            f"{what}: vocab_size {student_vocab} is smaller than the teacher's ({teacher_vocab}) or its tokenizer's "
            f"({tokenizer_vocab}); the student must share the teacher's tokenizer"
        )
