"""On-policy rounds without an engine: each round continues the teacher-row stream and the
lambda coins where the training before it ended (the real trainer on synthetic shards), and the
answer statistics reported beside the KL on a student's own answers (reference values on
hand-made answers)."""

from __future__ import annotations

import json

import pytest

from distill.run import onpolicy
from storage.reader import MixPosition, MixStream, ShardStream, StreamPosition, open_shard
from storage.writer import ShardWriter
from tests.storage.test_shards import make_meta, make_rows


def test_distinct_n_reference_values():
    # bigrams (1,2) (2,3) (3,1) (1,2) | (1,2) (2,2) (2,2): 7 bigrams, 4 distinct, counted over both answers
    assert onpolicy.distinct_n([[1, 2, 3, 1, 2], [1, 2, 2, 2]], 2) == pytest.approx(4 / 7)
    assert onpolicy.distinct_n([[7, 7, 7, 7, 7]], 2) == pytest.approx(1 / 4)  # a loop: one bigram, four times
    assert onpolicy.distinct_n([[1, 2, 3, 4]], 2) == 1.0
    assert onpolicy.distinct_n([[1, 2, 3], [3, 1]], 1) == pytest.approx(3 / 5)
    assert onpolicy.distinct_n([[5], []], 2) == 0.0  # no bigram at all (a bigram never spans two answers)


def test_answer_stats_reference_values():
    answers = [[1, 2, 3, 1, 2], [1, 2, 2, 2], [9]]
    logprobs = [[-1.0, -2.0, -0.5, -0.5, -1.0], [-3.0, -1.0, -1.0, -1.0], [-0.25]]
    stats = onpolicy.answer_stats(answers, ["stop", "length", "stop"], logprobs)
    assert stats["self_len"] == pytest.approx(10 / 3)
    assert stats["self_eos"] == pytest.approx(2 / 3)
    assert stats["self_distinct2"] == pytest.approx(4 / 7)
    assert stats["self_teacher_ll"] == pytest.approx(-11.25 / 10)  # token-weighted, not a mean of answer means
    # one short answer and one long one: the long one's tokens weigh more
    stats = onpolicy.answer_stats([[1], [2, 3, 4]], ["stop", "stop"], [[-4.0], [0.0, 0.0, 0.0]])
    assert stats["self_teacher_ll"] == pytest.approx(-1.0) and stats["self_len"] == 2.0 and stats["self_eos"] == 1.0


@pytest.mark.parametrize(
    "answers, reasons, logprobs, match",
    [
        ([], [], [], "no answers"),
        ([[1, 2]], ["stop", "stop"], [[0.0, 0.0]], "2 finish reasons"),
        ([[1, 2]], ["abort"], [[0.0, 0.0]], "'abort'"),
        ([[1, 2]], ["stop"], [[0.0]], "2 tokens but 1 teacher logprobs"),
    ],
)
def test_answer_stats_refuses_inconsistent_input(answers, reasons, logprobs, match):
    with pytest.raises(ValueError, match=match):
        onpolicy.answer_stats(answers, reasons, logprobs)


def test_shard_answer_stats_reads_the_answers_of_a_generate_shard(tmp_path):
    rows = make_rows(12, 49152, 4, seed=3, length=(6, 20))
    for i, r in enumerate(rows):
        r.update(
            prompt_text=f"prompt {i}", response_text=f"answer {i}", finish_reason="length" if i % 4 == 0 else "stop"
        )
    path = tmp_path / "own.parquet"
    with ShardWriter(path, make_meta(mode="generate", shard="self-x", split="heldout"), row_group_rows=5) as w:
        w.write_many(rows)
    stats = onpolicy.shard_answer_stats(open_shard(path))
    answers = [list(r["input_ids"][r["label_start"] + 1 :]) for r in rows]
    expect = onpolicy.answer_stats(answers, [r["finish_reason"] for r in rows], [r["target_logprobs"] for r in rows])
    assert (
        stats["self_len"] == expect["self_len"]
        and stats["self_eos"] == 0.75
        and stats["self_distinct2"] == expect["self_distinct2"]
    )
    # the stored teacher logprobs are quantized (storage.codec): 1e-3 nats per token is far above their error
    assert stats["self_teacher_ll"] == pytest.approx(expect["self_teacher_ll"], abs=1e-3)


def _write(folder, prefix: str, n_shards: int, rows: int, seed: int) -> list:
    folder.mkdir(parents=True)
    shards = []
    for s in range(n_shards):
        batch = make_rows(rows, 49152, 4, seed=seed + s, length=(10, 33))
        for r in batch:
            r["doc_id"] = f"{prefix}{s}-{r['doc_id']}"
        with ShardWriter(
            folder / f"{prefix}{s}.parquet", make_meta(k=4, shard=f"train-{s:05d}"), row_group_rows=4
        ) as w:
            w.write_many(batch)
        shards.append(open_shard(folder / f"{prefix}{s}.parquet"))
    return shards


