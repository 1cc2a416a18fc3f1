"""Engine slots: the device sets teacher engines run on, one engine per slot at a time.

``teacher.engine.slots = N`` splits the devices of a machine into N sets: on GPUs, the visible
GPU ids in groups of ``tensor_parallel_size`` (one GPU per slot for a teacher that fits one
GPU: prefill-only labelling gains nothing from tensor parallelism); on a CPU machine, the
cores in N equal blocks. A labelling process claims a free slot, pins its engine to the slot's
devices (``CUDA_VISIBLE_DEVICES``, or vLLM's CPU thread binding) and records the engine's
processes in the slot's file.

A slot is an ``flock`` on ``<slot_dir>/slot-<i>.lock``: the kernel releases it when its holder
dies, however it dies, so a crashed or killed run frees its slot. A slot is only handed out
once the engine that used it is gone: the claimer ends any process the previous holder
recorded that is still alive (the watchdog of ``distill.procs`` normally has, a few seconds
after the holder died). The Dagster ``teacher`` pool limit follows the slot count, so a
backfill runs one run per slot at the same time (``pipelines.pools``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import psutil
import torch

from distill.configbase import ConfigError
from distill.procs import descendants_alive, end_processes

SLOT_ENV = ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def device_sets(slots: int, tensor_parallel_size: int, on_gpu: bool) -> list[list[int]]:
    """The devices of each slot: GPU ids (as this process sees them named) or CPU core ids."""
    if on_gpu:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            ids = [int(d) for d in visible.split(",") if d.strip()]
        else:
            ids = list(range(torch.cuda.device_count()))
        need = slots * tensor_parallel_size
        if need > len(ids):
            raise ConfigError(
                f"teacher.engine.slots={slots} x tensor_parallel_size={tensor_parallel_size} needs {need} GPUs; "
                f"this process sees {len(ids)} ({ids})"
            )
        return [ids[i * tensor_parallel_size : (i + 1) * tensor_parallel_size] for i in range(slots)]
    cores = sorted(os.sched_getaffinity(0))
    if slots > len(cores):
        raise ConfigError(
            f"teacher.engine.slots={slots} exceeds the {len(cores)} CPU cores this process may use ({cores})"
        )
    size = len(cores) // slots
    return [cores[i * size : (i + 1) * size] for i in range(slots)]


def slot_dir(root: str | os.PathLike) -> Path:
    """Where a machine's slot files live (per host: storage may be shared by several nodes)."""
    return Path(root) / "slots" / socket.gethostname()


@dataclasses.dataclass
class Slot:
    index: int
    devices: list[int]
    handle: object  # the open lock file; closing it frees the slot

    def record_engine(self, processes) -> None:
        """Note the engine's processes (psutil), so that a later claimer can end them should
        this holder die and leave them running."""
        self._write([[p.pid, p.create_time()] for p in processes])

    def _write(self, engine: list) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"owner": os.getpid(), "devices": self.devices, "engine": engine}))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            self._write([])
            self.handle.close()


def claim_slot(
    folder: Path, sets: list[list[int]], timeout: float | None = None, poll: float = 1.0, on_wait=None
) -> Slot:
    """The first free slot of ``sets`` (waiting up to ``timeout`` seconds, None: for ever)."""
    folder.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    while True:
        for index, devices in enumerate(sets):
            handle = open(folder / f"slot-{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _end_previous_engine(handle)
            slot = Slot(index, list(devices), handle)
            slot._write([])
            return slot
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: every one of the {len(sets)} engine slot(s) stayed busy for {timeout:.0f} s")
        if on_wait is not None and not waited:
            on_wait(f"{folder}: all {len(sets)} engine slot(s) are busy; waiting for one")
            waited = True
        time.sleep(poll)


def _end_previous_engine(handle) -> None:
    """End what a dead holder of this slot left running (matched by pid and start time)."""
    handle.seek(0)
    try:
        engine = json.loads(handle.read() or "{}").get("engine", [])
    except json.JSONDecodeError:
        return  # a holder died while writing: nothing it recorded can be trusted or found
    procs = []
    for pid, started in engine:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                procs.append(p)
        except psutil.NoSuchProcess:
            pass
    leftovers = descendants_alive(procs)
    if leftovers:
        end_processes(leftovers)


@contextlib.contextmanager
def pinned(devices: list[int], on_gpu: bool):
    """Environment that pins an engine started inside the block to ``devices``; the engine's
    processes read it when they start, and this process gets its own environment back."""
    saved = {name: os.environ.get(name) for name in SLOT_ENV}
    if on_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, devices))
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
