"""Dagster resources: the run config (one YAML file) and the teacher engine's lifetime."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from distill.config import RunConfig, load_config
from distill.run.engines import close_engines

DEFAULT_CONFIG = "configs/demo.yaml"
CONFIG_ENV = "DISTILL_CONFIG"


def default_config_path() -> str:
    return os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)


class DistillSettings(dg.ConfigurableResource):
    """Which YAML config the assets run with, plus launchpad overrides of any of its fields,
    e.g. ``{"train": {"steps": 200}, "teacher": {"k": 64}}``; validated like the file."""

    config_path: str = DEFAULT_CONFIG
    overrides: dict = {}

    def load(self) -> RunConfig:
        return load_config(Path(self.config_path), overrides=self.overrides)


class TeacherEngine(dg.ConfigurableResource):
    """Starts the vLLM engine on first use in a run and shuts it down when the run's step ends.

    ``keep_alive`` leaves it running for the rest of the process (tests share one engine).
    """

    keep_alive: bool = False

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if not self.keep_alive:
            close_engines()
