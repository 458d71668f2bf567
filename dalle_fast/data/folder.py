"""A folder of `name.png|jpg|jpeg|webp` + `name.txt` caption pairs (one caption per line)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .fingerprint import files_fingerprint
from .transforms import (IMAGE_EXTENSIONS, RandomResizedCrop, UnreadableCaption, UnreadableSample,
                         check_seed, check_size, decode_caption, load_rgb, pick_caption, prepare_image)

log = logging.getLogger(__name__)

_STREAM = 0xF01DE5  # keeps these generators apart from other seeded streams


def scan_pairs(root: Path) -> tuple[list[tuple[Path, Path]], int]:
    """(image, caption) path pairs under `root`, recursively and in sorted order, and the
    number of images that have no caption file. Hidden files and folders are ignored;
    symlinked folders are followed once."""
    pairs: list[tuple[Path, Path]] = []
    uncaptioned: list[Path] = []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink cycle or a second link to the same folder
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # caption files by stem, the extension in any case (a.TXT beside a.JPG; a.txt first)
        captions = {os.path.splitext(n)[0]: n for n in sorted(files)
                    if os.path.splitext(n)[1].lower() == ".txt"}
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            if stem in captions:
                pairs.append((Path(folder) / name, Path(folder) / captions[stem]))
            else:
                uncaptioned.append(Path(folder) / name)
    if uncaptioned:
        examples = ", ".join(str(p) for p in uncaptioned[:3])
        log.warning("%d images under %s have no caption file and are skipped (e.g. %s)",
                    len(uncaptioned), root, examples)
    return pairs, len(uncaptioned)


class ImageTextFolder(Dataset):
    """Map-style dataset of `(image, caption)` read from a folder of caption pairs.

    Images become RGB, cropped (`crop`, or the centred square when None) and resized to
    `size` x `size`: float32 [3, size, size] in [0, 1]. The caption is one line of the text
    file drawn at random. Both random choices come from a generator seeded with
    `(seed, epoch, index)`, so an access is reproducible; call `set_epoch` each epoch (as with
    DistributedSampler) for fresh draws.

    Images without a caption file are dropped at scan time (`missing_captions`). An image that
    cannot be decoded, or whose caption file is empty, unreadable or not text (captions are UTF-8,
    or UTF-16 / UTF-32 with a BOM: see `decode_caption`), is skipped when first met:
    the access falls back to the next readable pair, the file is logged once and `skipped`
    counts it. With DataLoader workers each worker keeps its own counters.
    """

    def __init__(self, root: Union[str, os.PathLike], size: int = 256,
                 crop: Optional[RandomResizedCrop] = None, seed: int = 0, all_captions: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageTextFolder: {str(self.root)!r} is not a directory")
        if crop is not None and not isinstance(crop, RandomResizedCrop):
            raise TypeError(f"crop must be a RandomResizedCrop or None, got {type(crop).__name__}")
        self.size = check_size(size)
        self.crop = crop
        self.seed = check_seed(seed)
        self.all_captions = bool(all_captions)
        self.epoch = 0
        self.pairs, self.missing_captions = scan_pairs(self.root)
        if not self.pairs:
            raise ValueError(
                f"ImageTextFolder: no image-caption pairs under {str(self.root)!r} (looked for "
                f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files with a .txt beside them; "
                f"{self.missing_captions} images had no caption)")
        self.skipped = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """The pairs' names, sizes and modification times (see `files_fingerprint`)."""
        return files_fingerprint((path for pair in self.pairs for path in pair), self.root)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load(self, position: int, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
        image_path, caption_path = self.pairs[position]
        try:
            text = decode_caption(caption_path.read_bytes())
        except (OSError, UnreadableCaption) as exc:
            raise UnreadableCaption(f"{caption_path}: {exc}") from exc
        caption = pick_caption(text, rng, self.all_captions)
        if caption is None:
            raise UnreadableCaption(f"caption file {caption_path} is empty")
        image = load_rgb(image_path)
        return prepare_image(image, self.size, self.crop, rng), caption

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        n = len(self.pairs)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n}")
        for step in range(n):
            position = (index + step) % n
            if position in self._bad:
                continue
            # A fresh generator per (requested index, pair tried): the result does not depend
            # on which bad files earlier accesses already found, and a fallback pair is
            # augmented differently from its own access.
            rng = np.random.default_rng([_STREAM, self.seed, self.epoch, index, position])
            try:
                return self._load(position, rng)
            except UnreadableSample as exc:
                self._bad.add(position)
                self.skipped += 1
                log.warning("skipping unreadable pair %s: %s", self.pairs[position][0], exc)
        raise ValueError(f"ImageTextFolder: none of the {n} pairs under {str(self.root)!r} could be read "
                         "(see the warnings above)")

    def __repr__(self) -> str:
        return (f"ImageTextFolder(root={str(self.root)!r}, size={self.size}, crop={self.crop}, "
                f"seed={self.seed}, pairs={len(self.pairs)})")
