"""Corpus loading, windowing, splitting and the errors users see for bad data."""

from __future__ import annotations

import dataclasses
import json

import pytest

from distill.corpus import build_corpus, load_documents, windows
from distill.data import CorpusConfig, CorpusError, read_corpus_shard


@pytest.mark.parametrize(
    "n,window,stride", [(2, 4, 3), (10, 4, 3), (10, 4, 1), (100, 16, 8), (17, 16, 15), (16, 16, 15)]
)
def test_windows_label_every_token_once(n, window, stride):
    labelled = []
    for start, end, label_start in windows(n, window, stride):
        assert end - start <= window
        for t in range(label_start, end - start - 1):
            labelled.append(start + t + 1)  # absolute index of the predicted token
    assert labelled == list(range(1, n))


def test_windows_keep_context():
    # stride 8 of window 16: every window after the first labels its last 8 targets with >= 7 tokens of context
    for start, end, label_start in windows(100, 16, 8)[1:]:
        assert label_start == 7 or end - start - 1 <= label_start + 8


class FakeTokenizer:
    """Whitespace tokenizer (tests of corpus logic need no real vocabulary)."""

    def __call__(self, texts):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_local_jsonl_split_and_drops(tmp_path):
    docs = [{"body": " ".join(["word"] * (5 + i)), "id": f"d{i}"} for i in range(30)]
    docs += [{"body": "", "id": "empty"}, {"body": "   ", "id": "blank"}, {"body": "one", "id": "short"}]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = CorpusConfig(
        source=str(src),
        text_column="body",
        id_column="id",
        window=8,
        train_shards=3,
        heldout_shards=1,
        heldout_fraction=0.2,
    )
    manifest = build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")
    assert manifest["dropped_empty"] == 2 and manifest["dropped_short"] == 1
    assert manifest["documents"] == 30
    assert manifest["heldout_documents"] >= 1
    assert manifest["heldout_documents"] < 30
    seen = {}
    total = 0
    for name in cfg.shard_names():
        entry, table = read_corpus_shard(tmp_path / "root", cfg, "tok", name)
        for doc in set(table.column("doc_id").to_pylist()):
            assert doc not in seen, "a document lives in exactly one shard"
            seen[doc] = name
        total += entry["labelled_tokens"]
    assert total == sum(5 + i - 1 for i in range(30))
    # deterministic: building again elsewhere gives the same fingerprints
    again = build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root2")
    assert {n: s["fingerprint"] for n, s in again["shards"].items()} == {
        n: s["fingerprint"] for n, s in manifest["shards"].items()
    }


def test_changing_one_document_changes_one_shard(tmp_path):
    docs = [{"text": " ".join(["w"] * (5 + i))} for i in range(40)]
    cfg = CorpusConfig(source=str(write_jsonl(tmp_path / "a.jsonl", docs)), window=8, train_shards=4)
    before = build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "r1")["shards"]
    docs[7]["text"] += " extra words"
    cfg2 = CorpusConfig(source=str(write_jsonl(tmp_path / "b.jsonl", docs)), window=8, train_shards=4)
    after = build_corpus(cfg2, FakeTokenizer(), "tok", tmp_path / "r2")["shards"]
    changed = [n for n in before if before[n]["fingerprint"] != after[n]["fingerprint"]]
    assert len(changed) == 1


def test_fewer_documents_than_shards_is_refused_before_anything_is_written(tmp_path):
    """A heldout_fraction that leaves fewer documents in a split than it has shards would commit
    empty shards for the teacher to label: refused, naming the counts and both fields."""
    from distill.corpus import _hash_unit

    ids = [f"d{i}" for i in range(8)]
    held = sum(_hash_unit(d, "split") < 0.3 for d in ids)
    assert 2 <= held <= 6, "precondition: both splits hold at least two of these ids"
    train = len(ids) - held
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": d, "text": "a few words here"} for d in ids])
    cfg = CorpusConfig(source=str(src), id_column="id", heldout_fraction=0.3, window=8, train_shards=train + 1)
    with pytest.raises(
        CorpusError,
        match=rf"corpus\.heldout_fraction=0\.3 leaves {train} train document\(s\) for "
        rf"corpus\.train_shards={train + 1} shards \({train} train and {held} held-out .*"
        rf"1 shard\(s\) would be empty; set corpus\.train_shards to at most {train}, "
        "lower corpus.heldout_fraction",
    ):
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")
    with pytest.raises(
        CorpusError,
        match=rf"leaves {held} heldout document\(s\) for corpus\.heldout_shards={held + 2} .*"
        rf"2 shard\(s\) would be empty; .*at most {held}, raise corpus.heldout_fraction",
    ):
        build_corpus(
            dataclasses.replace(cfg, train_shards=1, heldout_shards=held + 2), FakeTokenizer(), "tok", tmp_path / "root"
        )
    assert not (tmp_path / "root").exists(), "nothing written"
    # as many documents as shards is accepted
    manifest = build_corpus(dataclasses.replace(cfg, train_shards=train), FakeTokenizer(), "tok", tmp_path / "root")
    assert len(manifest["shards"]) == train + 1


