"""The evaluation assets' metadata: the chosen per-model numbers, prefixed names, and the report's text."""

import dagster as dg

from pipelines.assets.report import report_metadata


def test_report_metadata_keeps_the_named_and_prefixed_numbers():
    report = {
        "results": {"student": {"ppl": 12.5, "lm_eval_arc": 0.25, "positions": 9}, "teacher": {"kl": 0}},
        "table": "| model |",
        "summary": "student_ppl=12.5",
        "out_dir": "/tmp/eval-x",
    }
    meta = report_metadata(report, ("ppl", "kl"), prefixes=("lm_eval_",))
    assert {k: v for k, v in meta.items() if k.startswith(("student_", "teacher_"))} == {
        "student_ppl": 12.5,
        "student_lm_eval_arc": 0.25,
        "teacher_kl": 0.0,
    }
    assert meta["summary"] == "student_ppl=12.5"
    assert meta["table"] == dg.MetadataValue.md("| model |")
    assert meta["report"] == dg.MetadataValue.path("/tmp/eval-x/report.md")
    assert "student_lm_eval_arc" not in report_metadata(report, ("ppl",))
