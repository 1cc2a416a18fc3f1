"""``label_logits`` against a float64 reference: top-k ids and logprobs, the realized token's
logprob, exact tails, and systematic draws from the whole vocabulary."""

import math

import numpy as np
import pytest
import torch

from distill.teacher.device_labels import label_logits


def _logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * scale).float()


def test_topk_target_and_tail_match_a_float64_reference():
    logits = _logits(16, 500, seed=0)
    targets = torch.randint(0, 500, (16,), generator=torch.Generator().manual_seed(1))
    out = label_logits(logits, 8, targets=targets)
    ref = torch.log_softmax(logits.double(), dim=-1).numpy()  # (N, V)
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :8]
    assert torch.equal(out["topk_ids"], torch.from_numpy(order))
    np.testing.assert_allclose(out["topk_logprobs"].numpy(), np.take_along_axis(ref, order, -1), atol=1e-6)
    np.testing.assert_allclose(out["target_logprobs"].numpy(), ref[np.arange(16), targets.numpy()], atol=1e-6)
    tail = 1 - np.exp(np.take_along_axis(ref, order, -1)).sum(-1)
    np.testing.assert_allclose(out["tail_mass"].numpy(), tail, rtol=1e-5)
    assert out["topk_logprobs"].dtype == torch.float32 and out["topk_ids"].dtype == torch.int64


def test_tail_is_exact_where_one_minus_a_sum_is_not():
    """A confident position: the mass outside the top 2 is about 1e-20, far below float32's
    resolution of ``1 - sum(p)`` (about 1e-7), and the log-sum-exp keeps it to 1e-5 relative."""
    logits = torch.full((1, 1000), -50.0)
    logits[0, 0], logits[0, 1] = 0.0, -1.0
    out = label_logits(logits, 2)
    ref = torch.logsumexp(torch.log_softmax(logits.double(), -1)[0, 2:], 0).exp().item()
    assert out["tail_mass"].item() == pytest.approx(ref, rel=1e-5) and ref > 1e-22


@pytest.mark.parametrize("draws", [1, 7, 80])
def test_systematic_draws_are_within_one_of_their_expectation(draws):
    logits = _logits(64, 300, seed=draws, scale=2.0)
    g = torch.Generator().manual_seed(5)
    out = label_logits(logits, 4, draws=draws, generator=g)
    ids, counts = out["draw_ids"], out["draw_counts"]
    assert ids.shape == counts.shape == (64, draws)
    assert (counts.sum(-1) == draws).all(), "every draw lands on an id"
    assert (counts[:, :-1] >= counts[:, 1:]).all(), "most drawn first"
    p = torch.softmax(logits.double(), -1)
    for row in range(64):
        used = counts[row] > 0
        assert len(set(ids[row][used].tolist())) == int(used.sum()), "each distinct id once"
        assert (ids[row][~used] == ids[row, 0]).all(), "unused slots repeat the first id"
        full = torch.zeros(300, dtype=torch.float64).index_add_(0, ids[row][used], counts[row][used].double())
        assert (full - draws * p[row]).abs().max().item() < 1 + 1e-9


def test_draws_are_unbiased_over_the_whole_vocabulary():
    """The mean of ``count / draws`` over many offsets is ``p`` for every id, tail ids included
    (no proposal, so nothing is pooled into a bucket)."""
    logits = _logits(1, 200, seed=3, scale=1.5).expand(4000, 200).contiguous()
    out = label_logits(logits, 4, draws=10, generator=torch.Generator().manual_seed(0))
    mean = torch.zeros(200, dtype=torch.float64)
    for row in range(4000):
        used = out["draw_counts"][row] > 0
        mean.index_add_(0, out["draw_ids"][row][used], out["draw_counts"][row][used].double() / 10)
    mean /= 4000
    p = torch.softmax(logits[0].double(), -1)
    # systematic sampling: per-id error of one run at most 1/draws, so the mean's standard error
    # is at most 0.1 / sqrt(4000) = 1.6e-3; 5 standard errors
    assert (mean - p).abs().max().item() < 5 * 0.1 / math.sqrt(4000)
    assert (mean[p.argsort()[:150]] > 0).any(), "ids far outside any top-k are drawn"


