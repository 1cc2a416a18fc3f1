"""Engine slots without an engine: device sets, claiming, and a dead holder's leftovers."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from distill.configbase import ConfigError
from distill.teacher.slots import claim_slot, device_sets, pinned
from tests.conftest import REPO


def test_device_sets_split_cores_and_gpus(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    assert device_sets(1, 1, on_gpu=False) == [cores]
    if len(cores) >= 2:
        halves = device_sets(2, 1, on_gpu=False)
        assert len(halves) == 2 and not set(halves[0]) & set(halves[1])
    with pytest.raises(ConfigError, match="teacher.engine.slots=.* exceeds the .* CPU cores"):
        device_sets(len(cores) + 1, 1, on_gpu=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # GPU ids as this process sees them named
    assert device_sets(2, 2, on_gpu=True) == [[4, 5], [6, 7]]
    assert device_sets(4, 1, on_gpu=True) == [[4], [5], [6], [7]]
    with pytest.raises(ConfigError, match="needs 6 GPUs; this process sees 4"):
        device_sets(3, 2, on_gpu=True)


def test_pinned_environment_is_restored(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pinned([2], on_gpu=True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with pinned([1], on_gpu=False):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_busy_slots_are_skipped_and_a_timeout_names_the_folder(tmp_path):
    a = claim_slot(tmp_path, [[0], [1]])
    b = claim_slot(tmp_path, [[0], [1]])
    assert (a.index, b.index) == (0, 1)
    with pytest.raises(TimeoutError, match="every one of the 2 engine slot"):
        claim_slot(tmp_path, [[0], [1]], timeout=0.5, poll=0.1)
    a.release()
    assert claim_slot(tmp_path, [[0], [1]], timeout=1).index == 0


def test_dead_holders_engine_is_ended_before_the_slot_is_handed_out(tmp_path):
    """A holder that died (its lock released by the kernel) left an 'engine' running: the next
    claimer ends it first."""
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    holder_code = (
        "import sys, time, psutil\n"
        "from distill.teacher.slots import claim_slot\n"
        f"slot = claim_slot(__import__('pathlib').Path({str(tmp_path)!r}), [[0]])\n"
        f"slot.record_engine([psutil.Process({engine.pid})])\n"
        "print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):
            claim_slot(tmp_path, [[0]], timeout=0.3, poll=0.1)
        holder.kill()
        holder.wait()
        slot = claim_slot(tmp_path, [[0]], timeout=10)
        # ended (and reaped by the claimer's psutil wait, so Popen sees no exit status): no TimeoutExpired
        engine.wait(timeout=10)
        assert not psutil.pid_exists(engine.pid)
        slot.release()
    finally:
        for p in (holder, engine):
            p.kill()
            p.wait()
