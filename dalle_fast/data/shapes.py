"""The synthetic shapes dataset: coloured shapes and their spatial relations on black.

The demo and the zero-shot evaluation depend on this exact distribution (issue 5):

- black background; one or two filled, non-overlapping objects;
- shapes `circle`, `square`, `triangle` (equilateral, pointing up), colours `COLORS` (exact RGB);
- diameter or side between 30% and 45% of the canvas;
- captions `a {color} {shape}` or `a {color} {shape} {relation} a {color} {shape}`, the first
  object being the subject; two objects never share both colour and shape;
- a relation is unambiguous: the centroids are at least 25% of the canvas apart along its axis
  and closer than 25% along the other axis (we place them at most 20% apart there, a margin so
  that centroids measured from pixels still satisfy the strict bound);
- the (colour, shape) pairs in `HELD_OUT` never appear in a training image; half of the test
  split's items contain at least one of them, the other half none.

Item `i` is a pure function of `(split, seed, i)` (and `size`, which only scales it): the scene
is drawn from a numpy generator seeded with those numbers, in canvas fractions, so the same
index gives the same scene at every resolution, and resumed training sees the same data.
Images are rendered analytically with 4x4 supersampling per pixel: interior pixels carry the
exact colour, edge pixels the colour scaled by the covered fraction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import check_seed, check_size, to_tensor

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "triangle"),
    ("magenta", "circle"),
    ("cyan", "square"),
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)

SPLITS = ("train", "test")
DEFAULT_LENGTH = {"train": 100_000, "test": 1_000}

# Geometry, in fractions of the canvas side.
MIN_OBJECT_SIZE = 0.30
MAX_OBJECT_SIZE = 0.45
MIN_AXIS_DISTANCE = 0.25   # centroids at least this far apart along the relation's axis
MAX_CROSS_DISTANCE = 0.25  # and strictly closer than this along the other axis
CROSS_SPREAD = 0.20        # what we actually draw across the axis (margin under the bound)
MIN_GAP = 0.05             # free space between the two bounding boxes along the axis
P_SINGLE = 1 / 3           # fraction of images holding one object
P_NOVEL_TEST = 0.5         # fraction of test images holding a held-out pair
SUPERSAMPLE = 4

_TRIANGLE_HEIGHT = math.sqrt(3) / 2  # of an equilateral triangle of side 1
_STREAM = 0x5BA9E5                   # keeps these generators apart from other seeded streams
_SPLIT_CODE = {"train": 0, "test": 1}


def _extent(shape: str, size: float) -> tuple[float, float]:
    """(width, height) of the bounding box."""
    return size, size * _TRIANGLE_HEIGHT if shape == "triangle" else size


def _centroid_offset(shape: str, size: float) -> tuple[float, float]:
    """Centroid minus the bounding box's top-left corner (y down): a triangle pointing up has
    its centroid two thirds of the way down."""
    width, height = _extent(shape, size)
    return width / 2, (2 * height / 3 if shape == "triangle" else height / 2)


@dataclass(frozen=True)
class ShapeObject:
    """One object. `center` is the centroid (x, y) in pixels, y pointing down, pixel (r, c)
    covering [c, c+1) x [r, r+1); `size` is the diameter or side in pixels."""

    color: str
    shape: str
    center: tuple[float, float]
    size: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels."""
        width, height = _extent(self.shape, self.size)
        off_x, off_y = _centroid_offset(self.shape, self.size)
        x0, y0 = self.center[0] - off_x, self.center[1] - off_y
        return x0, y0, x0 + width, y0 + height

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether the points (x, y), in pixels, lie inside the filled shape."""
        x0, y0, x1, y1 = self.bbox
        if self.shape == "square":
            return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        if self.shape == "circle":
            cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, self.size / 2
            return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        # Triangle pointing up: apex at (cx, y0), base from x0 to x1 at y1.
        cx, height = (x0 + x1) / 2, y1 - y0
        return (y >= y0) & (y <= y1) & (np.abs(x - cx) <= (y - y0) / height * (self.size / 2))


@dataclass(frozen=True)
class Scene:
    """What an image shows. With two objects, `relation` relates objects[0] (the subject) to
    objects[1]; with one it is None."""

    objects: tuple[ShapeObject, ...]
    relation: Optional[str]
    canvas: int

    @property
    def caption(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"

    @property
    def held_out(self) -> bool:
        """Whether any object is a held-out (colour, shape) pair."""
        return any(obj.held_out for obj in self.objects)


def relation_between(subject: tuple[float, float], other: tuple[float, float],
                     canvas: float) -> Optional[str]:
    """The relation the dataset's rule gives two centroids, or None when it is ambiguous.

    Meant for judging generated images: feed it centroids measured from pixels.
    """
    dx, dy = (subject[0] - other[0]) / canvas, (subject[1] - other[1]) / canvas
    if abs(dx) >= MIN_AXIS_DISTANCE and abs(dy) < MAX_CROSS_DISTANCE:
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) >= MIN_AXIS_DISTANCE and abs(dx) < MAX_CROSS_DISTANCE:
        return "above" if dy < 0 else "below"
    return None


def _draw_pairs(rng: np.random.Generator, count: int, novel: bool) -> list[tuple[str, str]]:
    pool = ALL_PAIRS if novel else SEEN_PAIRS
    while True:
        pairs = [pool[int(rng.integers(len(pool)))] for _ in range(count)]
        if count == 2 and pairs[0] == pairs[1]:
            continue
        if novel and not any(p in HELD_OUT for p in pairs):
            continue
        return pairs


def sample_scene(split: str, seed: int, index: int, size: int) -> Scene:
    """The scene of item `index`; see the module docstring for the distribution."""
    rng = np.random.default_rng([_STREAM, seed, _SPLIT_CODE[split], index])
    count = 1 if rng.random() < P_SINGLE else 2
    novel = split == "test" and rng.random() < P_NOVEL_TEST
    pairs = _draw_pairs(rng, count, novel)
    sizes = [float(rng.uniform(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE)) for _ in range(count)]

    if count == 1:
        (_, shape), d = pairs[0], sizes[0]
        width, height = _extent(shape, d)
        off_x, off_y = _centroid_offset(shape, d)
        centers = [(rng.uniform(0, 1 - width) + off_x, rng.uniform(0, 1 - height) + off_y)]
        relation = None
    else:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        centers = _place_pair(rng, [p[1] for p in pairs], sizes, relation)

    objects = tuple(
        ShapeObject(color, shape, (float(cx * size), float(cy * size)), float(d * size))
        for (color, shape), d, (cx, cy) in zip(pairs, sizes, centers))
    return Scene(objects, relation, size)


def _place_pair(rng: np.random.Generator, shapes: list[str], sizes: list[float],
                relation: str) -> list[tuple[float, float]]:
    """Centroids (canvas fractions) of subject and object so that `relation` holds."""
    axis = 0 if relation in ("to the left of", "to the right of") else 1
    cross = 1 - axis
    # `first` is the object with the smaller coordinate along the axis.
    first, second = (0, 1) if relation in ("to the left of", "above") else (1, 0)
    extents = [_extent(s, d) for s, d in zip(shapes, sizes)]
    offsets = [_centroid_offset(s, d) for s, d in zip(shapes, sizes)]

    centers = [[0.0, 0.0], [0.0, 0.0]]
    # Along the axis: left margin, extra gap and right margin are a uniform split of the slack.
    slack = 1 - extents[first][axis] - extents[second][axis] - MIN_GAP
    lo, hi = sorted(rng.uniform(0, slack, 2))
    start_first = lo
    start_second = hi + extents[first][axis] + MIN_GAP
    centers[first][axis] = start_first + offsets[first][axis]
    centers[second][axis] = start_second + offsets[second][axis]

    # Across the axis: the subject anywhere on the canvas, the other within CROSS_SPREAD of it.
    def centroid_range(k: int) -> tuple[float, float]:
        return offsets[k][cross], 1 - extents[k][cross] + offsets[k][cross]

    lo0, hi0 = centroid_range(0)
    centers[0][cross] = rng.uniform(lo0, hi0)
    lo1, hi1 = centroid_range(1)
    lo1, hi1 = max(lo1, centers[0][cross] - CROSS_SPREAD), min(hi1, centers[0][cross] + CROSS_SPREAD)
    assert lo1 <= hi1, "object sizes leave no room across the axis"  # cannot happen at 30-45%
    centers[1][cross] = rng.uniform(lo1, hi1)

    distance = centers[second][axis] - centers[first][axis]
    assert distance >= MIN_AXIS_DISTANCE, distance  # implied by the sizes and MIN_GAP
    return [tuple(c) for c in centers]


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 array [size, size, 3]."""
    size = scene.canvas
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        c0, c1 = max(0, math.floor(x0)), min(size, math.ceil(x1))
        r0, r1 = max(0, math.floor(y0)), min(size, math.ceil(y1))
        if c1 <= c0 or r1 <= r0:
            continue
        sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        xs = (np.arange(c0, c1)[:, None] + sub).reshape(-1)
        ys = (np.arange(r0, r1)[:, None] + sub).reshape(-1)
        inside = obj.contains(xs[None, :], ys[:, None])
        coverage = inside.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE).mean(axis=(1, 3))
        value = np.rint(coverage[..., None] * np.array(obj.rgb, dtype=np.float64)).astype(np.uint8)
        region = image[r0:r1, c0:c1]
        np.maximum(region, value, out=region)
    return image


