"""Dagster metadata of an evaluation report (``evaluate_run``, ``evaluate_rounds``): its table, summary
line and file, and the chosen numbers per model, so the UI plots each one's history across runs."""

from typing import Collection

import dagster as dg


def report_metadata(report: dict, metrics: Collection[str], prefixes: tuple[str, ...] = ()) -> dict:
    """``{model}_{metric}`` for every model's metric named in ``metrics`` or starting with one of
    ``prefixes``, beside the report's markdown table, summary line and path."""
    numbers = {
        f"{model}_{metric}": float(value)
        for model, m in report["results"].items()
        for metric, value in m.items()
        if metric in metrics or metric.startswith(prefixes)
    }
    return {
        "table": dg.MetadataValue.md(report["table"]),
        "summary": report["summary"],
        "report": dg.MetadataValue.path(report["out_dir"] + "/report.md"),
        **numbers,
    }