def _rows(log_prefix) -> list[tuple[str, int]]:
    return [(d, int(w)) for d, w in (line.split("\t") for line in open(f"{log_prefix}.rank0").read().splitlines())]


def test_rounds_continue_the_teacher_stream_and_the_coins(teacher_dir, tmp_path):
    """The distilled student, then two rounds trained as ``run_round`` trains them (the real
    trainer, each round starting at ``start_position`` of the training before it): the teacher
    rows of the three runs are exactly one uninterrupted stream's, no round replays another's,
    the lambda coins go on across rounds, and each round's own answers start at their first row."""
    from distill.train.config import TrainConfig
    from distill.train.trainer import train
    from tests.distill.train_worker import TINY_STUDENT

    teacher = _write(tmp_path / "teacher", "t", 2, 32, seed=0)  # 64 teacher rows: one epoch outlasts all three runs
    answers = {r: _write(tmp_path / f"answers{r}", f"a{r}-", 1, 16, seed=10 * r) for r in (1, 2)}
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, progress=False, checkpoint_every=0, shuffle_buffer=8)
    train(TINY_STUDENT, cfg, teacher_dir, teacher, tmp_path / "student", 49152, row_log=tmp_path / "student-rows")
    starts = {}
    for r, before in ((1, "student"), (2, "round1")):
        starts[r] = onpolicy.start_position(tmp_path / before)
        train(
            TINY_STUDENT,
            cfg,
            teacher_dir,
            teacher,
            tmp_path / f"round{r}",
            49152,
            row_log=tmp_path / f"round{r}-rows",
            mix=(answers[r], 0.5),
            start=starts[r],
        )
    student_end = json.loads((tmp_path / "student" / "summary.json").read_text())["position"]
    assert starts[1] == MixPosition(0, StreamPosition.from_dict(student_end))
    assert starts[2].index == 12 and starts[2].extra == StreamPosition()
    assert json.loads((tmp_path / "round2" / "summary.json").read_text())["position"]["index"] == 24

    student, round1, round2 = (_rows(tmp_path / f"{name}-rows") for name in ("student", "round1", "round2"))
    own = {r: [row for row in rows if row[0].startswith(f"a{r}-")] for r, rows in ((1, round1), (2, round2))}
    taught = [[row for row in rows if row[0].startswith("t")] for rows in (student, round1, round2)]
    assert len(student) == len(round1) == len(round2) == 12 and len(round1) == len(taught[1]) + len(own[1])
    assert own[1] and own[2] and taught[1] and taught[2], "with lambda 0.5, 12 coins should give rows of both kinds"

    # one uninterrupted stream of teacher rows, and no round replays the rows before it
    stream = ShardStream(teacher, seed=cfg.seed, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer)
    flat = [(row["doc_id"], int(row["window_index"])) for row, _ in stream.rows(StreamPosition(), epochs=1)]
    assert taught[0] + taught[1] + taught[2] == flat[: sum(map(len, taught))]
    assert not set(taught[1]) & set(taught[2]) and not set(taught[0]) & set(taught[1] + taught[2])

    # the coins: rows 12..23 of one mix, not rows 0..11 again
    coins = MixStream(stream, stream, 0.5, cfg.seed)
    assert [row[0].startswith("a2-") for row in round2] == [coins.takes_extra(i) for i in range(12, 24)]
    assert [row[0].startswith("a1-") for row in round1] == [coins.takes_extra(i) for i in range(12)]
    assert [coins.takes_extra(i) for i in range(12, 24)] != [coins.takes_extra(i) for i in range(12)]

    # each round's own answers from their first row
    for r in (1, 2):
        first = ShardStream(answers[r], seed=cfg.seed + 1, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer)
        assert (
            own[r]
            == [(row["doc_id"], int(row["window_index"])) for row, _ in first.rows(StreamPosition(), epochs=1)][
                : len(own[r])
            ]
        )


def test_start_position_from_the_training_before(tmp_path):
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "summary.json").write_text(
        json.dumps({"world_size": 1, "position": {"epoch": 1, "unit": 4, "row": 2}})
    )
    assert onpolicy.start_position(tmp_path / "single") == MixPosition(0, StreamPosition(1, 4, 2))
    (tmp_path / "round").mkdir()
    end = MixPosition(37, StreamPosition(2, 0, 5), StreamPosition(0, 3, 1))
    (tmp_path / "round" / "summary.json").write_text(json.dumps({"world_size": 1, "position": end.to_dict()}))
    assert onpolicy.start_position(tmp_path / "round") == MixPosition(37, StreamPosition(2, 0, 5), StreamPosition())
    # a student of several processes ended at one position per rank: the round starts at the first row
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "summary.json").write_text(
        json.dumps({"world_size": 2, "position": {"epoch": 0, "unit": 2, "row": 0}})
    )
    assert onpolicy.start_position(tmp_path / "ranks") == MixPosition()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"world_size": 1}))
    with pytest.raises(ValueError, match="no 'position'"):
        onpolicy.start_position(tmp_path / "old")
