"""Image-caption datasets: synthetic shapes, caption folders and tar shards.

Every dataset yields `(image, caption)` with image a float32 tensor [3, size, size] in [0, 1].
`make_dataset` turns the CLI's `--data` string into one of them.
"""

from __future__ import annotations

import glob
import os
from typing import Optional, Union

from .folder import ImageTextFolder
from .shapes import (COLORS, HELD_OUT, RELATIONS, SHAPES, Scene, ShapeObject, ShapesDataset,
                     export_folder, relation_between)
from .shards import TarShards
from .transforms import RandomResizedCrop, center_crop_resize, load_rgb, to_tensor

__all__ = [
    "COLORS", "HELD_OUT", "RELATIONS", "SHAPES", "Scene", "ShapeObject", "ShapesDataset",
    "export_folder", "relation_between", "ImageTextFolder", "TarShards", "RandomResizedCrop",
    "center_crop_resize", "load_rgb", "to_tensor", "make_dataset",
]

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DATA_SPEC_HELP = ("'shapes' or 'shapes:train' / 'shapes:test' (synthetic), a directory of "
                  "name.png|jpg + name.txt pairs, or tar shards: a .tar (.tar.gz) path, a glob such as "
                  "'data/shard-*.tar' ('data/**/*.tar' for every folder level), or several of these separated by "
                  "commas")


def make_dataset(spec: str, size: int, *, crop: Optional[RandomResizedCrop] = None, seed: int = 0,
                 length: Optional[int] = None, shuffle_buffer: int = 1000, repeat: bool = False,
                 all_captions: bool = False,
                 split_ranks: bool = True) -> Union[ShapesDataset, ImageTextFolder, TarShards]:
    """Map a `--data` string to a dataset.

    - `shapes`, `shapes:train`, `shapes:test` -> ShapesDataset(split, size, seed, length).
      Shapes are rendered at `size` and never cropped (a crop could cut an object out of its
      caption), so `crop` is ignored. A directory literally named `shapes` is `./shapes`.
    - an existing directory -> ImageTextFolder(spec, size, crop, seed).
    - paths or globs ending in `.tar`, `.tar.gz` or `.tgz` (comma-separated for several) -> TarShards(...,
      shuffle_buffer, repeat).
    `length` only applies to shapes, `shuffle_buffer`, `repeat` and `split_ranks` only to tar shards.
    `split_ranks=False`: this process reads every rank's share of the shards (rank 0 of 1), for
    work that one process does for all, such as the token cache; DataLoader workers still split it.
    `all_captions`: a folder's or shard's caption is all its non-empty lines joined by newlines
    (the token cache keeps them all) instead of one line drawn per access; shapes have one.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data spec must be a string, got {type(spec).__name__}")
    spec = os.fspath(spec).strip()
    if spec == "shapes" or spec.startswith("shapes:"):
        split = spec.partition(":")[2] or "train"
        if split not in ("train", "test"):
            raise ValueError(f"unknown shapes split {split!r} in {spec!r}: use shapes:train or shapes:test")
        return ShapesDataset(split=split, size=size, seed=seed, length=length)
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        try:
            return ImageTextFolder(expanded, size=size, crop=crop, seed=seed, all_captions=all_captions)
        except ValueError as exc:
            if any(glob.glob(os.path.join(glob.escape(expanded), "*" + s)) for s in TAR_SUFFIXES):
                raise ValueError(f"{exc}; for the tar shards in it pass a glob such as "
                                 f"'{os.path.join(spec, '*.tar')}'") from exc
            raise
    # an existing file is one shard, even when its name holds a comma
    parts = [spec] if os.path.isfile(expanded) else [p.strip() for p in spec.split(",") if p.strip()]
    if parts and all(p.lower().endswith(TAR_SUFFIXES) for p in parts):
        whole = {} if split_ranks else dict(rank=0, world_size=1)
        return TarShards(parts, size=size, crop=crop, seed=seed, shuffle_buffer=shuffle_buffer,
                         repeat=repeat, all_captions=all_captions, **whole)
    if not os.path.exists(expanded) and not any(ch in spec for ch in "*?["):
        raise ValueError(f"data {spec!r}: no such directory or file; expected {DATA_SPEC_HELP}")
    raise ValueError(f"data {spec!r} is not a dataset this tool reads; expected {DATA_SPEC_HELP}")
