"""A partition-range backfill launched through the real web server's GraphQL API (as the UI
does), executed by the real daemon, on 127.0.0.1."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.pipelines.dagster_server import REPO, dagster_dev, graphql

pytestmark = pytest.mark.slow

LAUNCH = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
STATUS = """query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs { runId status } }
    ... on PythonError { message }
  }
}"""


def test_backfill_through_server(tiny_config_path, tmp_path):
    from distill import pipeline
    from distill.config import load_config

    config = yaml.safe_load(Path(tiny_config_path).read_text())
    config["storage_root"] = str(tmp_path / "data")  # label for real, not from the session's cache
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cfg = load_config(config_path)
    pipeline.prepare_corpus(cfg)
    shards = cfg.corpus.shard_names()

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "configs" / "instance" / "dagster.yaml", home / "dagster.yaml")
    with dagster_dev(config_path, home, tmp_path / "dev.log") as port:
        params = {"assetSelection": [{"path": ["teacher_logits"]}], "partitionNames": shards, "fromFailure": False}
        deadline = time.time() + 120
        while True:  # the code location may still be loading
            launched = graphql(port, LAUNCH, {"params": params})["data"]["launchPartitionBackfill"]
            if launched["__typename"] == "LaunchBackfillSuccess" or time.time() > deadline:
                break
            time.sleep(3)
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        deadline = time.time() + 900
        while True:
            status = graphql(port, STATUS, {"id": launched["backfillId"]})["data"]["partitionBackfillOrError"]
            if status["status"] not in ("REQUESTED", "IN_PROGRESS") or time.time() > deadline:
                break
            time.sleep(5)
    assert status["status"] == "COMPLETED_SUCCESS", (status, (tmp_path / "dev.log").read_text()[-4000:])
    runs = status["runs"]
    assert runs and all(r["status"] == "SUCCESS" for r in runs)
    assert len(runs) < len(shards), "several shards per run: one engine start per run"
    shards_read = pipeline.open_split(cfg, "train") + pipeline.open_split(cfg, "heldout")
    assert {s.meta.shard for s in shards_read} <= set(shards) and shards_read
    store = pipeline.label_store(cfg)
    assert all(store.is_committed(k) for k in pipeline.shard_keys(cfg, shards).values())
