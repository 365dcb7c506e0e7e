"""One rank of the DDP test (tests/test_training.py): started by torch.distributed.run, 2 processes, gloo.

Each rank takes its half of the batch, runs forward and backward through DistributedDataParallel (which averages
the gradients over the ranks) and rank 0 saves the averaged gradients for the test to compare.
Usage: python -m torch.distributed.run --nproc-per-node 2 tests/ddp_worker.py CHECKPOINT BACKEND OUT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastbert


def main(checkpoint: str, backend: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(checkpoint, backend=backend).train()
    ddp = DistributedDataParallel(model)
    batch = torch.load(f"{out}.batch", weights_only=True)
    part = slice(rank * batch["ids"].shape[0] // world, (rank + 1) * batch["ids"].shape[0] // world)
    loss = ddp(input_ids=batch["ids"][part], attention_mask=batch["mask"][part], labels=batch["labels"][part]).loss
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
