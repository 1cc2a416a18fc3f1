"""lm-evaluation-harness on the shipped local task: the teacher through its vLLM engine agrees
with the harness's own HFLM on the same weights, and the evaluation puts every model's scores
in the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from distill.eval.harness import engine_lm, run_tasks, student_lm
from distill.run import evaluating
from tests.conftest import REPO

TASK = "python_basics"
INCLUDE = str(REPO / "examples" / "lm_eval")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data file is relative to the working directory, like eval.mc_file


def test_engine_lm_matches_the_harness_hflm_on_the_same_teacher(engine, hf_teacher, teacher_dir):
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    via_engine = run_tasks(engine_lm(engine, tok), [TASK], INCLUDE)[TASK]
    via_hf = run_tasks(student_lm(hf_teacher, tok, batch_size=8), [TASK], INCLUDE)[TASK]
    assert set(via_engine) >= {"acc", "acc_norm"}
    assert 0.25 < via_engine["acc"] <= 1.0, "the 135M teacher knows basic Python better than chance (4 choices)"
    assert via_engine["acc"] == pytest.approx(via_hf["acc"], abs=1 / 16) and via_engine["acc_norm"] == pytest.approx(
        via_hf["acc_norm"], abs=1 / 16
    )


def test_unknown_task_names_the_include_folder(engine, teacher_dir):
    with pytest.raises(ValueError, match=r"no task named \['no_such_task'\].*examples/lm_eval"):
        run_tasks(engine_lm(engine, AutoTokenizer.from_pretrained(teacher_dir)), ["no_such_task"], INCLUDE)


def test_evaluation_reports_lm_eval_scores_for_every_model(tiny_config, materialized):
    cfg = dataclasses.replace(
        tiny_config,
        eval=dataclasses.replace(tiny_config.eval, lm_eval_tasks=(TASK,), lm_eval_include=INCLUDE, lm_eval_limit=8),
    )
    report = evaluating.evaluate_run(cfg)
    for name in ("teacher", "student", "baseline"):
        scores = report["results"][name]["lm_eval"][TASK]
        assert 0.0 <= scores["acc"] <= 1.0 and report["results"][name][f"lm_eval_{TASK}_acc"] == scores["acc"]
    assert f"{TASK} acc" in report["table"]
    saved = json.loads((Path(report["out_dir"]) / "results.json").read_text())
    assert saved["results"]["student"]["lm_eval"][TASK]["acc"] == report["results"]["student"]["lm_eval"][TASK]["acc"]
