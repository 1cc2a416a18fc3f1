"""Bad input gets an error naming the file and the field or line, raised before anything is
written: config values, teacher weights, corpus files and the multiple-choice file."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from distill.config import load_config
from distill.configbase import ConfigError
from distill.corpus import _hash_unit, build_corpus, load_records
from distill.data import CorpusConfig, CorpusError, corpus_dir, load_mc
from distill.teacher.checkpoint import TeacherError, check_checkpoint, check_safetensors


class FakeTokenizer:
    """Whitespace tokenizer (corpus checks need no real vocabulary)."""

    def __call__(self, texts):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def load_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path, lambda: load_config(path)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,match",
    [
        # null for a required field
        ("teacher: {k: null}", r"teacher\.k=None is invalid: a value is required \(expected int\)"),
        ("corpus: {source: null}", r"corpus\.source=None is invalid: a value is required \(expected str\)"),
        ("train: {lr: null}", r"train\.lr=None is invalid: a value is required \(expected float\)"),
        # a section that is not a mapping
        ("teacher: 5", r"teacher=5 is invalid: expected a mapping of TeacherConfig fields"),
        ("train: [1, 2]", r"train=\[1, 2\] is invalid: expected a mapping of TrainConfig fields"),
        # wrong list items
        ("student: {layer_indices: abc}", r"student\.layer_indices=.abc. is invalid: expected a list of int"),
        (
            "student: {num_layers: 2, layer_indices: [1, x]}",
            r"student\.layer_indices=\[1, 'x'\] is invalid: expected a list of int.*item 1 is 'x'",
        ),
        ("student: {num_layers: 2, layer_indices: [1, 2.5]}", r"student\.layer_indices=\[1, 2\.5\].*item 1 is 2\.5"),
        ("student: {num_layers: 2, layer_indices: [1, true]}", r"student\.layer_indices=\[1, True\].*item 1 is True"),
        # non-finite numbers
        ("train: {lr: .inf}", r"train\.lr=inf is invalid: expected a finite number"),
        ("train: {weight_decay: .nan}", r"train\.weight_decay=nan is invalid: expected a finite number"),
        ("train: {max_grad_norm: 1.0e+400}", r"train\.max_grad_norm=inf is invalid: expected a finite number"),
        ("eval: {min_bpb_margin: -.inf}", r"eval\.min_bpb_margin=-inf is invalid: expected a finite number"),
        ("teacher: {sampling: {top_p: .nan}}", r"teacher\.sampling\.top_p=nan is invalid: expected a finite number"),
        ("train: {lr: 1e400}", r"train\.lr='1e400' is invalid: expected a finite number"),
        ("train: {steps: .inf}", r"train\.steps=inf is invalid: expected int"),
    ],
)
def test_config_error_names_the_file_and_field(tmp_path, text, match):
    path, load = load_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load()
    assert str(path) in str(err.value)


def test_config_yaml_list_becomes_tuple(tmp_path):
    _, load = load_yaml(tmp_path, "student: {num_layers: 3, layer_indices: [0, 5, 29]}")
    cfg = load()
    assert cfg.student.layer_indices == (0, 5, 29)
    hash(cfg.student)  # frozen dataclasses stay hashable


def test_config_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 3e-4 as text; users write it that way (as in axolotl or TRL configs)
    _, load = load_yaml(tmp_path, "train: {lr: 3e-4}")
    assert load().train.lr == 3e-4
    _, load = load_yaml(tmp_path, "train: {lr: fast}")
    with pytest.raises(ConfigError, match=r"train\.lr='fast' is invalid: expected float"):
        load()


def test_config_large_finite_lr_loads(tmp_path):
    # finite but absurd: the trainer's non-finite-loss stop handles it, not the config
    _, load = load_yaml(tmp_path, "train: {lr: 1.0e+30}")
    assert load().train.lr == 1e30


# --- teacher weights ----------------------------------------------------------------------


@pytest.fixture()
def tiny_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 5)}, str(path))
    return path


def test_whole_safetensors_file_passes(tiny_safetensors):
    check_safetensors(tiny_safetensors)


@pytest.mark.parametrize("cut", ["half", "zero", "one_byte_short", "garbage_header", "huge_header_length"])
def test_broken_safetensors_named(tmp_path, tiny_safetensors, cut):
    data = tiny_safetensors.read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(
        {
            "half": data[: len(data) // 2],
            "zero": b"",
            "one_byte_short": data[:-1],
            "garbage_header": (20).to_bytes(8, "little") + b"{not json at all!!!}" + data[28:],
            "huge_header_length": (1 << 40).to_bytes(8, "little") + data[8:],
        }[cut]
    )
    match = {
        "half": rf"truncated: {len(data) // 2} bytes, header says {len(data)}",
        "zero": "truncated safetensors file: 0 bytes",
        "one_byte_short": rf"truncated: {len(data) - 1} bytes, header says {len(data)}",
        "garbage_header": "header is not valid JSON",
        "huge_header_length": rf"header length field says {1 << 40}",
    }[cut]
    with pytest.raises(TeacherError, match=match) as err:
        check_safetensors(bad)
    assert str(bad) in str(err.value)


def test_checkpoint_folder_with_truncated_weights(tmp_path, tiny_safetensors):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    shutil.copy(tiny_safetensors, folder / "model-00001-of-00002.safetensors")
    data = tiny_safetensors.read_bytes()
    (folder / "model-00002-of-00002.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherError, match=re.escape(str(folder / "model-00002-of-00002.safetensors")) + ": truncated"):
        check_checkpoint(folder)
    (folder / "model-00002-of-00002.safetensors").write_bytes(data)
    assert check_checkpoint(folder) == folder


# --- corpus files -------------------------------------------------------------------------


def records(source, **kw):
    return list(load_records(CorpusConfig(source=str(source), **kw), ["text"]))


@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("docs.jsonl", b"", ": empty file"),
        ("docs.jsonl", b"\n  \n", ": no JSON records"),
        ("docs.parquet", b"PAR1 this is not really parquet", ": not a readable Parquet file"),
        # UTF-8 on every line, but the CSV parser finds a quote that never closes
        ("docs.csv", b'text\n"unterminated\n', ": the datasets library cannot read.*EOF inside string"),
    ],
    ids=["empty", "blank-only", "broken-parquet", "datasets-error"],
)
def test_unreadable_corpus_file_named(tmp_path, name, content, problem):
    src = tmp_path / name
    src.write_bytes(content)
    with pytest.raises(CorpusError, match=re.escape(str(src)) + problem):
        records(src)


def test_jsonl_bad_line_named(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=re.escape(str(src)) + r":4: not valid JSON"):
        records(src)
    src.write_text('{"text": "fine"}\n["a", "list"]\n')
    with pytest.raises(CorpusError, match=re.escape(str(src)) + r":2: a JSON list, expected an object"):
        records(src)


@pytest.mark.parametrize("ext,line", [("jsonl", '{"text": "caf\xe9"}\n'), ("txt", "caf\xe9\n"), ("csv", "caf\xe9\n")])
def test_non_utf8_named(tmp_path, ext, line):
    src = tmp_path / f"docs.{ext}"
    header = "text\n" if ext == "csv" else ""
    good = '{"text": "fine"}\n' if ext == "jsonl" else "fine\n"
    src.write_bytes((header + good).encode() + line.encode("latin-1"))
    n = 3 if ext == "csv" else 2
    with pytest.raises(CorpusError, match=re.escape(str(src)) + rf":{n}: not UTF-8 text"):
        records(src)


def test_mixed_extensions_named(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "hello"}\n')
    b = tmp_path / "b.csv"
    b.write_text("text\nhello\n")
    with pytest.raises(
        CorpusError, match=rf"mixes file types: {re.escape(str(a))} \(jsonl\), {re.escape(str(b))} \(csv\)"
    ):
        records(f"{a},{b}")


def test_json_and_jsonl_mix(tmp_path):
    # one builder reads both, so this is not a mix
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "hello"}\n')
    b = tmp_path / "b.json"
    b.write_text('{"text": "world"}\n')
    assert [r["text"] for _, r in records(f"{a},{b}")] == ["hello", "world"]


def write_docs(path, ids, short=()):
    path.write_text(
        "".join(json.dumps({"id": d, "text": "one" if d in short else "a few words here"}) + "\n" for d in ids)
    )
    return path


def test_train_split_empty_blames_heldout_fraction(tmp_path):
    ids = [f"d{i}" for i in range(5)]
    assert all(_hash_unit(d, "split") < 0.99 for d in ids), "precondition: 0.99 holds out every one of these ids"
    cfg = CorpusConfig(
        source=str(write_docs(tmp_path / "docs.jsonl", ids)), id_column="id", heldout_fraction=0.99, window=8
    )
    with pytest.raises(
        CorpusError,
        match=r"corpus\.heldout_fraction=0\.99 leaves the train split empty \(0 train and 5 held-out .*lower it",
    ):
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")
    assert not corpus_dir(tmp_path / "root", cfg, "tok").exists(), "nothing written"


def test_heldout_split_empty_after_drops(tmp_path):
    ids = ["a", "b", "c"]
    # 0.05 of 3 documents holds none out by hash, so the lowest hash is held out; make it too short
    held = min(ids, key=lambda d: _hash_unit(d, "split"))
    cfg = CorpusConfig(
        source=str(write_docs(tmp_path / "docs.jsonl", ids, short={held})),
        id_column="id",
        heldout_fraction=0.05,
        window=8,
    )
    with pytest.raises(
        CorpusError,
        match=r"corpus\.heldout_fraction=0\.05 leaves the heldout split empty "
        r"\(2 train and 0 held-out .*dropped_short.*raise it",
    ):
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")
    assert not corpus_dir(tmp_path / "root", cfg, "tok").exists(), "nothing written"


def test_single_document_blames_count(tmp_path):
    cfg = CorpusConfig(source=str(write_docs(tmp_path / "docs.jsonl", ["only"])), id_column="id", window=8)
    with pytest.raises(CorpusError, match=r"only 1 non-empty document"):
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")


# --- multiple-choice file -----------------------------------------------------------------

GOOD_MC = '{"question": "q?", "choices": ["a", "b"], "answer": 0}'


@pytest.mark.parametrize(
    "bad,match",
    [
        ("{not json", r"not valid JSON"),
        ('["q?", ["a", "b"], 0]', r"a JSON list, expected an object"),
        ('{"question": 3, "choices": ["a", "b"], "answer": 0}', r"question must be a string"),
        ('{"question": "q?", "choices": ["a", 2], "answer": 0}', r"choices must be a list of at least two strings"),
        ('{"question": "q?", "choices": ["a", "b"], "answer": "0"}', r"answer must be an index"),
        ('{"question": "q?", "choices": ["a", "b"], "answer": true}', r"answer must be an index"),
        ('{"question": "q?", "choices": ["a", "b"]}', r"missing field 'answer'"),
    ],
)
def test_mc_bad_line_named(tmp_path, bad, match):
    path = tmp_path / "mc.jsonl"
    # a blank line and a U+2028 inside a string: neither may shift the line number of the bad line
    weird = '{"question": "two\u2028lines", "choices": ["a", "b"], "answer": 1}'
    path.write_text(f"{GOOD_MC}\n\n{weird}\n{bad}\n{GOOD_MC}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: ") + match):
        load_mc(path)


def test_mc_non_utf8_named(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_bytes(
        f"{GOOD_MC}\n".encode() + '{"question": "caf\xe9?", "choices": ["a", "b"], "answer": 0}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text")):
        load_mc(path)


def test_mc_missing_file_named(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.jsonl")) + r".*eval\.mc_file"):
        load_mc(tmp_path / "nope.jsonl")


def test_mc_checked_when_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    (tmp_path / "mc.jsonl").write_text(f"{GOOD_MC}\n{{oops\n")
    path, load = load_yaml(tmp_path, "eval: {mc_file: mc.jsonl}")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: eval\.mc_file: mc\.jsonl:2: not valid JSON"):
        load()
    (tmp_path / "mc.jsonl").write_text(f"{GOOD_MC}\n")
    assert load().eval.mc_file == "mc.jsonl"
    path.write_text("eval: {mc_file: missing.jsonl}")
    with pytest.raises(ConfigError, match=r"eval\.mc_file='missing\.jsonl': no such file .*working directory"):
        load()
