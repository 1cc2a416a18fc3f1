"""One optimizer step's gradients under ``torchrun``: rank r takes its share of a fixed set of
ragged rows, runs ``forward_backward`` through DDP, and rank 0 saves the gradients.

    torchrun --nproc_per_node=N -m tests.distill.grad_worker TEACHER_DIR OUT.safetensors"""

import sys

import torch
from safetensors.torch import save_file

from distill.train.trainer import collate, forward_backward, setup_distributed, teardown_distributed
from tests.distill.test_token_weighting import STEP_LOSS, model_and_rows

if __name__ == "__main__":
    teacher_dir, out = sys.argv[1:3]
    rank, world, device = setup_distributed()
    model, rows = model_and_rows(teacher_dir)
    share = len(rows) // world
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    forward_backward(ddp, [collate(rows[rank * share : (rank + 1) * share], 4)], STEP_LOSS, world, device)
    if rank == 0:
        save_file({name: p.grad.contiguous() for name, p in model.named_parameters()}, out)
    teardown_distributed()
