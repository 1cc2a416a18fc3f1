"""The evaluation report's PNG plots: training curves, KL by position in the window, and a
calibration (reliability) diagram. Drawn on ``matplotlib.figure.Figure`` directly, so no
pyplot state or display backend is involved."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def training_curves(histories: Mapping[str, list[dict]], path: Path) -> Path:
    """Each model's train cross-entropy by step."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, history in histories.items():
        ax.plot([h["step"] for h in history], [h["ce"] for h in history], label=f"{name} CE")
    ax.set_xlabel("step"), ax.set_ylabel("train cross-entropy"), ax.legend()
    return _save(fig, path)


def kl_by_position(results: Mapping[str, dict], path: Path) -> Path:
    """Each student's KL(teacher‖model) by position bucket in the window (the teacher's is 0)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, m in results.items():
        if name != "teacher":
            buckets = m["kl_by_position"]
            ax.plot([b["positions"] for b in buckets], [b["kl"] for b in buckets], marker="o", label=name)
    ax.set_xlabel("position in window"), ax.set_ylabel("KL(teacher‖model)"), ax.legend()
    ax.tick_params(axis="x", labelrotation=45)
    return _save(fig, path)


def calibration(results: Mapping[str, dict], path: Path) -> Path:
    """Accuracy against confidence per ``ECE_BINS`` bin, each model with its ECE."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for name, m in results.items():
        ax.plot(
            [c["confidence"] for c in m["calibration"]],
            [c["accuracy"] for c in m["calibration"]],
            marker="o",
            label=f"{name} (ECE {m['ece']:.3f})",
        )
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(
    results: Mapping[str, dict], histories: Mapping[str, list[dict]], out_dir: str | Path
) -> dict[str, Path]:
    """Training curves, KL by position bucket (token data only: candidates data has no
    positions) and a calibration diagram as PNG files in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"training_curves": training_curves(histories, out_dir / "training_curves.png")}
    if all("kl_by_position" in m for m in results.values()):
        paths["kl_by_position"] = kl_by_position(results, out_dir / "kl_by_position.png")
    paths["calibration"] = calibration(results, out_dir / "calibration.png")
    return paths
