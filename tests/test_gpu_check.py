"""``make gpu-check`` and ``benchmarks/gpu_check.py`` where no GPU is visible: they fail within
seconds with one clear line, before creating a venv or installing anything.

The GPU path itself needs a CUDA machine (``make gpu-check`` there); the tests with
``CUDA_VISIBLE_DEVICES=""`` run on one too, since that hides every device.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.processes import run_group

REPO = Path(__file__).resolve().parents[1]
MESSAGE = "gpu-check: no CUDA GPU visible"
HINT = "run this on a machine with an NVIDIA GPU and drivers"
FAST_S = 10  # the check itself takes well under a second; slack for a loaded 2-core machine
NO_GPU = 3


def gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    out = run_group([smi, "-L"], timeout=60)
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


no_gpu_here = pytest.mark.skipif(
    gpu_present(), reason="a GPU is visible here: make gpu-check would run the check for real"
)
needs_make = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("python3") is None, reason="needs make and python3 on PATH"
)


@pytest.fixture
def no_install_env(tmp_path):
    """An environment whose PATH starts with shims that record (and refuse) any venv creation or
    package install: ``python3 -m venv|pip``, ``pip``, ``pip3``, ``uv``. Returns (env, marker)."""
    real = shutil.which("python3")
    marker = tmp_path / "installs.log"
    shims = tmp_path / "bin"
    shims.mkdir()
    scripts = {
        "python3": (
            f'case "$1 $2" in "-m venv"|"-m pip"|"-m ensurepip") echo "python3 $*" >> "{marker}"; exit 1;; esac\n'
            f'exec "{real}" "$@"\n'
        ),
        **{name: f'echo "{name} $*" >> "{marker}"\nexit 1\n' for name in ("pip", "pip3", "uv")},
    }
    for name, body in scripts.items():
        path = shims / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env, marker


def run_timed(cmd: list[str], env: dict) -> tuple[object, float]:
    t0 = time.monotonic()
    out = run_group(cmd, timeout=60, cwd=REPO, env=env)
    return out, time.monotonic() - t0


def assert_fails_fast(out, seconds: float, marker: Path, venv_existed: bool) -> None:
    assert out.returncode != 0, f"exit 0 without a GPU:\n{out.stdout}\n{out.stderr}"
    assert seconds < FAST_S, f"took {seconds:.1f} s to fail"
    lines = [line for line in out.stderr.splitlines() if line.startswith(MESSAGE)]
    assert len(lines) == 1 and HINT in lines[0], out.stderr
    assert not marker.exists(), f"tried to create a venv or install: {marker.read_text()}"
    if not venv_existed:
        assert not (REPO / ".venv-gpu").exists(), "make gpu-check created .venv-gpu without a GPU"
    assert "Traceback" not in out.stderr


def test_gpu_check_has_no_prerequisites():
    """``gpu-check`` runs its wrapper and nothing else: not the .venv install, whatever its stamp."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "GPU_CHECK_ARGS", "MAKEFLAGS")}
    out = run_group(["make", "--no-print-directory", "-n", "gpu-check"], timeout=60, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert [line.strip() for line in out.stdout.splitlines()] == [
        "bash benchmarks/gpu_check.sh --config configs/demo.yaml"
    ], out.stdout


@no_gpu_here
@needs_make
def test_make_gpu_check_fails_fast_without_gpu(no_install_env):
    env, marker = no_install_env
    venv_existed = (REPO / ".venv-gpu").exists()
    stamp = REPO / ".venv" / ".installed"
    stamp_before = stamp.stat().st_mtime if stamp.exists() else None
    out, seconds = run_timed(["make", "--no-print-directory", "gpu-check"], env)
    assert_fails_fast(out, seconds, marker, venv_existed)
    assert f"Error {NO_GPU}" in out.stderr  # make reports the wrapper's own status
    assert (stamp.stat().st_mtime if stamp.exists() else None) == stamp_before, (
        "make gpu-check touched the .venv install"
    )


@no_gpu_here
def test_script_fails_fast_without_gpu(no_install_env):
    env, marker = no_install_env
    out, seconds = run_timed([sys.executable, "benchmarks/gpu_check.py"], env)
    assert out.returncode == NO_GPU
    assert_fails_fast(out, seconds, marker, (REPO / ".venv-gpu").exists())
    assert out.stdout == ""


@needs_make
@pytest.mark.parametrize("how", ["make", "script"])
def test_hidden_gpus_fail_fast(no_install_env, how):
    """``CUDA_VISIBLE_DEVICES=""`` hides every device, also on a GPU machine: same fast failure."""
    env, marker = no_install_env
    env["CUDA_VISIBLE_DEVICES"] = ""
    venv_existed = (REPO / ".venv-gpu").exists()
    cmd = (
        ["make", "--no-print-directory", "gpu-check"] if how == "make" else [sys.executable, "benchmarks/gpu_check.py"]
    )
    out, seconds = run_timed(cmd, env)
    assert_fails_fast(out, seconds, marker, venv_existed)
    assert "CUDA_VISIBLE_DEVICES" in out.stderr
    if how == "script":
        assert out.returncode == NO_GPU


def fake_nvidia_smi(env: dict, stdout: str, status: int) -> None:
    shims = Path(env["PATH"].split(os.pathsep)[0])
    path = shims / "nvidia-smi"
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {status}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_driver_without_device_fails_fast(no_install_env):
    """``nvidia-smi`` present but no device (what it prints on such a machine, exit 6)."""
    env, marker = no_install_env
    fake_nvidia_smi(env, "No devices were found", 6)
    out, seconds = run_timed([sys.executable, "benchmarks/gpu_check.py"], env)
    assert out.returncode == NO_GPU
    assert_fails_fast(out, seconds, marker, (REPO / ".venv-gpu").exists())
    assert "nvidia-smi -L failed with exit 6: No devices were found" in out.stderr


@needs_make
def test_with_a_gpu_the_wrapper_installs_into_its_own_venv(no_install_env, tmp_path):
    """The probe is the only gate: with a GPU listed, the wrapper goes on to create the GPU venv
    (here a scratch path, refused by the shim), never touching .venv."""
    env, marker = no_install_env
    fake_nvidia_smi(env, "GPU 0: NVIDIA H200 (UUID: GPU-fake)", 0)
    env["GPU_VENV"] = str(tmp_path / "venv-gpu")
    out = run_group(["make", "--no-print-directory", "gpu-check"], timeout=60, cwd=REPO, env=env)
    assert out.returncode != 0
    assert MESSAGE not in out.stderr
    assert marker.read_text().splitlines() == [f"python3 -m venv {tmp_path / 'venv-gpu'}"]
