"""Every labelled token of an optimizer step weighs the same, however the step is split into
micro-batches or ranks (TRL's ``num_items_in_batch``): a micro-batch with 2 labelled tokens does
not count as much as one with 40."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.train.config import TrainConfig
from distill.train.losses import LossSpec, distillation_loss
from distill.train.student import build_student
from distill.train.trainer import BatchKind, StepLoss, collate, forward_backward
from tests.distill.train_worker import TINY_STUDENT
from tests.processes import run_group
from tests.storage.test_shards import make_rows

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5  # fp32 gradients of the same sums, taken over differently padded batches
STEP_LOSS = StepLoss.from_config(TrainConfig(), BatchKind.WINDOWS)  # the default train section's loss


def model_and_rows(teacher_dir):
    """A tiny random student and 8 windows whose labelled spans range from 0 to ~40 tokens."""
    model = build_student(teacher_dir, TINY_STUDENT, 49152)
    rows = make_rows(8, 49152, 4, seed=11, length=(4, 48))
    return model, rows


def _grads(model, micro_batches, world=1, weighting="step"):
    model.zero_grad(set_to_none=True)
    if weighting == "step":
        forward_backward(model, micro_batches, STEP_LOSS, world, torch.device("cpu"))
    else:  # the old rule: the mean inside each micro-batch, divided by the number of micro-batches
        for b in micro_batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss, _ = distillation_loss(
                logits, b["targets"], b["teacher_ids"], b["teacher_logprobs"], b["mask"], LossSpec(tail="bucket")
            )
            (loss / len(micro_batches)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_grad_accum_gives_the_gradients_of_one_big_batch(teacher_dir):
    model, rows = model_and_rows(teacher_dir)
    labelled = [len(r["input_ids"]) - 1 - r["label_start"] for r in rows]
    assert min(labelled) < 5 and max(labelled) > 20, f"rows must be ragged: {labelled}"
    whole = _grads(model, [collate(rows, 4)])
    accumulated = _grads(model, [collate(rows[i : i + 2], 4) for i in range(0, 8, 2)])
    assert _max_diff(whole, accumulated) < TOL
    # what this fixes: averaging per micro-batch weighs a 2-token micro-batch like a 40-token one
    old = _grads(model, [collate(rows[i : i + 2], 4) for i in range(0, 8, 2)], weighting="old")
    assert _max_diff(whole, old) > 100 * TOL


def test_two_ranks_give_the_gradients_of_one(teacher_dir, tmp_path):
    model, rows = model_and_rows(teacher_dir)
    single = _grads(model, [collate(rows, 4)])
    out = tmp_path / "grads.safetensors"
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.distill.grad_worker",
        str(teacher_dir),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = run_group(cmd, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(single, load_file(out)) < TOL
