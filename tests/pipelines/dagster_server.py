"""The real Dagster web server, daemon and code server (``dagster dev``) on 127.0.0.1, for tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.processes import start_group, stop_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def dagster_dev(config_path: str | Path, home: Path, log: Path, timeout: float = 180):
    """Start ``dagster dev`` on a free loopback port; yield the port; stop it (process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DISTILL_CONFIG": str(config_path), "DAGSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = start_group(
        [str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, Path(log).read_text()[-3000:]
                assert time.time() < deadline, "the web server did not answer"
                time.sleep(1)
        yield port
    finally:
        stop_group(proc)


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=30).read())
