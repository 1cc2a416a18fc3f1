"""A partition-range backfill launched through the real web server's GraphQL API (as the UI
does), executed by the real daemon, on 127.0.0.1, with two engine slots of one core each: two
runs may label at the same time, never on the same slot."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import dagster as dg
import yaml

from distill.config import load_config
from distill.run import labelling, paths
from pipelines.pools import sync_teacher_pool
from tests.pipelines.dagster_server import REPO, dagster_dev, graphql

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
    config = yaml.safe_load(Path(tiny_config_path).read_text())
    config["storage_root"] = str(tmp_path / "data")  # label for real, not from the session's cache
    config["teacher"]["engine"] = {"slots": 2}  # one core each on this machine
    config["corpus"].update(train_shards=4, max_documents=24)  # enough work for the two runs to overlap, usually
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cfg = load_config(config_path)
    labelling.prepare_corpus(cfg)
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
        windows: dict[str, tuple] = {}  # per run: when its engine labelled (first to last shard), on which slots
        for record in instance.fetch_materializations(dg.AssetKey("teacher_logits"), limit=100).records:
            meta = record.event_log_entry.asset_materialization.metadata
            start, end, slots = windows.get(record.run_id, (float("inf"), float("-inf"), set()))
            windows[record.run_id] = (
                min(start, meta["labelled_from"].value),
                max(end, meta["labelled_until"].value),
                slots | {meta["engine_slot"].value},
            )
    assert len(windows) == 2, windows
    (a_from, a_until, a_slots), (b_from, b_until, b_slots) = windows.values()
    # what the pool and the slots guarantee, whatever the timing: each run labelled with one
    # engine on one of the two slots, and runs that labelled at the same time held different
    # slots (on a loaded machine one run may finish before the other's engine is up, and then
    # both may use slot 0, so neither the overlap nor the use of both slots is asserted)
    assert len(a_slots) == len(b_slots) == 1 and a_slots | b_slots <= {0, 1}, windows
    if a_from < b_until and b_from < a_until:
        assert a_slots != b_slots, f"two engines labelled at the same time on one slot: {windows}"
    assert not list((Path(cfg.root) / "labels").rglob(".*")), "no temporary or partial file left"
    shards_read = labelling.open_split(cfg, "train") + labelling.open_split(cfg, "heldout")
    assert {s.meta.shard for s in shards_read} <= set(shards) and shards_read
    store = paths.label_store(cfg)
    assert all(store.is_committed(k) for k in paths.shard_keys(cfg, shards).values())
