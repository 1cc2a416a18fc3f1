"""Teacher resolution: the bundled GGUF is converted once; bad folders get clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from distill.teacher.checkpoint import BUNDLED, TeacherError, check_checkpoint, checkpoint_hashes, resolve_teacher
from tests.conftest import REPO


def test_bundled_teacher_converts_once(teacher_dir):
    weights = teacher_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert resolve_teacher(BUNDLED, REPO / "data") == teacher_dir
    assert weights.stat().st_mtime_ns == before, "a second resolution must not convert again"
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert checkpoint_hashes(teacher_dir) == checkpoint_hashes(teacher_dir)


def test_bad_teacher_folders(tmp_path, teacher_dir):
    with pytest.raises(TeacherError, match="does not exist"):
        resolve_teacher(str(tmp_path / "missing"), tmp_path)
    folder = tmp_path / "t"
    folder.mkdir()
    shutil.copy(teacher_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TeacherError, match="pickled weights"):
        check_checkpoint(folder)
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").symlink_to(teacher_dir / "model.safetensors")
    with pytest.raises(TeacherError, match="no tokenizer"):
        check_checkpoint(folder)
