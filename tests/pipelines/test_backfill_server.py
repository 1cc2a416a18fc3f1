"""A partition-range backfill launched through the real web server's GraphQL API (as the UI
does), executed by the real daemon, on 127.0.0.1, with two engine slots of one core each: two
runs label at the same time, each on its own slot."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from pipelines.pools import sync_teacher_pool

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
    config["teacher"]["engine"] = {"slots": 2}  # one core each on this machine
    config["corpus"].update(train_shards=4, max_documents=24)  # enough work for the two runs to overlap
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cfg = load_config(config_path)
    pipeline.prepare_corpus(cfg)
    shards = cfg.corpus.shard_names()

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "configs" / "instance" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert sync_teacher_pool(instance, cfg) == 2  # as make ui does before dagster dev
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
    assert len(runs) == 2, "5 shards over 2 slots: 3 + 2 shards, one engine start per run"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        windows = {}
        for record in instance.fetch_materializations(dg.AssetKey("teacher_logits"), limit=100).records:
            meta = record.event_log_entry.asset_materialization.metadata
            windows[record.run_id] = (meta["labelled_from"].value, meta["labelled_until"].value, meta["engine_slot"].value)
    assert len(windows) == 2, windows
    (a_from, a_until, a_slot), (b_from, b_until, b_slot) = windows.values()
    assert {a_slot, b_slot} == {0, 1}, "each run on its own slot"
    assert a_from < b_until and b_from < a_until, f"the two engines did not label at the same time: {windows}"
    assert not list((Path(cfg.root) / "labels").rglob(".*")), "no temporary or partial file left"
    shards_read = pipeline.open_split(cfg, "train") + pipeline.open_split(cfg, "heldout")
    assert {s.meta.shard for s in shards_read} <= set(shards) and shards_read
    store = pipeline.label_store(cfg)
    assert all(store.is_committed(k) for k in pipeline.shard_keys(cfg, shards).values())
