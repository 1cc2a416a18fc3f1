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


# cross-field rules (distill.config): what the config alone decides is refused at load, naming the
# field and its value; the rules that need the teacher's files, once the run layer resolved it
@pytest.mark.parametrize(
    "data,match",
    [
        (
            {"teacher": {"mode": "candidates"}, "train": {"divergence": "jsd"}},
            r"teacher\.mode: candidates.* train\.divergence='jsd' .*expected forward_kl",
        ),
        (
            {"teacher": {"mode": "generate"}, "student": {"init": "random", "tokenizer": "bpe:300"}},
            r"student\.tokenizer='bpe:300' needs teacher\.mode: score .* not 'generate'",
        ),
        (
            {"teacher": {"mode": "candidates"}, "student": {"init": "random", "tokenizer": "bpe:300"}},
            r"student\.tokenizer='bpe:300' needs teacher\.mode: score",
        ),
    ],
)
def test_cross_field_rules_refuse_at_load(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(data)


def test_cross_field_rules_accept_what_they_allow():
    # a CE-only candidates run has no divergence to choose; forward KL is the candidates loss
    assert from_mapping({"teacher": {"mode": "candidates"}, "train": {"divergence": "jsd", "kd_weight": 0}})
    assert from_mapping({"teacher": {"mode": "candidates"}, "train": {"divergence": "forward_kl"}})
    assert from_mapping({"teacher": {"mode": "score"}, "student": {"init": "random", "tokenizer": "bpe:300"}})
    assert from_mapping({"teacher": {"mode": "generate"}, "train": {"divergence": "jsd"}})


TEACHER_JSON = {"vocab_size": 49152, "max_position_embeddings": 2048, "num_hidden_layers": 30}


@pytest.mark.parametrize(
    "data,teacher_config,members,match",
    [
        ({"corpus": {"window": 4096}}, TEACHER_JSON, [], r"corpus\.window=4096 exceeds the teacher's context \(2048"),
        ({"teacher": {"k": 64}}, {**TEACHER_JSON, "vocab_size": 50}, [], r"teacher\.k=64 exceeds the teacher's vocab"),
        # a multimodal checkpoint nests its language model's settings
        ({"corpus": {"window": 512}}, {"text_config": {"max_position_embeddings": 256}}, [], r"corpus\.window=512"),
        (
            {"teacher": {"models": [{"model": "/t/a"}, {"model": "/t/b"}]}},
            TEACHER_JSON,
            [("/t/a", "h1"), ("/t/b", "h2")],
            r"teacher\.models\[1\]\.model='/t/b' \(/t/b\) does not share the first member's tokenizer \(/t/a\)",
        ),
    ],
)
def test_rules_against_the_teacher_name_the_field(data, teacher_config, members, match):
    from distill.config import check_against_teacher

    with pytest.raises(ConfigError, match=match):
        check_against_teacher(from_mapping(data), teacher_config, members)


def test_rules_against_the_teacher_pass_a_fitting_teacher():
    from distill.config import check_against_teacher

    cfg = from_mapping({"teacher": {"models": [{"model": "/t/a"}, {"model": "/t/b"}]}, "corpus": {"window": 2048}})
    assert check_against_teacher(cfg, TEACHER_JSON, [("/t/a", "h"), ("/t/b", "h")]) is None
    assert check_against_teacher(cfg, {}, []) is None  # a config.json without the fields: nothing to check
