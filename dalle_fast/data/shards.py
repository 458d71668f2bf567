"""Tar shards in the WebDataset layout, streamed and split across workers and ranks.

A shard is a tar file whose members sharing a key (the member name up to the first dot of its
base name, folders included) form one sample: an image (`.jpg`, `.jpeg`, `.png` or `.webp`)
and its captions (`.txt`, one per line). Members of a sample are adjacent, as WebDataset
writes them; members of other suffixes (`.json`, `.cls`, ...) are passed over unread. Shards are
read with `tarfile` in streaming mode: nothing is extracted to disk and no member index is built,
so a shard may be a network-mounted file.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from itertools import chain
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .fingerprint import files_fingerprint
from .transforms import (RandomResizedCrop, UnreadableCaption, UnreadableSample, check_seed, check_size,
                         decode_caption, load_rgb, pick_caption, prepare_image)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
USED_SUFFIXES = frozenset(IMAGE_SUFFIXES + ("txt",))  # members of other suffixes are never read
# A member larger than this is not read into memory (a small gzipped shard can hold a member of
# gigabytes of zeros): its sample is skipped and counted. Images of the paper's datasets are far below it.
MAX_MEMBER_BYTES = 64 << 20
_STREAM = 0x7A125  # keeps these generators apart from other seeded streams

PathsLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def expand_shards(paths: PathsLike) -> list[str]:
    """A path, a glob pattern (`data/shard-*.tar`, `data/**/*.tar` for every folder level) or a
    list of either -> sorted shard paths. An existing file is taken as it is, even when its name
    holds glob characters (`shard[01].tar`).

    Brace ranges (`shard-{000..009}.tar`) are not expanded: use a glob.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("TarShards: no shard paths given")
    out: list[str] = []
    for item in items:
        pattern = os.path.expanduser(os.fspath(item))
        if os.path.isfile(pattern):
            out.append(pattern)
        elif any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"TarShards: no files match {pattern!r}")
            out.extend(m for m in matches if os.path.isfile(m))
        elif "{" in pattern:
            raise FileNotFoundError(
                f"TarShards: {pattern!r} does not exist (brace ranges are not expanded; use a "
                "glob such as 'shard-*.tar')")
        else:
            raise FileNotFoundError(f"TarShards: shard {pattern!r} does not exist")
    unique = list(dict.fromkeys(out))
    if not unique:
        raise ValueError(f"TarShards: no shard files in {paths!r}")
    return unique


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else RANK / WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: `dir/abc.seg.jpg` -> key `dir/abc`, suffix `seg.jpg` (lowercased)."""
    folder, base = os.path.split(name)
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower() if dot else ""


class TarShards(IterableDataset):
    """Iterable dataset of `(image, caption)` streamed from tar shards.

    Splitting: the consumers are `world_size * num_workers` (rank-major; every rank must use
    the same number of DataLoader workers). Each epoch the shard list is permuted with a
    generator seeded by `(seed, epoch)` (the same on every consumer); with at least as many
    shards as consumers, consumer `c` reads shards `c, c + C, c + 2C, ...` of that order, so
    consumers may see different sample counts (a step-based trainer should use `repeat=True`).
    With fewer shards than consumers every consumer reads all of them and keeps every C-th
    sample instead. Either way every sample is seen exactly once per epoch across consumers.
    With `repeat` and fewer shards than consumers, the passes are dealt out as one stream (a pass
    starts where the last one's dealing left off), so every consumer gets samples even from a
    pass of fewer samples than consumers.

    Shuffling: a buffer of `shuffle_buffer` samples (0 or 1: no shuffling, and the shards in
    sorted order). Shuffling, crops and caption choices use generators seeded by
    `(seed, epoch, consumer, consumers)`, so an epoch's stream repeats exactly; call
    `set_epoch` each epoch. `rank`, `world_size`, `worker` and `num_workers` override what is
    detected (torch.distributed or RANK / WORLD_SIZE, and get_worker_info()).

    `rank=0, world_size=1` reads every rank's share in any process (as the token cache does:
    one process encodes the whole stream); DataLoader workers still split it.

    Counters (per process, so per DataLoader worker): `skipped` samples whose image could not
    be decoded, whose caption is empty or not text (see `decode_caption`), or whose image or
    caption member is over `MAX_MEMBER_BYTES`; `incomplete` samples lacking an image or a
    caption; `bad_shards` shards that failed to open, broke off mid-stream or (uncompressed) end
    without the end-of-archive block, i.e. were cut short (samples read before the break are kept).
    """

    def __init__(self, paths: PathsLike, size: int = 256, crop: Optional[RandomResizedCrop] = None,
                 seed: int = 0, shuffle_buffer: int = 1000, repeat: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 worker: Optional[int] = None, num_workers: Optional[int] = None, all_captions: bool = False):
        super().__init__()
        self.all_captions = bool(all_captions)
        self.paths = expand_shards(paths)
        if crop is not None and not isinstance(crop, RandomResizedCrop):
            raise TypeError(f"crop must be a RandomResizedCrop or None, got {type(crop).__name__}")
        self.size = check_size(size)
        self.crop = crop
        self.seed = check_seed(seed)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be a non-negative integer, got {shuffle_buffer!r}")
        self.shuffle_buffer = shuffle_buffer
        self.repeat = bool(repeat)
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.epoch = 0
        self.skipped = 0
        self.incomplete = 0
        self.bad_shards = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def fingerprint(self) -> str:
        """The shards' paths, sizes and modification times (see `files_fingerprint`)."""
        return files_fingerprint(self.paths)

    def consumer(self) -> tuple[int, int]:
        """(this consumer's id, number of consumers) as seen from the current process."""
        rank, world_size = self.rank, self.world_size
        if rank is None or world_size is None:
            detected_rank, detected_world = distributed_rank()
            rank = detected_rank if rank is None else rank
            world_size = detected_world if world_size is None else world_size
        info = get_worker_info()
        worker = self.worker if self.worker is not None else (info.id if info else 0)
        num_workers = self.num_workers if self.num_workers is not None else (info.num_workers if info else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"TarShards: rank {rank} is not in [0, world_size={world_size})")
        if not 0 <= worker < num_workers:
            raise ValueError(f"TarShards: worker {worker} is not in [0, num_workers={num_workers})")
        return rank * num_workers + worker, world_size * num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        consumer, consumers = self.consumer()
        epoch, dealt, idle = self.epoch, [0], 0
        dealing = len(self.paths) < consumers
        while True:
            yielded = False
            for sample in self._epoch(epoch, consumer, consumers, dealt):
                yielded = True
                yield sample
            if not self.repeat:
                return
            idle = 0 if yielded else idle + 1
            # Another pass would find nothing either, and repeating would hang: after one empty pass, or
            # when the passes are dealt out, after `consumers` of them (any `consumers` passes in a row
            # deal this consumer at least one sample of a non-empty stream).
            if idle >= (consumers if dealing else 1):
                passes = "a whole pass" if idle == 1 else f"{idle} whole passes in a row"
                raise ValueError(f"TarShards: {passes} over {len(self.paths)} shards gave consumer "
                                 f"{consumer} of {consumers} no readable sample ({self.skipped} skipped, "
                                 f"{self.incomplete} incomplete, {self.bad_shards} unreadable shards)")
            epoch += 1

    def _epoch(self, epoch: int, consumer: int, consumers: int,
               dealt: Optional[list[int]] = None) -> Iterator[tuple[torch.Tensor, str]]:
        """One pass. With fewer shards than consumers, `dealt[0]` is the number of samples dealt
        out to the consumers before this pass (0 by default), and the pass adds its own to it."""
        shuffle = self.shuffle_buffer > 1
        order = list(range(len(self.paths)))
        if shuffle:
            order = np.random.default_rng([_STREAM, self.seed, epoch]).permutation(order).tolist()
        paths = [self.paths[k] for k in order]
        if len(paths) >= consumers:
            groups: Iterable = chain.from_iterable(self._groups(p) for p in paths[consumer::consumers])
        else:
            groups = self._dealt(chain.from_iterable(self._groups(p) for p in paths), consumer, consumers,
                                 dealt if dealt is not None else [0])

        seeds = np.random.SeedSequence([_STREAM, self.seed, epoch, consumer, consumers]).spawn(2)
        shuffle_rng, augment_rng = (np.random.default_rng(s) for s in seeds)
        samples = (s for s in (self._complete(g) for g in groups) if s is not None)
        if shuffle:
            samples = _shuffled(samples, self.shuffle_buffer, shuffle_rng)
        for key, image_bytes, text in samples:
            try:
                caption = pick_caption(decode_caption(text), augment_rng, self.all_captions)
                if caption is None:
                    raise UnreadableCaption("empty caption")
                image = load_rgb(image_bytes)
            except UnreadableSample as exc:
                self.skipped += 1
                log.warning("skipping unreadable sample %s: %s", key, exc)
                continue
            yield prepare_image(image, self.size, self.crop, augment_rng), caption

    @staticmethod
    def _dealt(groups: Iterable, consumer: int, consumers: int, dealt: list[int]) -> Iterator:
        """The groups of a stream dealt out round-robin from position dealt[0] on: this consumer's
        share, counting every group dealt into dealt[0]."""
        for group in groups:
            k, dealt[0] = dealt[0], dealt[0] + 1
            if k % consumers == consumer:
                yield group

    def _groups(self, path: str) -> Iterator[tuple[str, dict[str, Optional[bytes]]]]:
        """(shard:key, {suffix: bytes}) for each run of adjacent members sharing a key; the bytes
        of a member over MAX_MEMBER_BYTES are None (it is left unread)."""
        key, members = None, {}
        try:
            with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile() or os.path.basename(info.name).startswith("."):
                        continue
                    member_key, suffix = split_key(info.name)
                    if suffix not in USED_SUFFIXES:
                        continue  # tarfile reads past its bytes without keeping them
                    if info.size > MAX_MEMBER_BYTES:
                        log.warning("skipping %s:%s: %d bytes, over the %d-byte limit of a member", path,
                                    info.name, info.size, MAX_MEMBER_BYTES)
                        data = None
                    else:
                        data = tar.extractfile(info).read()  # streaming: read before moving on
                    if member_key != key:
                        if key is not None:
                            yield f"{path}:{key}", members
                        key, members = member_key, {}
                    members[suffix] = data
                # tarfile ends a stream at the zero block that closes an archive, and just as quietly
                # where the file stops at a header's boundary: an uncompressed tar must show the block
                # (a compressed one cut short fails in the decompressor instead)
                if getattr(tar.fileobj, "comptype", None) == "tar":
                    raw.seek(tar.offset)
                    if raw.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                        raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: the file "
                                                "was cut short")
        except Exception as exc:  # tarfile.ReadError, truncated gzip (EOFError, zlib.error), OSError
            self.bad_shards += 1
            log.warning("shard %s is unreadable past this point: %s: %s", path, type(exc).__name__, exc)
        if key is not None:
            yield f"{path}:{key}", members

    def _complete(self, group: tuple[str, dict[str, Optional[bytes]]]) -> Optional[tuple[str, bytes, bytes]]:
        key, members = group
        image_suffix = next((s for s in IMAGE_SUFFIXES if s in members), None)
        if image_suffix is None or "txt" not in members:
            self.incomplete += 1
            log.warning("skipping %s: no %s", key, "image" if image_suffix is None else "caption")
            return None
        image, text = members[image_suffix], members["txt"]
        if image is None or text is None:  # a member over MAX_MEMBER_BYTES, logged when met
            self.skipped += 1
            return None
        return key, image, text

    def __repr__(self) -> str:
        return (f"TarShards({len(self.paths)} shards, size={self.size}, crop={self.crop}, "
                f"seed={self.seed}, shuffle_buffer={self.shuffle_buffer}, repeat={self.repeat})")


def _shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer: keep `buffer_size` items, emit a random one as each new item arrives."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
