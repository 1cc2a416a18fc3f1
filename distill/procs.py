"""Process hygiene: nothing a process of ours starts may outlive it.

vLLM runs its engine (``VLLM::EngineCore``) and workers in child processes. When the process
that started them dies without running its shutdown (SIGKILL, the out-of-memory killer,
SIGTERM's default action, a cancelled Dagster step), they are re-parented to init and keep the
teacher's memory: gigabytes of RAM here, the GPU's memory on a GPU machine, where the retry then
runs out of memory.

``guard_children()`` starts one small watchdog process per guarded process (idempotent). The
watchdog records the guarded process's descendants twice a second and, once the guarded process
is gone (the pipe it holds closes, or its pid disappears or is reused), ends every recorded
descendant still alive: SIGTERM, then SIGKILL after a grace period. Processes are identified by
(pid, start time), so a reused pid is never signalled. The watchdog needs only ``psutil`` and
the standard library, and runs this file as a script (no package import, starts in ~0.1 s).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

import psutil

POLL_S = 0.5
GRACE_S = 5.0

_guard: tuple[int, subprocess.Popen] | None = None


def guard_children() -> None:
    """Make sure every descendant this process starts from now on dies with it."""
    global _guard
    if _guard is not None and _guard[0] == os.getpid() and _guard[1].poll() is None:
        return
    # own session: a signal to our process group (Ctrl-C, killpg) must not take the watchdog first
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    _guard = (os.getpid(), proc)  # the pipe's write end stays open for this process's life


def is_resource_tracker(proc) -> bool:
    """Whether ``proc`` (psutil) is multiprocessing's resource tracker: shared by everything the
    process starts and ended by itself when its owner exits, so never an engine's to end."""
    try:
        return any("multiprocessing.resource_tracker" in part for part in proc.cmdline())
    except psutil.NoSuchProcess:
        return True


def descendants_alive(procs) -> list:
    """The processes of ``procs`` (psutil.Process) still running (zombies count as gone)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def end_processes(procs, grace: float = GRACE_S) -> list:
    """SIGTERM ``procs`` (and their current descendants), SIGKILL what is left after ``grace``
    seconds; returns the processes that had to be killed."""
    everything = {}
    for p in procs:
        try:
            everything[p.pid] = p
            for c in p.children(recursive=True):
                everything[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    targets = list(everything.values())
    for p in targets:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(targets, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return alive


def _watch(owner_pid: int) -> None:
    me = os.getpid()
    try:
        owner = psutil.Process(owner_pid)
    except psutil.NoSuchProcess:
        return
    known: dict[tuple[int, float], psutil.Process] = {}  # by (pid, start time): a reused pid is another process
    polls = 0
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the owner's end of the pipe closed: it exited or was killed
        try:
            if not owner.is_running() or owner.status() == psutil.STATUS_ZOMBIE:
                break
            for child in owner.children(recursive=True):
                if child.pid != me:
                    known.setdefault((child.pid, child.create_time()), child)
        except psutil.NoSuchProcess:
            if not owner.is_running():
                break
            continue  # a child ended while we listed it
        polls += 1
        if polls % 120 == 0:  # forget ended children, so a long-lived owner costs no memory
            alive = {id(p) for p in descendants_alive(known.values())}
            known = {key: p for key, p in known.items() if id(p) in alive}
    leftovers = descendants_alive(known.values())
    if leftovers:
        end_processes(leftovers)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
