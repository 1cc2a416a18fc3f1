"""Kills and edits that used to lose data or hang: a SIGKILLed ``pipelines.run`` (its run held the
teacher pool's only slot for ever and its engine kept running), an edited commit record, a
shard copied under another key. Each is reproduced for real and must heal on the next run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from distill.config import load_config
from distill.run import labelling, paths
from distill.teacher.slots import claim_slot, slot_dir
from storage.reader import ShardError
from tests.conftest import REPO
from tests.processes import describe, marked_processes, run_group, start_group, stop_group, wait_until_gone


@pytest.fixture(scope="module")
def killed_then_rerun(tiny_config_path, tmp_path_factory):
    """``python -m pipelines.run`` SIGKILLed (the process alone, as the OOM killer does) while
    it labels, then run again on the same Dagster instance."""
    tmp = tmp_path_factory.mktemp("killed")
    config = yaml.safe_load(Path(tiny_config_path).read_text())
    config["storage_root"] = str(tmp / "data")
    config["corpus"]["train_shards"] = 4
    config["teacher"]["engine"] = {"slots": 1}  # the engine holds the machine's one slot
    config["eval"].update(min_ppl_margin=-1e9, min_bpb_margin=-1e9)  # 3 steps: the gate is not under test
    # nor are MC scores: without an MC file the evaluation needs no teacher engine (its metrics come
    # from the stored labels), one engine start less in the rerun and in the CLI test's run
    config["eval"]["mc_file"] = None
    path = tmp / "kill.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    labelling.prepare_corpus(cfg)  # the run rebuilds the same corpus; here it gives the shard keys
    keys = paths.shard_keys(cfg, cfg.corpus.shard_names())
    store = paths.label_store(cfg)
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "configs" / "instance" / "dagster.yaml", home / "dagster.yaml")  # teacher pool limit 1
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "KILL_TEST_MARK": mark,
        "VLLM_PROCESS_NAME_PREFIX": f"{os.environ['VLLM_PROCESS_NAME_PREFIX']}-{mark}",
    }
    cmd = [sys.executable, "-m", "pipelines.run", "--config", str(path)]
    first = start_group(cmd, cwd=REPO, env=env, stdout=open(tmp / "first.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while not any(store.is_committed(k) for k in keys.values()):
            assert first.poll() is None, (tmp / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no shard was committed in time"
            time.sleep(0.05)
        engine = [" ".join(p.cmdline()) for p in marked_processes("KILL_TEST_MARK", mark)]
        assert any("::EngineCore" in t for t in engine), f"the run's engine is not visible: {engine}"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        committed = {
            k: store.path_for(k).with_suffix(".json").stat().st_mtime_ns
            for k in set(keys.values())
            if store.is_committed(k)
        }
        orphans = wait_until_gone("KILL_TEST_MARK", mark, timeout=30)
        slot = claim_slot(slot_dir(cfg.root), [[0]], timeout=30)  # the dead run's slot is free again
        slot.release()
    finally:
        stop_group(first)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        stuck = [r.run_id for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
    second = start_group(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = second.communicate(timeout=900)
    finally:
        stop_group(second)
    return {
        "cfg": cfg,
        "keys": keys,
        "store": store,
        "committed": committed,
        "orphans": describe(orphans),
        "stuck": stuck,
        "rc": second.returncode,
        "out": out,
        "home": home,
        "path": path,
    }


def test_killed_run_leaves_no_engine_running(killed_then_rerun):
    assert killed_then_rerun["orphans"] == "", f"still running after the kill: {killed_then_rerun['orphans']}"


def test_rerun_after_kill_frees_the_pool_and_labels_only_what_was_missing(killed_then_rerun):
    r = killed_then_rerun
    keys, store = r["keys"], r["store"]
    assert r["stuck"], "the killed run should have been left STARTED (the hang this test reproduces)"
    assert r["rc"] == 0, r["out"][-4000:]
    for run_id in r["stuck"]:
        assert f"run {run_id}: its process is gone" in r["out"]
    assert 0 < len(r["committed"]) < len(set(keys.values())), "the kill should land between commits"
    # committed shards were cache hits (their records untouched); every other key was labelled
    for key, mtime in r["committed"].items():
        assert store.path_for(key).with_suffix(".json").stat().st_mtime_ns == mtime, f"{key} was relabelled"
    assert all(store.is_committed(k) for k in keys.values())
    with dg.DagsterInstance.from_config(str(r["home"])) as instance:
        statuses = {run.run_id: run.status for run in instance.get_runs()}
        assert all(statuses[run_id] == dg.DagsterRunStatus.FAILURE for run_id in r["stuck"])
        assert not [s for s in statuses.values() if s == dg.DagsterRunStatus.STARTED]
        hits = [
            e.asset_materialization.metadata["cache_hits"].value
            for e in [instance.get_latest_materialization_event(dg.AssetKey("teacher_logits"))]
        ]
    # empty shards share one key: each key missing before the rerun was labelled once, the rest were hits
    assert hits == [len(keys) - len(set(keys.values()) - set(r["committed"]))]


def test_edited_commit_record_is_caught_and_relabelled(killed_then_rerun, engine):
    cfg, keys, store = killed_then_rerun["cfg"], killed_then_rerun["keys"], killed_then_rerun["store"]
    name = next(n for n in keys if n.startswith("train") and store.open(keys[n]).rows)
    record_file = store.path_for(keys[name]).with_suffix(".json")
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "rows": 0, "tokens": 0}))
    problems = labelling.check_shards(cfg, [name])["problems"]
    assert len(problems) == 1 and "'rows' is 0 but the file holds" in problems[0] and str(record_file) in problems[0]
    with pytest.raises(ShardError, match="edited or foreign commit record"):
        labelling.open_split(cfg, "train")  # training refuses instead of silently skipping the shard
    relabelled = labelling.label_shards(cfg, [name], engine_factory=lambda: engine)[name]
    assert (
        not relabelled["cache_hit"]
        and relabelled["rows"] == record["rows"]
        and relabelled["tokens"] == record["tokens"]
    )
    assert labelling.check_shards(cfg, [name])["problems"] == []


def test_shard_copied_under_another_key_is_relabelled(killed_then_rerun, engine):
    cfg, keys, store = killed_then_rerun["cfg"], killed_then_rerun["keys"], killed_then_rerun["store"]
    src, dst = [n for n in keys if n.startswith("train") and store.open(keys[n]).rows][:2]
    assert keys[src] != keys[dst]
    own_rows = store.open(keys[dst]).rows
    for suffix in (".parquet", ".json"):
        shutil.copy(store.path_for(keys[src]).with_suffix(suffix), store.path_for(keys[dst]).with_suffix(suffix))
    problems = labelling.check_shards(cfg, [dst])["problems"]
    assert len(problems) == 1 and "'cache_key'" in problems[0] and keys[src] in problems[0]
    relabelled = labelling.label_shards(cfg, [dst], engine_factory=lambda: engine)[dst]
    assert not relabelled["cache_hit"] and relabelled["rows"] == own_rows
    assert store.open(keys[dst]).meta.cache_key == keys[dst]


def test_two_trainings_of_one_student_at_once_share_one_result(killed_then_rerun, tmp_path):
    """Two launches of one config: the second waits on the student folder's lock, then reuses
    the first one's model; no temporary folder is left behind."""
    config = yaml.safe_load(killed_then_rerun["path"].read_text())
    config["train"]["seed"] = 7  # a student not trained yet
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(config))
    code = (
        "import json, sys; from distill.run import training; from distill.config import load_config\n"
        "s = training.train_student(load_config(sys.argv[1]))\nprint(json.dumps({'reused': s['reused']}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        start_group(
            [sys.executable, "-c", code, str(path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_group(p)
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    reused = sorted(json.loads(out.strip().splitlines()[-1])["reused"] for out, _ in outs)
    assert reused == [False, True]
    assert any("waiting for it to finish" in err for _, err in outs)
    out_dir = paths.student_dir(load_config(path), False)
    assert not list(out_dir.rglob(".*.tmp-*"))


def test_cli_exits_non_zero_naming_the_failed_gate(killed_then_rerun, tmp_path):
    """Everything cached: only the evaluation reruns, with a gate no student can pass."""
    config = yaml.safe_load(killed_then_rerun["path"].read_text())
    config["eval"].update(min_ppl_margin=1e9)
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DAGSTER_HOME": str(killed_then_rerun["home"]), "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = run_group([sys.executable, "-m", "pipelines.run", "--config", str(path)], timeout=900, cwd=REPO, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "gate FAILED: ppl" in done.stdout and "(margin 1000000000.0): FAIL" in done.stdout