def test_missing_column_names_it(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"content": "hello world"}] * 3)
    with pytest.raises(CorpusError, match=r"no column 'text'.*content"):
        list(load_documents(CorpusConfig(source=str(src))))


def write_lines(path, rows):
    """JSON Lines with a blank line wherever ``rows`` holds None (line numbers count it)."""
    path.write_text("".join(("" if r is None else json.dumps(r)) + "\n" for r in rows))
    return str(path)


TEXT = {"text": "a few words here"}


@pytest.mark.parametrize(
    "files,match",
    [
        # one JSON type per column, checked before datasets reads (it would turn the column into JSON text)
        (
            {"docs.jsonl": [TEXT, TEXT, {"text": 12345}]},
            r"docs\.jsonl:3: a number in column 'text', where \S*docs\.jsonl:1 holds a str",
        ),
        (
            {"docs.jsonl": [TEXT, None, TEXT, None, {"text": ["a", "list"]}]},
            r"docs\.jsonl:5: a list in column 'text', where \S*docs\.jsonl:1 holds a str",
        ),
        (
            {"a.jsonl": [TEXT, TEXT], "b.jsonl": [None, TEXT, {"text": ["a", "list"]}]},
            r"b\.jsonl:3: a list in column 'text', where \S*a\.jsonl:1 holds a str",
        ),
        # without the blank line datasets reads this silently, as '"a few words here"' and '["a", "list"]'
        (
            {"a.jsonl": [TEXT, TEXT], "b.jsonl": [TEXT, {"text": ["a", "list"]}]},
            r"b\.jsonl:2: a list in column 'text', where \S*a\.jsonl:1 holds a str",
        ),
        # one type throughout, but not text
        ({"a.jsonl": [{"text": ["x"]}, None, {"text": ["y"]}]}, r"a\.jsonl:1: a list in column 'text', expected text"),
        ({"docs.json": [TEXT, {"text": ["a", "list"]}]}, r"docs\.json row 1: a list in column 'text', expected text"),
    ],
)
def test_non_text_value_names_file_and_line(tmp_path, files, match):
    """A value that is not text names its file and line (the first line of its type when a
    column mixes types), like every other corpus error, not a row id."""
    paths = []
    for name, rows in files.items():
        if name.endswith(".json"):  # one JSON array
            (tmp_path / name).write_text(json.dumps(rows))
            paths.append(str(tmp_path / name))
        else:
            paths.append(write_lines(tmp_path / name, rows))
    cfg = CorpusConfig(source=",".join(paths), window=8, train_shards=1)
    with pytest.raises(CorpusError, match=match) as e:
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")
    assert "row-0" not in str(e.value)
    assert not (tmp_path / "root").exists(), "nothing written"


def test_non_text_value_in_parquet_and_csv_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [["a"], ["b"]]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [None, None, ["c"]]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"a\.parquet row 0: a list in column 'text'"):
        build_corpus(CorpusConfig(source=str(tmp_path / "a.parquet"), window=8), FakeTokenizer(), "tok", tmp_path / "r")
    # rows counted across files (None texts are dropped as empty before the list is met)
    lists = pa.list_(pa.string())
    pq.write_table(pa.table({"text": pa.array([None, None], lists), "id": ["p", "q"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([None, ["c"]], lists), "id": ["r", "s"]}), tmp_path / "b.parquet")
    cfg = CorpusConfig(source=f"{tmp_path / 'a.parquet'},{tmp_path / 'b.parquet'}", id_column="id", window=8)
    with pytest.raises(CorpusError, match=r"b\.parquet row 1 \(document id 's'\): a list in column 'text'"):
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "r")
    # CSV: the line a record starts on, past a quoted field that spans two lines and a blank line
    (tmp_path / "docs.csv").write_text('text,note\n,"two\nlines"\n\n5,x\n')
    with pytest.raises(CorpusError, match=r"docs\.csv:5: a (float|int) in column 'text'"):
        build_corpus(CorpusConfig(source=str(tmp_path / "docs.csv"), window=8), FakeTokenizer(), "tok", tmp_path / "r")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        list(load_documents(CorpusConfig(source=str(tmp_path / "nope.jsonl"))))


