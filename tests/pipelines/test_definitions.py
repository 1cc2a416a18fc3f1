"""Dagster's own validation of the definitions, and the web UI answering on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.pipelines.dagster_server import dagster_dev, graphql

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_definitions_validate_with_no_arguments(tiny_config_path, tmp_path):
    """``[tool.dagster]`` in pyproject.toml names the module, as Dagster's project template does."""
    env = {**os.environ, "DISTILL_CONFIG": str(tiny_config_path), "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Validation successful for code location offline-distill" in out.stdout + out.stderr


def test_bad_config_fails_at_load_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  k: 0\n")
    env = {**os.environ, "DISTILL_CONFIG": str(bad), "DAGSTER_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", "import pipelines.definitions"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "teacher.k=0" in out.stderr


def test_web_ui_serves_every_asset_on_loopback(tiny_config_path, tmp_path):
    with dagster_dev(tiny_config_path, tmp_path, tmp_path / "dev.log") as port:
        deadline = time.time() + 60
        while True:  # the code server may still be loading
            nodes = graphql(port, "{ assetNodes { assetKey { path } } }")["data"]["assetNodes"]
            if nodes or time.time() > deadline:
                break
            time.sleep(2)
    keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert keys == {
        "teacher_model",
        "corpus",
        "finetuned_teachers",
        "teacher_logits",
        "student_model",
        "baseline_student",
        "evaluation",
    }