class ShapesDataset(Dataset):
    """Map-style dataset of `(image, caption)`: image float32 [3, size, size] in [0, 1].

    `scene(i)` gives what item i shows (objects with colour, shape, centroid and size in
    pixels, and the relation), for detectors and evaluation.
    """

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0,
                 length: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.size = check_size(size)
        self.seed = check_seed(seed)
        if length is None:
            length = DEFAULT_LENGTH[split]
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> None:
        """None: no files; every item is a function of (split, seed, index)."""
        return None

    def _index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        return index

    def scene(self, index: int) -> Scene:
        return sample_scene(self.split, self.seed, self._index(index), self.size)

    def image(self, index: int) -> np.ndarray:
        """Item `index` as a uint8 array [size, size, 3]."""
        return render(self.scene(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_tensor(render(scene)), scene.caption

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, size={self.size}, seed={self.seed}, "
                f"length={self.length})")


def export_folder(dataset, root: Union[str, os.PathLike], limit: Optional[int] = None) -> int:
    """Write items of any `(image, caption)` dataset as `NNNNNN.png` + `NNNNNN.txt` pairs under
    `root` (the `ImageTextFolder` layout). Returns how many pairs were written."""
    count = len(dataset) if limit is None else min(len(dataset), int(limit))
    if count < 0:
        raise ValueError(f"limit must be non-negative, got {limit!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(count - 1, 0))))
    for i in range(count):
        image, caption = dataset[i]
        array = image.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
        array = array.permute(1, 2, 0).numpy()
        name = f"{i:0{width}d}"
        Image.fromarray(array).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return count