def test_hub_source_offline_says_how_to_download(monkeypatch):
    """The Makefile sets HF_HUB_OFFLINE=1: a hub dataset not yet in the cache says how to fetch it."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError, match=r"corpus\.source='someone/no-such-dataset': .*HF_HUB_OFFLINE=0 \(make demo"):
        list(load_documents(CorpusConfig(source="someone/no-such-dataset")))


def test_all_empty_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(CorpusError, match="no non-empty documents"):
        build_corpus(CorpusConfig(source=str(src)), FakeTokenizer(), "tok", tmp_path / "root")


def test_default_corpus_ships_with_python():
    docs = list(load_documents(CorpusConfig(max_documents=5)))
    assert len(docs) == 5 and all(isinstance(t, str) and t for _, t in docs)


def test_label_keys_change_with_exactly_their_inputs():
    from distill.teacher.config import TeacherConfig
    from distill.teacher.labels import shard_key

    hashes = {"weights": "w", "tokenizer": "t"}
    base = shard_key(hashes, "fp", TeacherConfig(k=32), "float32")
    assert base == shard_key(hashes, "fp", TeacherConfig(k=32), "float32")
    assert base == shard_key(hashes, "fp", TeacherConfig(k=32, min_topk_mass=0.9), "float32"), (
        "check thresholds do not relabel"
    )
    changed = [
        shard_key(hashes, "fp", TeacherConfig(k=16), "float32"),
        shard_key({**hashes, "weights": "w2"}, "fp", TeacherConfig(k=32), "float32"),
        shard_key({**hashes, "tokenizer": "t2"}, "fp", TeacherConfig(k=32), "float32"),
        shard_key(hashes, "fp2", TeacherConfig(k=32), "float32"),
        shard_key(hashes, "fp", TeacherConfig(k=32), "bfloat16"),
    ]
    assert len({base, *changed}) == 6


@pytest.fixture(scope="module")
def teacher_tokenizer():
    from transformers import AutoTokenizer

    from distill.teacher.checkpoint import BUNDLED, resolve_teacher
    from tests.conftest import REPO

    return AutoTokenizer.from_pretrained(resolve_teacher(BUNDLED, REPO / "data"))


def test_prompt_corpus_counts_skips(tmp_path, teacher_tokenizer):
    rows = [{"id": f"p{i}", "prompt": f"Question number {i}: what is {i} plus {i}?"} for i in range(6)]
    rows += [
        {"id": "empty", "prompt": ""},
        {"id": "blank", "prompt": "   "},
        {"id": "none", "prompt": None},
        {"id": "long", "prompt": "word " * 200},
    ]
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = CorpusConfig(source=str(src), id_column="id", window=64, train_shards=1, heldout_fraction=0.3)
    manifest = build_corpus(cfg, teacher_tokenizer, "tok", tmp_path / "root", mode="generate")
    assert manifest["dropped_empty"] == 3 and manifest["dropped_long"] == 1 and manifest["documents"] == 6
    _, table = read_corpus_shard(tmp_path / "root", cfg, "tok", "train-00000", mode="generate")
    row = table.slice(0, 1).to_pylist()[0]
    # chat template applied: the prompt ends at the assistant turn, nothing is labelled yet
    assert teacher_tokenizer.decode(row["input_ids"]).endswith("<|im_start|>assistant\n")
    assert row["label_start"] == len(row["input_ids"]) - 1 and row["prompt_text"] in teacher_tokenizer.decode(
        row["input_ids"]
    )
    plain = build_corpus(
        dataclasses.replace(cfg, chat_template=False), teacher_tokenizer, "tok", tmp_path / "plain", mode="generate"
    )
    assert plain["shards"]["train-00000"]["windows"] == manifest["shards"]["train-00000"]["windows"]
    with pytest.raises(CorpusError, match="no chat template"):
        tok = teacher_tokenizer.__class__.from_pretrained(teacher_tokenizer.name_or_path)
        tok.chat_template = None
        build_corpus(cfg, tok, "tok", tmp_path / "r3", mode="generate")


def test_prompt_corpus_rejects_bad_values(tmp_path, teacher_tokenizer):
    def build(rows, mode, **kw):
        src = write_jsonl(tmp_path / f"{mode}.jsonl", rows)
        cfg = CorpusConfig(source=str(src), id_column="id", window=64, train_shards=1, heldout_fraction=0.3, **kw)
        return build_corpus(cfg, teacher_tokenizer, "tok", tmp_path / "root", mode=mode)

    good = [{"id": f"c{i}", "prompt": f"Pick {i}", "candidates": ["yes", "no"], "answer": i % 2} for i in range(4)]
    with pytest.raises(
        CorpusError, match=r"generate\.jsonl:1 \(document id 'bad'\): an int in column 'prompt', expected text"
    ):
        build([{"id": "bad", "prompt": 7}], "generate")
    with pytest.raises(CorpusError, match="no column 'prompt'"):
        build([{"id": "a", "text": "hello"}], "generate")
    with pytest.raises(
        CorpusError, match=r"candidates\.jsonl:5: a str in column 'candidates', where \S+:1 holds a list"
    ):
        build(good + [{"id": "bad", "prompt": "p", "candidates": "yes", "answer": 0}], "candidates")
    with pytest.raises(CorpusError, match="candidates.jsonl:5 \\(document id 'bad'\\): answer=5, expected an index"):
        build(good + [{"id": "bad", "prompt": "p", "candidates": ["a", "b"], "answer": 5}], "candidates")
    with pytest.raises(CorpusError, match="pydoc_topics: holds plain documents only"):
        build_corpus(CorpusConfig(), teacher_tokenizer, "tok", tmp_path / "r", mode="candidates")
    # a gold answer may be given as the candidate's text; without the column there is no gold
    by_text = build([{**r, "answer": r["candidates"][r["answer"]]} for r in good], "candidates")
    assert by_text["gold_answers"] == 4
    no_gold = build([{k: v for k, v in r.items() if k != "answer"} for r in good], "candidates")
    assert no_gold["gold_answers"] == 0
