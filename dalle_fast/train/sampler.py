"""A sampler that makes data order a pure function of (seed, epoch, rank) and can start mid-epoch,
so that a resumed run sees exactly the batches the interrupted one would have seen."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if length < world_size:
            raise ValueError(f"dataset of {length} items is too small for {world_size} ranks")
        self.length, self.seed, self.rank, self.world_size, self.shuffle = length, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def share(self) -> int:
        """Items per rank per epoch (the tail that does not split evenly is dropped)."""
        return self.length // self.world_size

    def set_position(self, epoch: int, start: int) -> None:
        """Next iteration yields this rank's items of `epoch` from index `start` on."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        mine = order[: self.share() * self.world_size][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.share() - self.start