def test_same_generator_state_same_draws_and_temperature_applies():
    logits = _logits(8, 100, seed=7)
    a = label_logits(logits, 3, draws=16, generator=torch.Generator().manual_seed(9))
    b = label_logits(logits, 3, draws=16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a["draw_ids"], b["draw_ids"]) and torch.equal(a["draw_counts"], b["draw_counts"])
    hot = label_logits(logits, 3, temperature=2.0)
    ref = torch.log_softmax(logits.double() / 2.0, -1).topk(3, -1).values.float()
    torch.testing.assert_close(hot["topk_logprobs"], ref, atol=1e-6, rtol=0)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"k=0"):
        label_logits(torch.zeros(2, 10), 0)
    with pytest.raises(ValueError, match=r"k=11"):
        label_logits(torch.zeros(2, 10), 11)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        label_logits(torch.zeros(10), 2)
    with pytest.raises(ValueError, match=r"draws=-1"):
        label_logits(torch.zeros(2, 10), 2, draws=-1)


# ---- the vLLM plugin's pooler (distill.teacher.vllm_labeller) on vLLM's own metadata objects ----


def _pool(hidden, weight, prompts, scheduled, computed, settings, states):
    """One engine step of the labeller's pooler: requests ``prompts`` (token id lists) with
    ``scheduled[i]`` new tokens after ``computed[i]`` already computed."""
    import numpy as np
    from vllm.pooling_params import PoolingParams
    from vllm.v1.pool.metadata import PoolingMetadata

    from distill.teacher.vllm_labeller import pool_labels

    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    meta = PoolingMetadata(
        prompt_lens=torch.tensor([len(p) for p in prompts]),
        prompt_token_ids=None,
        prompt_token_ids_cpu=ids,
        pooling_params=[PoolingParams(task="token_classify", extra_kwargs=s) for s in settings],
        pooling_states=states,
    )
    meta.build_pooling_cursor(np.array(scheduled), torch.tensor([c + n for c, n in zip(computed, scheduled)]), "cpu")
    return pool_labels(lambda h: h @ weight, hidden, meta)


def test_pooler_labels_every_position_the_same_in_one_step_or_in_chunks():
    """Chunked prefill (a prompt computed over several engine steps) gives the labels of one step:
    each chunk's targets are the next prompt tokens and its draws continue the request's seeded
    offsets. The CPU engine runs without chunking, so this path is tested here."""
    from vllm.v1.pool.metadata import PoolingStates

    from distill.teacher.vllm_labeller import unpack

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 300, generator=g)
    prompts = [torch.randint(0, 300, (23,), generator=g).tolist(), torch.randint(0, 300, (9,), generator=g).tolist()]
    hidden = [torch.randn(len(p), 16, generator=g) for p in prompts]
    settings = [{"k": 5, "draws": 12, "seed": 7}, {"k": 5, "draws": 12, "seed": 8}]
    whole = _pool(torch.cat(hidden), weight, prompts, [23, 9], [0, 0], settings, [PoolingStates(), PoolingStates()])
    states = [PoolingStates(), PoolingStates()]
    first = _pool(torch.cat([hidden[0][:10], hidden[1]]), weight, prompts, [10, 9], [0, 0], settings, states)
    assert first[0] is None and torch.equal(first[1], whole[1])
    second = _pool(hidden[0][10:], weight, prompts[:1], [13], [10], settings[:1], states[:1])
    assert torch.equal(second[0], whole[0])
    # and they are label_logits' labels of those logits, with the next prompt token as the target
    labels = unpack(whole[0].numpy(), 5, 12)
    ref = label_logits(hidden[0] @ weight, 5, targets=torch.tensor(prompts[0][1:] + [0]))
    assert np.array_equal(labels["topk_ids"], ref["topk_ids"].numpy())
    np.testing.assert_allclose(labels["target_logprobs"][:-1], ref["target_logprobs"][:-1].numpy(), atol=1e-6)
    np.testing.assert_allclose(labels["tail_mass"], ref["tail_mass"].numpy(), rtol=1e-6)
    assert (labels["draw_counts"].sum(-1) == 12).all()


def test_packed_labels_unpack_exactly_and_a_wrong_width_is_refused():
    from distill.teacher.vllm_labeller import pack, unpack

    logits = _logits(6, 70_000, seed=2)  # ids above 2**16
    out = label_logits(logits, 4, targets=torch.arange(6), draws=9, generator=torch.Generator().manual_seed(0))
    back = unpack(pack(out, 4, 9).numpy(), 4, 9)
    for name in ("topk_ids", "draw_ids", "draw_counts"):
        assert np.array_equal(back[name], out[name].numpy()), name
    for name in ("topk_logprobs", "target_logprobs", "tail_mass"):
        assert np.array_equal(back[name], out[name].numpy()), name
    with pytest.raises(RuntimeError, match=r"expected \(positions, 10\) for k=4, draws=0"):
        unpack(pack(out, 4, 9).numpy(), 4, 0)
