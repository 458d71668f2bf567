"""Data-parallel plumbing for the training loops: torchrun's environment in, a process group out.

Launch a loop with `torchrun --nproc_per_node N -m dalle_fast.cli train-vae ...` (one machine)
or with --nnodes/--node_rank/--rdzv_endpoint across machines; without torchrun it runs as one
process. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if launched by it; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device (use --device cpu)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a small tensor of metrics (identity without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def gather_to_all(value) -> list:
    """Every rank's `value` (a small picklable object, e.g. RNG states), by rank: [value] without a
    process group. A collective: every rank calls it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cpu_group():
    """A gloo group of every rank (a collective: every rank calls it, in the same order), for small
    CPU-side agreements that must not wait on a device (NCCL reduces device tensors)."""
    return dist.new_group(backend="gloo")


def max_over_ranks(value: int, group) -> int:
    """The largest of every rank's `value` (an int), over `group` (cpu_group's). A collective."""
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


# How long the other ranks wait for the main process's one-off work (the token cache: hours for a
# large dataset). The default group's timeout, 10 minutes under NCCL and 30 under gloo, is for collectives.
MAIN_WORK_TIMEOUT = timedelta(days=7)


@contextmanager
def others_wait(timeout: timedelta = MAIN_WORK_TIMEOUT) -> Iterator[None]:
    """Every rank enters the block, the main process does its work there, and every rank leaves
    once all are done, waiting up to `timeout`: the closing barrier runs on a gloo group of its
    own (CPU, whatever the default backend) made with that timeout on entry, so a long wait does
    not trip the default group's. An exception in the block skips the barrier (torchrun then
    stops the other ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    group = dist.new_group(backend="gloo", timeout=timeout)  # a collective: before the main process starts
    yield
    dist.barrier(group=group)
    dist.destroy_process_group(group)


class _Loss(torch.nn.Module):
    """DDP all-reduces the gradients of what its module's forward computed: make that the loss."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model.loss(*args)


def data_parallel(model: torch.nn.Module, info: DistInfo):
    """`model.loss` as the callable a training step calls: as is in one process, through
    DistributedDataParallel (gradients all-reduced) under torchrun."""
    if not info.enabled:
        return model.loss
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Loss(model), device_ids=[info.local_rank] if info.device.type == "cuda" else None)
