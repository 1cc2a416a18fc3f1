"""Corpus loading, windowing, splitting and the errors users see for bad data."""
from __future__ import annotations

import json

import pytest

from distill.data import CorpusConfig, CorpusError, build_corpus, load_documents, read_corpus_shard, windows


@pytest.mark.parametrize("n,window,stride", [(2, 4, 3), (10, 4, 3), (10, 4, 1), (100, 16, 8), (17, 16, 15), (16, 16, 15)])
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
    cfg = CorpusConfig(source=str(src), text_column="body", id_column="id", window=8, train_shards=3, heldout_shards=1, heldout_fraction=0.2)
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
    assert {n: s["fingerprint"] for n, s in again["shards"].items()} == {n: s["fingerprint"] for n, s in manifest["shards"].items()}


def test_changing_one_document_changes_one_shard(tmp_path):
    docs = [{"text": " ".join(["w"] * (5 + i))} for i in range(40)]
    cfg = CorpusConfig(source=str(write_jsonl(tmp_path / "a.jsonl", docs)), window=8, train_shards=4)
    before = build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "r1")["shards"]
    docs[7]["text"] += " extra words"
    cfg2 = CorpusConfig(source=str(write_jsonl(tmp_path / "b.jsonl", docs)), window=8, train_shards=4)
    after = build_corpus(cfg2, FakeTokenizer(), "tok", tmp_path / "r2")["shards"]
    changed = [n for n in before if before[n]["fingerprint"] != after[n]["fingerprint"]]
    assert len(changed) == 1


def test_missing_column_names_it(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"content": "hello world"}] * 3)
    with pytest.raises(CorpusError, match=r"no column 'text'.*content"):
        list(load_documents(CorpusConfig(source=str(src))))


def test_non_text_value_names_document(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine text"}, {"text": 12345}])
    cfg = CorpusConfig(source=str(src))
    with pytest.raises(CorpusError, match=r"row-000000001.*int"):
        build_corpus(cfg, FakeTokenizer(), "tok", tmp_path / "root")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        list(load_documents(CorpusConfig(source=str(tmp_path / "nope.jsonl"))))


def test_all_empty_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(CorpusError, match="no non-empty documents"):
        build_corpus(CorpusConfig(source=str(src)), FakeTokenizer(), "tok", tmp_path / "root")


def test_default_corpus_ships_with_python():
    docs = list(load_documents(CorpusConfig(max_documents=5)))
    assert len(docs) == 5 and all(isinstance(t, str) and t for _, t in docs)


def test_label_keys_change_with_exactly_their_inputs():
    from distill.teacher.labels import TeacherConfig, shard_key

    hashes = {"weights": "w", "tokenizer": "t"}
    base = shard_key(hashes, "fp", TeacherConfig(k=32), "float32")
    assert base == shard_key(hashes, "fp", TeacherConfig(k=32), "float32")
    assert base == shard_key(hashes, "fp", TeacherConfig(k=32, min_topk_mass=0.9), "float32"), "check thresholds do not relabel"
    changed = [
        shard_key(hashes, "fp", TeacherConfig(k=16), "float32"),
        shard_key({**hashes, "weights": "w2"}, "fp", TeacherConfig(k=32), "float32"),
        shard_key({**hashes, "tokenizer": "t2"}, "fp", TeacherConfig(k=32), "float32"),
        shard_key(hashes, "fp2", TeacherConfig(k=32), "float32"),
        shard_key(hashes, "fp", TeacherConfig(k=32), "bfloat16"),
    ]
    assert len({base, *changed}) == 6
