"""Whatever ends a labelling process, its vLLM engine processes end too: SIGTERM (a scheduler,
a Dagster run termination), SIGINT (Ctrl-C, Dagster's cancel), SIGKILL (the out-of-memory
killer, a node drain). Only the labelling process is signalled, as those do; the engine
(``VLLM::EngineCore``, ``VLLM::Worker``) and the watchdog must all be gone soon after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO
from tests.processes import describe, marked_processes, start_group, stop_group, wait_until_gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_engine_process_outlives_the_labelling_process(sig, tiny_config_path):
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        "ENGINE_TEST_MARK": mark,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_PROCESS_NAME_PREFIX": f"{os.environ['VLLM_PROCESS_NAME_PREFIX']}-{mark}",
    }
    proc = start_group(
        [sys.executable, "-m", "tests.distill.engine_worker", str(tiny_config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:  # vLLM logs to stdout too
            if line.strip() == "ready":
                break
        else:
            raise AssertionError("the engine did not start")
        time.sleep(1)  # labelling is under way
        titles = [" ".join(p.cmdline()) for p in marked_processes("ENGINE_TEST_MARK", mark)]
        assert any("::EngineCore" in t for t in titles), f"no EngineCore process found among {titles}"
        os.kill(proc.pid, sig)  # the labelling process alone, not its group
        proc.wait(timeout=120)
        left = wait_until_gone("ENGINE_TEST_MARK", mark, timeout=45)
        assert not left, f"still running after {signal.Signals(sig).name}: {describe(left)}"
    finally:
        stop_group(proc, grace=5)
