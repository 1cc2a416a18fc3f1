"""The suite ends what its tests started even when it is itself ended by SIGTERM (``timeout``,
a CI runner): conftest turns SIGTERM into an interrupt, so ``finally`` blocks and the session's
census run. Without it Python exits at once and a server in its own process group outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from tests.processes import start_group, stop_group

REPO = Path(__file__).resolve().parents[1]

INNER = """
import time
from pathlib import Path
from tests.processes import start_group, stop_group

def test_holds_a_process_group():
    proc = start_group(["sleep", "{seconds}"])
    try:
        Path("{ready}").write_text(str(proc.pid))
        time.sleep(300)
    finally:
        stop_group(proc, grace=5)
"""


def test_sigterm_to_the_suite_ends_what_tests_started(tmp_path):
    seconds = str(900_000 + uuid.uuid4().int % 99_999)  # a command line no other process has
    ready = tmp_path / "ready"
    (tmp_path / "test_inner.py").write_text(INNER.format(seconds=seconds, ready=ready))
    suite = start_group(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.conftest",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_inner.py"),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and suite.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), (
            suite.communicate(timeout=30)[0].decode()[-3000:]
            if suite.poll() is not None
            else "inner test never started"
        )
        child = int(ready.read_text())
        os.kill(suite.pid, signal.SIGTERM)  # the suite alone, as timeout(1) does
        out = suite.communicate(timeout=60)[0].decode()
        assert "KeyboardInterrupt: the test session received signal SIGTERM" in out, out[-3000:]
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, (
            f"sleep {seconds} outlived the suite"
        )
    finally:
        stop_group(suite, grace=5)
        for p in psutil.process_iter(["cmdline"]):
            if p.info["cmdline"] == ["sleep", seconds]:
                p.kill()
