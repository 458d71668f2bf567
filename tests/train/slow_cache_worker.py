"""Run under torchrun by test_train_prior: the main process builds the token cache for longer than
the process group's timeout (3 s here) while the other ranks wait for it.

usage: slow_cache_worker.py DVAE_CHECKPOINT OUT SYNC_FOLDER SECONDS
"""

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from dalle_fast.train import prior
from dalle_fast.train.distributed import DistInfo

DEFAULT_TIMEOUT = timedelta(seconds=3)


def main() -> None:
    dvae, out, sync, seconds = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Start the group together (imports on a busy machine can take longer than its short timeout).
    (sync / f"ready{rank}").touch()
    deadline = time.monotonic() + 300
    while not all((sync / f"ready{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError("the other ranks never started")
        time.sleep(0.02)
    dist.init_process_group("gloo", timeout=DEFAULT_TIMEOUT)
    build = prior.build_token_cache

    def slow_build(*args, **kwargs):
        time.sleep(seconds)
        return build(*args, **kwargs)

    prior.build_token_cache = slow_build
    cfg = prior.TrainPriorConfig(dvae=dvae, data="shapes", out=str(out), num_images=8, preset="tiny", device="cpu")
    start = time.monotonic()
    cache = prior.prepare_cache(cfg, DistInfo(rank, world))
    print(f"rank {rank}: waited {time.monotonic() - start:.1f} s for a cache of {len(cache)} images", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
