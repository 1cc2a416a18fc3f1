"""Models for evaluation: where and in which precision they run, loading a checkpoint onto
that device, and a checkpoint's size and parameter count read from its files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText


def eval_device(precision: str = "auto") -> tuple[torch.device, bool]:
    """Where and in which precision models are evaluated: the training device, CUDA if
    available, with bf16 autocast when ``train.precision`` resolves to bf16 there (``bf16``, or
    ``auto`` on CUDA); otherwise the CPU in fp32. Returns ``(device, bf16)``."""
    if torch.cuda.is_available():
        return torch.device("cuda"), precision in ("auto", "bf16")
    return torch.device("cpu"), False


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM (or a vision-language model: image and text in, text out) from the safetensors
    checkpoint folder ``path``, on ``device`` in ``dtype``."""
    vision = hasattr(AutoConfig.from_pretrained(path), "vision_config")
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: the CUDA allocator's view, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def checkpoint_bytes(path: str | Path) -> int:
    """The size of the safetensors files of a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def checkpoint_parameters(path: str | Path) -> int:
    """Parameter count of a safetensors checkpoint folder, from the tensor shapes in the files'
    headers (no weights read); a tied embedding is stored, and counted, once."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files to count parameters in")
    total = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(v["shape"]) for name, v in header.items() if name != "__metadata__")
    return total
