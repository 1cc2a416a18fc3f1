"""The trainer's online-teacher path (the benchmark's full-vocabulary reference) and its
bookkeeping (grad_norm, memory, tokens in ``history.jsonl``), on a tiny random Llama teacher of
64 ids and shards written by the project's writer. Fast: no engine, a few seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill.train.config import StudentConfig, TrainConfig
from distill.train.losses import LossSpec, distillation_loss
from distill.train.student import build_student
from distill.train.trainer import BatchKind, StepLoss, batches, micro_batch_loss, online_labels, train
from storage.reader import ShardStream, StreamPosition, open_shard
from storage.writer import ShardWriter
from tests.storage.test_shards import make_meta, make_rows

VOCAB, K = 64, 4
STUDENT = StudentConfig(
    init="random", num_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(teacher folder, teacher model, shards): a 2-layer random Llama over 64 ids with a word-level
    tokenizer of the same size, and two score-mode shards of random windows (k=4)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(123)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    teacher = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked teacher, so its distribution differs from the student's initial one
        teacher.lm_head.weight.mul_(40.0)
    teacher.save_pretrained(root / "teacher")
    words = {f"w{i}": i for i in range(VOCAB)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w2"))).save_pretrained(
        root / "teacher"
    )
    for s in range(2):
        rows = make_rows(16, VOCAB, K, seed=s, length=(10, 33))
        for r in rows:
            r["doc_id"] = f"s{s}-{r['doc_id']}"
        with ShardWriter(
            root / f"shard{s}.parquet", make_meta(vocab=VOCAB, k=K, shard=f"train-{s:05d}"), row_group_rows=4
        ) as w:
            w.write_many(rows)
    shards = [open_shard(root / f"shard{s}.parquet") for s in range(2)]
    return root / "teacher", teacher.eval(), shards


def _cfg(**kw) -> TrainConfig:
    base = dict(
        steps=4,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        max_grad_norm=0.5,
        warmup_steps=1,
        shuffle_buffer=8,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def test_online_path_with_kd_weight_zero_is_ce_training(tiny, tmp_path):
    teacher_dir, teacher, shards = tiny
    ce = train(STUDENT, _cfg(kd_weight=0.0), teacher_dir, shards, tmp_path / "ce", VOCAB)
    online = train(STUDENT, _cfg(kd_weight=0.0), teacher_dir, shards, tmp_path / "online", VOCAB, teacher=teacher)
    assert online["online_teacher"] and not ce["online_teacher"]
    a, b = _weights(tmp_path / "ce"), _weights(tmp_path / "online")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: the online path at kd_weight 0 is not CE training"
    # and the teacher is used once KD weighs: the same run with KD ends elsewhere
    train(STUDENT, _cfg(kd_weight=0.5), teacher_dir, shards, tmp_path / "kd", VOCAB, teacher=teacher)
    kd = _weights(tmp_path / "kd")
    assert any(not torch.allclose(a[name], kd[name]) for name in a)


@pytest.mark.parametrize(
    "divergence,tail,temperature",
    [
        ("forward_kl", "bucket", 1.0),
        ("reverse_kl", "renormalize", 1.0),
        ("jsd", "renormalize", 2.0),
        ("akl", "bucket", 1.0),
    ],
)
def test_online_labels_equal_offline_labels_holding_the_whole_vocabulary(tiny, divergence, tail, temperature):
    """The online target is the offline loss on labels with k = V: loss and every gradient agree
    within 1e-5 (the bucket of k = V labels holds the clamped 1e-8 on both sides)."""
    teacher_dir, teacher, shards = tiny
    cfg = _cfg(kd_weight=0.7, divergence=divergence, tail=tail, temperature=temperature)
    batch, _ = next(batches(ShardStream(shards, seed=0, shuffle=False), 4, K, StreamPosition()))
    with torch.no_grad():
        full_lp = torch.log_softmax(
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1
        )
    full = {
        **batch,
        "teacher_ids": torch.arange(VOCAB).expand(*batch["mask"].shape, VOCAB).contiguous(),
        "teacher_logprobs": torch.where(batch["mask"][..., None], full_lp, -math.inf),
    }
    counts = batch["mask"].sum().float().repeat(2)
    student = build_student(teacher_dir, STUDENT, VOCAB)
    results = []
    for labels, online in ((full, None), (batch, teacher)):
        student.zero_grad()
        step_loss = StepLoss.from_config(cfg, BatchKind.WINDOWS)
        loss, terms = micro_batch_loss(student, labels, step_loss, counts, torch.device("cpu"), online)
        loss.backward()
        results.append((loss.detach(), terms["kd"], [p.grad.clone() for p in student.parameters()]))
    (offline_loss, offline_kd, offline_grads), (online_loss, online_kd, online_grads) = results
    assert offline_kd > 0.01, "the teacher differs from the student: a KD term of ~0 would test nothing"
    torch.testing.assert_close(online_loss, offline_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(online_kd, offline_kd, rtol=1e-5, atol=1e-5)
    for g_online, g_offline in zip(online_grads, offline_grads):
        torch.testing.assert_close(g_online, g_offline, rtol=1e-4, atol=1e-5)


def test_online_labels_pad_a_student_vocabulary_beyond_the_teacher(tiny):
    """Ids only the student has get teacher probability 0 (finite loss, no NaN from 0 * -inf)."""
    teacher_dir, teacher, shards = tiny
    batch, _ = next(batches(ShardStream(shards, seed=0, shuffle=False), 4, K, StreamPosition()))
    student_logits = torch.randn(*batch["mask"].shape, VOCAB + 16, requires_grad=True)
    teacher_lp = online_labels(teacher, batch, VOCAB + 16, _cfg().precision, torch.device("cpu"))
    assert teacher_lp.shape[-1] == VOCAB + 16 and bool((teacher_lp[..., VOCAB:].exp() == 0).all())
    for divergence in ("forward_kl", "reverse_kl"):
        loss, _ = distillation_loss(
            student_logits, batch["targets"], None, teacher_lp, batch["mask"], LossSpec(divergence, kd_weight=1.0)
        )
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student_logits.grad).all()


def test_online_teacher_refuses_candidates_shards(tiny, tmp_path):
    teacher_dir, teacher, _ = tiny
    meta = make_meta(vocab=VOCAB, k=K, mode="candidates", settings={"length_normalize": False})
    lp = np.log(np.array([0.7, 0.3], np.float32))
    with ShardWriter(tmp_path / "c.parquet", meta) as w:
        for i in range(4):
            w.write(
                {
                    "doc_id": f"c{i}",
                    "prompt_text": "p",
                    "prompt_ids": [1, 2, 3],
                    "candidates": ["yes", "no"],
                    "candidate_ids": [[10], [11, 12]],
                    "answer": 0,
                    "candidate_scores": lp,
                    "teacher_logprobs": lp,
                }
            )
    with pytest.raises(
        ValueError, match=r"c\.parquet: an online teacher distills on score-mode labels' windows, not 'candidates'"
    ):
        train(
            STUDENT, _cfg(), teacher_dir, [open_shard(tmp_path / "c.parquet")], tmp_path / "out", VOCAB, teacher=teacher
        )


def test_history_records_pre_clipping_grad_norm_memory_and_tokens(tiny, tmp_path):
    teacher_dir, _, shards = tiny
    cfg = _cfg(steps=2, kd_weight=0.5, max_grad_norm=1e-3)  # clipping certainly acts
    summary = train(STUDENT, cfg, teacher_dir, shards, tmp_path / "out", VOCAB)
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for entry in history:
        assert math.isfinite(entry["grad_norm"]) and entry["grad_norm"] > 0
        assert entry["peak_memory_mib"] > 0
    assert summary["final_grad_norm"] == history[-1]["grad_norm"] and summary["peak_memory_mib"] > 0

    # the first step's norm, recomputed outside the trainer: same seed, model, data and loss
    torch.manual_seed(cfg.seed)
    model = build_student(teacher_dir, STUDENT, VOCAB)
    stream = ShardStream(shards, seed=cfg.seed, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer)
    micro = [b for (b, _), _ in zip(batches(stream, cfg.batch_size, K, StreamPosition()), range(cfg.grad_accum))]
    tokens = sum(int(b["mask"].sum()) for b in micro)
    assert history[0]["tokens"] == tokens and summary["labelled_tokens_this_run"] == tokens + history[1]["tokens"]
    for b in micro:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, _ = distillation_loss(
            logits,
            b["targets"],
            b["teacher_ids"],
            b["teacher_logprobs"],
            b["mask"],
            LossSpec(tail=cfg.tail, kd_weight=0.5),
            num_tokens=torch.tensor(float(tokens)),
        )
        loss.backward()
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    assert norm > 100 * cfg.max_grad_norm, "the norm after clipping would be max_grad_norm"
    assert history[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)
