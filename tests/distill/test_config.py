"""Shipped configs load; bad values and unknown fields are named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import from_mapping, load_config
from distill.configbase import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_ship():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "default.yaml", "generate.yaml", "candidates.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.teacher.k >= 1 and cfg.train.steps >= 1


@pytest.mark.parametrize(
    "data,match",
    [
        ({"teacher": {"k": 0}}, r"teacher\.k=0"),
        ({"teacher": {"k": 5000}}, r"teacher\.k=5000 is invalid: expected an integer in \[1, 1024\]"),
        ({"teacher": {"mode": "chat"}}, r"teacher\.mode=.chat."),
        ({"teacher": {"sampling": {"n": 2, "temperature": 0}}}, r"teacher\.sampling\.n=2"),
        ({"teacher": {"sampling": 3}}, r"teacher\.sampling=3 is invalid: expected a mapping"),
        ({"teacher": {"kk": 3}}, r"unknown field.*kk"),
        ({"train": {"kd_weight": 1.5}}, r"train\.kd_weight=1\.5"),
        ({"train": {"divergence": "kl"}}, r"train\.divergence='kl'"),
        ({"train": {"steps": "ten"}}, r"train\.steps='ten'.*int"),
        ({"corpus": {"stride": 600, "window": 512}}, r"corpus\.stride=600"),
        ({"teacher": {"engine": {"dtype": "fp8"}}}, r"teacher\.engine\.dtype='fp8'"),
        ({"trainer": {}}, r"unknown section.*trainer"),
        ({"train": {"tail": "bucket", "temperature": 2.0}}, r"train\.temperature"),
        ({"onpolicy": {"rounds": 2}}, r"onpolicy\.rounds=2 needs teacher\.mode: generate"),
        (
            {"teacher": {"mode": "generate", "labels": "sampled"}, "onpolicy": {"rounds": 1}},
            r"onpolicy\.rounds=1 needs teacher\.labels: topk",
        ),
        ({"onpolicy": {"lmbda": 0}}, r"onpolicy\.lmbda=0"),
        ({"onpolicy": {"generator": "both"}}, r"onpolicy\.generator='both'"),
        ({"onpolicy": {"sampling": {"top_p": 0}}}, r"onpolicy\.sampling\.top_p=0"),
    ],
)
def test_bad_config_names_field(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(data)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_merge_and_validate():
    from pipelines.resources import DistillSettings

    path = str(CONFIGS[[p.name for p in CONFIGS].index("demo.yaml")])
    cfg = DistillSettings(config_path=path, overrides={"train": {"steps": 7}, "teacher": {"k": 16}}).load()
    assert cfg.train.steps == 7 and cfg.teacher.k == 16 and cfg.train.batch_size == load_config(path).train.batch_size
    with pytest.raises(ConfigError, match=r"overrides.*train\.steps=0"):
        DistillSettings(config_path=path, overrides={"train": {"steps": 0}}).load()
