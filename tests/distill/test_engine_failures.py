"""A dead or stopped engine fails the call in bounded time, and the next use gets a fresh engine.

vLLM alone waits for ever when its ``EngineCore`` process is SIGKILLed (what the out-of-memory
killer does) or SIGSTOPped. Each fault is caused for real on the bundled teacher's engine: only
one engine process is signalled, as the kernel or a debugger would. The shared engine of the
session (``tests.conftest.SessionEngine``) is killed twice here; its next use must start a new
one, and a labelling retry must relabel only the shards not yet committed. The two stall tests
need a short step timeout, so they share an engine of their own settings (``stall_config_path``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import psutil
import pytest
import yaml

from distill.config import load_config
from distill.configbase import ConfigError
from distill.run import engines, labelling, paths
from distill.teacher.config import EngineConfig
from distill.teacher.vllm_engine import EngineFailure, _exit_status
from pipelines.definitions import build_definitions
from tests.conftest import TINY_WINDOW

ADVICE_WORDS = ("teacher.engine.slots", "batch_windows", "KV cache", "more memory")


def _windows(n: int) -> list[list[int]]:
    return [[1 + (i * 7 + j) % 1000 for j in range(TINY_WINDOW)] for i in range(n)]


def _process(eng, name: str) -> psutil.Process:
    found = [p for p in eng.processes if f"::{name}" in eng.titles[p.pid]]
    assert found, f"no {name} process among the engine's {eng.titles}"
    return found[0]


def _wait_gone(procs, timeout: float = 30) -> list:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def _signal_mid_call(score, pid: int, sig: int, delay: float, expected: type[BaseException] = Exception):
    """Send ``sig`` to ``pid`` ``delay`` seconds into a labelling call long enough to be under way
    then (256 windows, four macro-batches); the call must raise ``expected``. Returns the
    ``pytest.raises`` info and when the signal was sent."""
    sent: list[float] = []

    def send():
        sent.append(time.monotonic())
        os.kill(pid, sig)

    timer = threading.Timer(delay, send)
    timer.start()
    try:
        with pytest.raises(expected) as failure:
            for _ in score(_windows(256), [0] * 256):
                pass
    finally:
        timer.cancel()
    assert sent, "the call ended before the signal was sent: give it more windows"
    return failure, sent[0]


@pytest.fixture(scope="module")
def stall_config_path(tiny_config_path, tmp_path_factory):
    """The tiny config with a 30 s step timeout, for the stall tests: their engines come from the
    product's registry (same settings, same engine), and are closed when the module ends. The
    session's engine keeps the default timeout. A fresh engine's first step took more than 5 s on
    a loaded 2-core machine: 30 s bounds a stall and leaves a fresh engine room."""
    root = tmp_path_factory.mktemp("stall")
    config = yaml.safe_load(Path(tiny_config_path).read_text())
    config["storage_root"] = str(root / "data")
    config["teacher"]["engine"] = {"step_timeout_s": 30.0, "cpu_kv_cache_gib": 1}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    yield path
    settings = load_config(path).teacher.engine
    for key in [key for key in engines._ENGINES if key[3] == settings]:  # these tests' engines; the session's stays
        engines._ENGINES.pop(key).close()


def test_sigkilled_engine_core_fails_the_call_at_once_and_the_next_use_starts_a_fresh_engine(engine):
    old = engine.current()
    windows = _windows(2)
    reference = list(engine.score(windows, [0, 0]))
    core = _process(old, "EngineCore")
    failure, killed_at = _signal_mid_call(engine.score, core.pid, signal.SIGKILL, 3.0)
    assert failure.type is EngineFailure, failure.value
    waited = time.monotonic() - killed_at
    assert waited < 15, f"the dead engine was noticed only after {waited:.1f} s"
    message = str(failure.value)
    assert f"pid {core.pid}" in message and "::EngineCore" in message, message
    assert "killed by SIGKILL" in message and "out-of-memory killer" in message, message
    for word in ADVICE_WORDS:
        assert word in message, (word, message)
    assert not _wait_gone(old.processes), "the failed engine's processes outlived its failure"
    assert not old.alive()

    fresh = list(engine.score(windows, [0, 0]))  # the session's engine, started anew by the registry
    new = engine.current()
    assert new is not old and not {p.pid for p in new.processes} & {p.pid for p in old.processes}
    for a, b in zip(reference, fresh):
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-5)


def test_retry_after_a_killed_worker_relabels_only_the_missing_shards(tiny_config_path, engine, tmp_path):
    config = yaml.safe_load(Path(tiny_config_path).read_text())
    config["storage_root"] = str(tmp_path / "data")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    labelling.prepare_corpus(cfg)
    names = cfg.corpus.shard_names()
    assert len(names) >= 3
    store = paths.label_store(cfg)
    keys = paths.shard_keys(cfg, names)
    handed = []

    def oom_on_second_shard():
        eng = engines.get_engine(cfg)  # the session's engine: same teacher and settings
        handed.append(eng)
        if len(handed) == 2:  # between two shards, as the kernel may pick any moment
            worker = _process(eng, "Worker")
            worker.kill()
            assert not _wait_gone([worker], 10)
        return eng

    with pytest.raises(EngineFailure) as failure:
        labelling.label_shards(cfg, names, engine_factory=oom_on_second_shard)
    assert "::Worker" in str(failure.value) and "between calls" in str(failure.value), failure.value
    committed = [n for n in names if store.is_committed(keys[n])]
    assert committed == names[:1], f"one shard was labelled before the kill, got {committed}"
    assert not list((tmp_path / "data" / "labels").rglob(".*")), "the failed shard left a temporary"

    results = labelling.label_shards(cfg, names)  # the retry, with the product's own engine lookup
    assert [results[n]["cache_hit"] for n in names] == [True] + [False] * (len(names) - 1)
    assert all(store.is_committed(keys[n]) for n in names)
    assert engine.current() is not handed[0] and engine.current().alive()


def test_step_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="step_timeout_s"):
        EngineConfig(step_timeout_s=0)


def test_exit_status_of_an_unreaped_child_names_its_signal():
    child = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # dead, not yet reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _exit_status(None, child.pid) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert _exit_status(None, child.pid) is None  # reaped: nothing left to read


def test_teacher_logits_step_is_retried_on_a_fresh_engine_after_a_stall(stall_config_path):
    """The asset turns an engine failure into a step retry (the instance retries crashed runs
    only): the first attempt finds the registry's engine with its Worker stopped, fails after
    ``step_timeout_s``, and the retried step labels on a fresh engine (left running for the
    SIGSTOP test below)."""
    cfg = load_config(stall_config_path)
    defs = build_definitions(str(stall_config_path), keep_engine_alive=True)
    instance = dg.DagsterInstance.ephemeral()
    inputs = dg.materialize(
        list(defs.assets),
        selection=["teacher_model", "corpus", "finetuned_teachers"],
        resources=defs.resources,
        instance=instance,
    )
    assert inputs.success
    stalled = engines.get_engine(cfg)  # the engine the step will find in the registry
    worker = _process(stalled, "Worker")
    worker.suspend()
    try:
        result = dg.materialize(
            list(defs.assets),
            selection=["teacher_logits"],
            partition_key=cfg.corpus.shard_names()[0],
            resources=defs.resources,
            instance=instance,
            raise_on_error=False,
        )
        events = [e.event_type_value for e in result.all_events]
        assert result.success, events
        assert "STEP_UP_FOR_RETRY" in events and "STEP_RESTARTED" in events, events
        assert stalled.failure and "stopped (by SIGSTOP" in stalled.failure, stalled.failure
        assert not _wait_gone(stalled.processes), "the stalled engine's processes outlived its failure"
        assert engines.get_engine(cfg) is not stalled
    finally:
        try:
            worker.resume()
        except psutil.NoSuchProcess:
            pass
        stalled.close()


def test_sigstopped_engine_fails_the_call_after_step_timeout(stall_config_path):
    """Runs after the retry test above: it stops the engine that test's retried step started (the
    registry's, same settings), so the two stall tests share one engine start."""
    cfg = load_config(stall_config_path)
    timeout = cfg.teacher.engine.step_timeout_s
    eng = engines.get_engine(cfg)
    try:
        list(eng.score(_windows(2), [0, 0]))  # answers while it runs
        core = _process(eng, "EngineCore")
        failure, stopped = _signal_mid_call(eng.score, core.pid, signal.SIGSTOP, 2.0, EngineFailure)
        failed = time.monotonic()
        # the stall is counted from the engine's last finished step, which came up to one step
        # (about 1.5 s here) before the stop
        last_step = eng._last_step[0]
        assert last_step <= stopped, "the engine finished a step after it was stopped"
        waited = failed - last_step
        assert timeout <= waited < timeout + 20, (
            f"failed {waited:.1f} s after the last step ({failed - stopped:.1f} s after the stop), "
            f"with step_timeout_s={timeout}"
        )
        message = str(failure.value)
        assert (
            f"step_timeout_s = {timeout:g}" in message and f"pid {core.pid}" in message and "::EngineCore" in message
        ), message
        assert "stopped (by SIGSTOP" in message, message
        assert not _wait_gone(eng.processes), "the stalled engine's processes outlived its failure"
        with pytest.raises(EngineFailure, match="closed"):
            list(eng.score(_windows(1), [0]))
    finally:
        for p in eng.processes:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        eng.close()
