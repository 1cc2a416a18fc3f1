"""``generate`` and ``candidates`` labelling with the real vLLM engine, checked against plain
transformers on the same checkpoint, through the pipeline's own stage functions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distill.run import labelling
from distill.teacher.config import SamplingConfig
from distill.teacher.reference import reference_labels
from storage.reader import ShardStream, StreamPosition
from tests.conftest import TINY_K, mode_config


def _label(cfg):
    labelling.prepare_corpus(cfg)
    names = cfg.corpus.shard_names()
    results = labelling.label_shards(cfg, names)
    assert not labelling.check_shards(cfg, names)["problems"]
    shards = labelling.open_split(cfg, "train") + labelling.open_split(cfg, "heldout")
    rows = [row for row, _ in ShardStream(shards, shuffle=False).rows(StreamPosition(), epochs=1)]
    return results, shards, rows


@pytest.fixture(scope="module")
def generated(tiny_config, answering_engine):
    cfg = mode_config(tiny_config, "generate", sampling=SamplingConfig(n=2, temperature=0.5, top_p=0.9, max_tokens=16))
    return (cfg, *_label(cfg))


def _engine_answers(engine, cfg, rows):
    """The engine's answers (labels before storage) to the stored rows' prompts, same seeds."""
    from distill.teacher.labels import prompt_seed

    firsts = [r for r in rows if r["window_index"] == 0]
    prompts = [r["input_ids"][: int(r["label_start"]) + 1] for r in firsts]
    seeds = [prompt_seed(cfg.teacher.sampling.seed, r["doc_id"]) for r in firsts]
    return firsts, prompts, list(engine.generate(prompts, seeds, cfg.teacher.sampling))


def test_generated_labels_match_transformers(generated, answering_engine, hf_teacher):
    cfg, results, shards, rows = generated
    firsts, prompts, answers = _engine_answers(answering_engine, cfg, rows)
    positions = near_ties = 0
    for row, prompt, samples in zip(firsts, prompts, answers):
        # seeded per prompt: the same answer as the stored one, whatever the batch
        np.testing.assert_array_equal(np.concatenate([prompt, samples[0]["response_ids"]]), row["input_ids"])
        for sample in samples:
            ids = np.concatenate([prompt, sample["response_ids"]])
            ref = reference_labels(hf_teacher, ids, len(prompt) - 1, TINY_K)
            n = len(sample["response_ids"])
            assert sample["topk_ids"].shape == (n, TINY_K)
            # the sampled token's logprob, then the top-k of every answer position
            np.testing.assert_allclose(sample["target_logprobs"], ref["target_logprobs"], atol=1e-3)
            np.testing.assert_allclose(sample["tail_mass"], ref["tail_mass"], atol=1e-3)
            for t in range(n):
                positions += 1
                if not np.array_equal(sample["topk_ids"][t], ref["topk_ids"][t]):
                    assert np.abs(np.diff(ref["topk_logprobs"][t])).min() < 1e-3, (
                        f"top-k ids differ at {t} without a near-tie"
                    )
                    near_ties += 1
                np.testing.assert_allclose(sample["topk_logprobs"][t], ref["topk_logprobs"][t], atol=1e-3)
    assert positions >= 100 and near_ties <= positions * 0.01
    # stored rows keep the engine's top-k ids and sampled-token logprobs (within the codec's step)
    stored = firsts[0]
    np.testing.assert_array_equal(stored["teacher_ids"], answers[0][0]["topk_ids"].reshape(-1))
    np.testing.assert_allclose(stored["target_logprobs"], answers[0][0]["target_logprobs"], atol=1e-3)


def test_generated_rows_hold_prompt_answer_and_only_answer_labels(generated, teacher_dir):
    from transformers import AutoTokenizer

    from distill.train.trainer import collate

    cfg, results, shards, rows = generated
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    by_doc: dict[str, list] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
        start = int(row["label_start"])
        prompt, answer = row["input_ids"][: start + 1], row["input_ids"][start + 1 :]
        assert len(row["target_logprobs"]) == len(answer) >= 1
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and row["prompt_text"] in tok.decode(prompt)
        assert row["response_text"] == tok.decode(answer, skip_special_tokens=True)
        assert row["finish_reason"] in ("stop", "length")
        assert len(answer) <= 16 or row["finish_reason"] == "stop"
    assert all(sorted(r["window_index"] for r in group) == [0, 1] for group in by_doc.values()), (
        "n=2 answers per prompt"
    )
    # the student's loss covers answer tokens only
    batch = collate(rows[:4], TINY_K)
    for b, row in enumerate(rows[:4]):
        mask = batch["mask"][b].numpy()
        start, L = int(row["label_start"]), len(row["input_ids"])
        assert not mask[:start].any() and mask[start : L - 1].all() and not mask[L - 1 :].any()
    assert shards[0].meta.settings["sampling"]["n"] == 2


def test_temperature_is_recorded_and_applied_once(generated, answering_engine, hf_teacher):
    """Answers were sampled at T=0.5, but vLLM hands back raw logprobs: shards record label
    temperature 1.0 and the sampling settings; the distillation temperature then softens the
    stored labels exactly once."""
    from distill.train.losses import sparse_log_distributions

    cfg, results, shards, rows = generated
    assert shards[0].meta.temperature == 1.0 and shards[0].meta.settings["sampling"]["temperature"] == 0.5
    firsts, prompts, answers = _engine_answers(answering_engine, cfg, rows[:1])
    sample, start = answers[0][0], len(prompts[0]) - 1
    n = len(sample["response_ids"])
    ids = torch.as_tensor(np.concatenate([prompts[0], sample["response_ids"]]), dtype=torch.int64)[None]
    with torch.no_grad():
        logits = hf_teacher(input_ids=ids).logits[0, start:-1].float()  # (n, V): answer positions
    topk = torch.as_tensor(sample["topk_ids"], dtype=torch.int64)
    stored = torch.as_tensor(sample["topk_logprobs"])
    # stored labels are the T=1 distribution, not the sampling temperature's
    raw = torch.log_softmax(logits, -1).gather(-1, topk)
    sampled_t = torch.log_softmax(logits / 0.5, -1).gather(-1, topk)
    assert (stored - raw).abs().max() < 2e-3 and (stored - sampled_t).abs().max() > 0.05
    for T in (2.0, 0.5):
        teacher_lp, _ = sparse_log_distributions(
            torch.zeros(1, n, logits.shape[-1]), topk[None], stored[None], "renormalize", T
        )
        once = torch.log_softmax(torch.log_softmax(logits / T, -1).gather(-1, topk), -1)
        twice = torch.log_softmax(torch.log_softmax(logits / T**2, -1).gather(-1, topk), -1)
        assert (teacher_lp[0].exp() - once.exp()).abs().max() < 2e-3
        assert (teacher_lp[0].exp() - twice.exp()).abs().max() > 0.01


def _reference_candidates(hf_teacher, row, normalize):
    scores = []
    for cand in row["candidate_ids"]:
        ids = torch.as_tensor([list(row["prompt_ids"]) + list(cand)])
        with torch.no_grad():
            lp = torch.log_softmax(hf_teacher(input_ids=ids).logits[0, :-1].double(), -1)
        p = len(row["prompt_ids"])
        token_lp = lp[p - 1 :].gather(-1, ids[0, p:, None])[:, 0]
        scores.append(token_lp.mean() if normalize else token_lp.sum())
    return torch.log_softmax(torch.stack(scores), -1).numpy()


@pytest.mark.parametrize("normalize", [False, True])
def test_candidate_distributions_match_transformers(tiny_config, engine, hf_teacher, normalize):
    cfg = mode_config(tiny_config, "candidates", length_normalize=normalize)
    results, shards, rows = _label(cfg)
    assert len(rows) >= 10 and shards[0].meta.settings == {"length_normalize": normalize}
    for row in rows:
        ref = _reference_candidates(hf_teacher, row, normalize)
        assert len(row["candidates"]) == len(row["candidate_ids"]) == len(ref) >= 2
        np.testing.assert_allclose(np.exp(row["teacher_logprobs"]), np.exp(ref), atol=1e-3)
        assert -1 <= row["answer"] < len(row["candidates"])
    assert sum(r["answer"] >= 0 for r in rows) == len(rows), "the example file has gold answers"


def test_mode_settings_are_part_of_the_cache_key(tiny_config):
    gen = mode_config(tiny_config, "generate")
    hotter = dataclasses.replace(
        gen, teacher=dataclasses.replace(gen.teacher, sampling=SamplingConfig(temperature=1.0))
    )
    from distill.teacher.labels import shard_key

    hashes = {"weights": "w", "tokenizer": "t"}
    keys = {
        shard_key(hashes, "f", c.teacher, "float32")
        for c in (tiny_config, gen, hotter, mode_config(tiny_config, "candidates"))
    }
    assert len(keys) == 4


def test_seeded_answers_to_more_prompt_tokens_than_one_engine_step(answering_engine):
    """64 prompts x 4 answers x 40 tokens is 10,240 prompt tokens, more than the engine's
    4,096-token step: with chunked prefill a seeded prompt cut across two steps killed the CPU
    engine ("CPU Generator does not use offset"). Prompts now go in whole, and the answers
    still follow their seeds whatever else shares the batch."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 20000, 40).tolist() for _ in range(64)]
    seeds = list(range(64))
    sampling = SamplingConfig(n=4, temperature=1.0, top_p=1.0, max_tokens=4)
    step = answering_engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert len(prompts) * sampling.n * 40 > step
    answers = list(answering_engine.generate(prompts, seeds, sampling, k=1))
    assert len(answers) == 64 and all(len(a) == 4 and all(len(s["response_ids"]) >= 1 for s in a) for a in answers)
    alone = list(answering_engine.generate(prompts[5:6], seeds[5:6], sampling, k=1))[0]
    assert [s["response_ids"].tolist() for s in alone] == [s["response_ids"].tolist() for s in answers[5]]
