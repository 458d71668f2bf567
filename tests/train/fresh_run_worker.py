"""Run under torchrun by test_train_vae: a fresh run (no --resume) starts in a folder holding an
earlier run's checkpoint while rank 1 reads that checkpoint's kind slowly (a slow node or a shared
filesystem): the main process must not set the checkpoint aside before every rank has read it.

usage: fresh_run_worker.py OUT
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dalle_fast.train import loop
from dalle_fast.train.distributed import DistInfo


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 1:
        read_info = loop.read_info

        def slow(path):
            time.sleep(0.5)
            return read_info(path)

        loop.read_info = slow
    model = torch.nn.Linear(2, 2)
    dist.barrier()  # both reach TrainingRun together, as after a trainer's common setup
    loop.TrainingRun(out, DistInfo(rank, world), modules={"model": model},
                     optimizer=torch.optim.AdamW(model.parameters()), generators={}, meta={"kind": "prior"},
                     record={}, resume=False, steps=4, run_steps=0, desc="fresh")
    print(f"rank {rank}: started", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
