"""Processes started by tests: own process groups with default signal handling, stopped on every
path (SIGTERM, then SIGKILL of the whole group), and a census of what the suite left running.

Every process the suite starts inherits ``SESSION_ENV`` in its environment (set by conftest),
so the census finds them even after they were re-parented to init.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

SESSION_ENV = "DISTILL_TEST_SESSION"


def _default_signals() -> None:
    # a suite started from a background job inherits SIGINT as ignored, and Dagster maps
    # SIGTERM onto its SIGINT handler: restore the default so SIGTERM works in the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_group(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``Popen`` in a new session (its own process group) with default SIGINT handling."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_default_signals, **kwargs)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group led by ``proc``; SIGKILL the group if it outlives ``grace``
    seconds, and SIGKILL whatever of the group is left after its leader exits."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def vllm_prefix(*marks: str) -> str:
    """A ``VLLM_PROCESS_NAME_PREFIX`` carrying ``marks``: vLLM retitles its processes
    (``VLLM::EngineCore``) with setproctitle, which overwrites the memory /proc shows as their
    environment, so an engine is found by the marks in its title instead."""
    return "-".join(["VLLM", *marks])


def marked_processes(name: str, value: str, exclude: set[int] = frozenset()) -> list:
    """Live processes (psutil) whose environment holds ``name=value``, or whose command line
    (a vLLM process title made with ``vllm_prefix``) holds ``value``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        if p.pid in exclude:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(name) == value or value in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def wait_until_gone(name: str, value: str, timeout: float, exclude: set[int] = frozenset()) -> list:
    """Poll until no process carries ``name=value``; returns those still alive at ``timeout``."""
    deadline = time.time() + timeout
    while True:
        left = marked_processes(name, value, exclude)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def describe(procs) -> str:
    import psutil

    lines = []
    for p in procs:
        try:
            lines.append(f"pid {p.pid}: {' '.join(p.cmdline())[:160] or p.name()}")
        except psutil.NoSuchProcess:
            pass
    return "; ".join(lines)


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` (text, captured output) in its own process group, which is ended on
    every path: a timeout or a failing caller leaves no worker of ``cmd`` (torchrun ranks) behind."""
    proc = start_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc, grace=5)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
