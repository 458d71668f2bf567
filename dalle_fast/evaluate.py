"""Zero-shot evaluation on the synthetic shapes dataset: a pixel-only detector judges samples.

The detector knows nothing about the model: it reads the image's pixels and finds what the
shapes dataset can draw (`dalle_fast.data.shapes`): filled circles, squares and triangles
pointing up, in six saturated colours on black. Per pixel:

1. brightness `v = max(r, g, b)`; `v < BRIGHT` = 0.5 is background. The dataset draws objects at
   full intensity and anti-aliased or blurred edges are the colour scaled towards black, so the
   boundary falls where the coverage is one half and areas and centroids stay unbiased. An
   object drawn at under half intensity is not there: the dataset has no dim colours;
2. the hue is `rgb / v` (brightness removed, so dim edges keep their colour) and goes to the
   nearest palette colour when within `HUE_RADIUS`, else to "unknown" (orange, white, grey...);
3. a 3x3 majority filter on the labels removes salt-and-pepper noise without moving straight
   edges.

Connected components (8-neighbourhood) of each label smaller than `MIN_AREA` of the canvas are
noise. Each remaining region is classified from scale-free numbers of its mask:

- `top`: the share of its area in the upper half of its bounding box: 0.25 for a triangle
  pointing up (its width grows linearly downwards), 0.5 for a circle or a square;
- `fill`: area / bounding-box area: 1 for a square, pi/4 = 0.785 for a circle, about 0.55 for
  a triangle (its apex and base corners are thinner than half a pixel);
- `corners`: the share of the box's four corner triangles (|x| + |y| > 1.3 in box coordinates
  scaled to [-1, 1]) covered: 1 for a square, 0.17 for a circle; it separates the two with
  a wider margin than `fill` when blur or noise round the corners.

A region that fits no prototype (a blob, a ring, an upside-down triangle, two merged objects)
is shape "unknown", so it cannot pass for the caption's shape. The relation between two regions
is `relation_between` on their centroids, the dataset's own rule.

`evaluate_shapes` samples a model on test-split captions, seen and held-out (colour, shape)
pairs alike, and scores the first-sampled and the reranker's best candidate with the detector.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .data.shapes import COLORS, RELATIONS, SHAPES, ShapesDataset, relation_between

UNKNOWN = "unknown"
BRIGHT = 0.5  # of full intensity: a pixel at least half-covered by an object
HUE_RADIUS = 0.4  # palette hues (brightness removed) are 1 or sqrt(2) apart
MIN_AREA = 0.02  # of the canvas; the smallest object the dataset draws covers 4%

# Shape prototypes: bounds on (top, fill, corners, aspect) with a margin on both sides of the
# values measured on 64 px renders, clean, blurred (sigma up to 1.6 px) or noised (std 0.15).
TRIANGLE_MAX_TOP = 0.38
TRIANGLE_FILL = (0.38, 0.70)
ROUND_TOP = (0.40, 0.60)  # circles and squares are symmetric top to bottom
CIRCLE_FILL = (0.68, 0.90)
SQUARE_MIN_FILL = 0.85
CORNER = 1.3  # |x| + |y| > CORNER in box coordinates [-1, 1]^2: the box's four corners
ROUND_CORNERS = 0.55  # share of those corners covered: below for circles, above for squares
MAX_ASPECT = 1.4  # height / width of circles and squares; triangles are 0.866

REASONS = ("wrong colour", "wrong shape", "missing object", "extra object", "wrong relation")

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64) / 255.0  # [6, 3], max channel 1
_NAMES = tuple(COLORS) + (UNKNOWN,)  # label k >= 1 is _NAMES[k - 1]; 0 is background


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: objects[0] is the subject; `relation` relates it to objects[1]."""

    objects: tuple[tuple[str, str], ...]  # (colour, shape), one or two
    relation: Optional[str]


def parse_caption(caption: str) -> CaptionSpec:
    """`a {color} {shape}` or `a {color} {shape} {relation} a {color} {shape}`, exactly as the
    dataset writes them (extra spaces and case are tolerated); anything else is a ValueError."""
    if not isinstance(caption, str):
        raise TypeError(f"the caption must be a str, got {type(caption).__name__}")
    words = caption.lower().split()

    def phrase(at: int) -> tuple[str, str]:
        if words[at : at + 1] != ["a"] or len(words) < at + 3:
            raise ValueError(f"caption {caption!r}: expected 'a <colour> <shape>' at word {at + 1}")
        color, shape = words[at + 1], words[at + 2]
        if color not in COLORS:
            raise ValueError(f"caption {caption!r}: unknown colour {color!r} (known: {', '.join(COLORS)})")
        if shape not in SHAPES:
            raise ValueError(f"caption {caption!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        return color, shape

    first = phrase(0)
    if len(words) == 3:
        return CaptionSpec((first,), None)
    for relation in RELATIONS:
        span = relation.split()
        if words[3 : 3 + len(span)] == span:
            at = 3 + len(span)
            second = phrase(at)
            if len(words) > at + 3:
                raise ValueError(f"caption {caption!r}: unexpected words after the second object")
            return CaptionSpec((first, second), relation)
    raise ValueError(f"caption {caption!r}: expected the end or a relation ({', '.join(RELATIONS)}) "
                     "after the first object")


# ---------------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    """One significant region. Pixels (r, c) cover [c, c+1) x [r, r+1), y pointing down, as in
    `ShapeObject`, so `centroid` is comparable with the dataset's object centres."""

    color: str  # a key of COLORS or "unknown"
    shape: str  # one of SHAPES or "unknown"
    centroid: tuple[float, float]  # (x, y) in pixels
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), pixel edges, x1 and y1 exclusive
    top: float  # share of the area in the upper half of the box
    fill: float  # area / box area
    corners: float  # share of the box's corner triangles covered


def _as_array(image: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """[3, H, W] float in [0, 1] (tensor or array) -> float64 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(array.shape)}")
    return np.clip(array, 0.0, 1.0).transpose(1, 2, 0)


def _shifts(array: np.ndarray, fill) -> list[np.ndarray]:
    """The 9 views of `array` [H, W, ...] shifted by -1..1 in y and x, edges padded with `fill`."""
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad, constant_values=fill)
    h, w = array.shape[:2]
    return [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]


def classify_pixels(image: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Per-pixel labels [H, W] int: 0 background, k = 1..6 the colours of COLORS in order, 7 a
    bright pixel of no palette hue; majority-filtered over 3x3 neighbourhoods."""
    rgb = _as_array(image)
    value = rgb.max(axis=2)
    hue = rgb / np.maximum(value, 1e-6)[..., None]
    dist = np.linalg.norm(hue[:, :, None, :] - _PALETTE[None, None], axis=3)  # [H, W, 6]
    nearest = dist.argmin(axis=2)
    labels = np.where(dist.min(axis=2) <= HUE_RADIUS, nearest + 1, len(_NAMES))
    labels = np.where(value >= BRIGHT, labels, 0)
    # Majority over the 3x3 window; a pixel keeps its label unless another one wins outright,
    # so straight edges (3 of 9 vs 6 of 9 either side) do not move.
    onehot = np.eye(len(_NAMES) + 1, dtype=np.int16)[labels]  # [H, W, 8]
    votes = sum(_shifts(onehot, 0))
    own = np.take_along_axis(votes, labels[..., None], axis=2)[..., 0]
    best = votes.argmax(axis=2)
    return np.where(votes.max(axis=2) > own, best, labels)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """Component ids [H, W] (0 for background, else the smallest flat index + 1 in the component)
    of the 8-connected regions of equal nonzero label."""
    h, w = labels.shape
    big = h * w + 1
    ids = np.where(labels > 0, np.arange(1, h * w + 1).reshape(h, w), big)
    label_views = _shifts(labels, -1)
    same = [view == labels for view in label_views]
    # Minimum-id propagation with pointer jumping: each round takes the smallest id among the
    # same-label neighbours, then follows ids to their current ids, so even long snaking
    # regions settle in a few vectorised rounds instead of one per pixel of their length.
    while True:
        neighbour = np.minimum.reduce([np.where(s, v, big) for s, v in zip(same, _shifts(ids, big))])
        new = np.minimum(ids, neighbour)
        flat = np.concatenate([[big], new.reshape(-1), [big]])
        for _ in range(4):
            jumped = np.where(new < big, flat[np.minimum(new, big)], big)
            new = np.minimum(new, jumped)
            flat[1:-1] = new.reshape(-1)
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(ids < big, ids, 0)


def _features(mask: np.ndarray) -> tuple[float, float, float]:
    """(top, fill, corners) of a region's mask [h, w] cropped to its bounding box."""
    h, w = mask.shape
    area = float(mask.sum())
    rows = mask.sum(axis=1).astype(np.float64)
    middle = h // 2
    # With an odd height the middle row straddles the halves: half of it is upper.
    upper = rows[:middle].sum() + (0.5 * rows[middle] if h % 2 else 0.0)
    # Pixel centres in box coordinates scaled to [-1, 1]. The four corner triangles
    # |x| + |y| > CORNER are full in a square and 17% covered by the inscribed circle. Smaller
    # triangles would be mostly the part that blur and noise round off a square's corners,
    # larger ones would reach further into the circle.
    y = (np.arange(h) + 0.5) / h * 2 - 1
    x = (np.arange(w) + 0.5) / w * 2 - 1
    corner = np.abs(x)[None, :] + np.abs(y)[:, None] > CORNER
    corners = float(mask[corner].mean()) if corner.any() else 0.0
    return upper / area, area / (h * w), corners


def _shape(top: float, fill: float, corners: float, height: int, width: int) -> str:
    """The prototype a region's features fit, or "unknown"."""
    if top <= TRIANGLE_MAX_TOP:
        return "triangle" if TRIANGLE_FILL[0] <= fill <= TRIANGLE_FILL[1] else UNKNOWN
    aspect = height / width
    if not (ROUND_TOP[0] <= top <= ROUND_TOP[1] and 1 / MAX_ASPECT <= aspect <= MAX_ASPECT):
        return UNKNOWN
    if corners < ROUND_CORNERS:
        return "circle" if CIRCLE_FILL[0] <= fill < CIRCLE_FILL[1] else UNKNOWN
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return UNKNOWN


def detect(image: Union[torch.Tensor, np.ndarray], min_area: float = MIN_AREA) -> list[Detection]:
    """The significant coloured regions of `image` [3, H, W] float in [0, 1], largest first.

    `min_area` is a fraction of the canvas; smaller regions are noise and ignored.
    """
    labels = classify_pixels(image)
    ids = connected_components(labels)
    h, w = labels.shape
    counts = np.bincount(ids.reshape(-1), minlength=h * w + 1)
    counts[0] = 0
    detections = []
    for cid in np.flatnonzero(counts >= max(1.0, min_area * h * w)):
        rr, cc = np.nonzero(ids == cid)
        y0, y1, x0, x1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        mask = ids[y0:y1, x0:x1] == cid
        top, fill, corners = _features(mask)
        label = int(labels[rr[0], cc[0]])
        detections.append(Detection(
            color=_NAMES[label - 1], shape=_shape(top, fill, corners, y1 - y0, x1 - x0),
            centroid=(float(cc.mean() + 0.5), float(rr.mean() + 0.5)), area=int(rr.size),
            bbox=(int(x0), int(y0), int(x1), int(y1)), top=float(top), fill=float(fill),
            corners=float(corners)))
    detections.sort(key=lambda d: -d.area)
    return detections


# ---------------------------------------------------------------------------------------------
# Judging an image against a caption
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    """Whether an image shows its caption and, if not, why (a subset of REASONS, in that order)."""

    correct: bool
    reasons: tuple[str, ...]
    detections: tuple[Detection, ...]
    spec: CaptionSpec


def judge_detections(detections: Sequence[Detection], caption: Union[str, CaptionSpec],
                     canvas: int) -> Judgement:
    """Judge already detected regions (of a `canvas` x `canvas` image) against a caption.

    Correct: the regions are exactly the caption's objects (colour and shape), nothing more,
    and for two objects the relation holds between them by `relation_between`.
    """
    spec = caption if isinstance(caption, CaptionSpec) else parse_caption(caption)
    found = [(d.color, d.shape) for d in detections]
    if sorted(found) == sorted(spec.objects):
        if spec.relation is None:
            return Judgement(True, (), tuple(detections), spec)
        # Identical objects ("a red circle above a red circle") can be read either way round.
        for subject, other in itertools.permutations(detections, 2):
            if (subject.color, subject.shape) == spec.objects[0] and \
                    (other.color, other.shape) == spec.objects[1] and \
                    relation_between(subject.centroid, other.centroid, canvas) == spec.relation:
                return Judgement(True, (), tuple(detections), spec)
        return Judgement(False, ("wrong relation",), tuple(detections), spec)

    # Explain the mismatch: pair each wanted object with a leftover region, exact matches
    # first, then same colour (so the shape is wrong), then same shape, then anything.
    wanted, left = list(spec.objects), list(found)
    reasons: set[str] = set()
    for same in (lambda a, b: a == b, lambda a, b: a[0] == b[0], lambda a, b: a[1] == b[1],
                 lambda a, b: True):
        for obj in list(wanted):
            match = next((f for f in left if same(obj, f)), None)
            if match is not None:
                wanted.remove(obj)
                left.remove(match)
                if match[0] != obj[0]:
                    reasons.add("wrong colour")
                if match[1] != obj[1]:
                    reasons.add("wrong shape")
    if wanted:
        reasons.add("missing object")
    if left:
        reasons.add("extra object")
    return Judgement(False, tuple(r for r in REASONS if r in reasons), tuple(detections), spec)


def judge(image: Union[torch.Tensor, np.ndarray], caption: Union[str, CaptionSpec]) -> Judgement:
    """Judge `image` [3, H, W] float in [0, 1] against `caption` (see `judge_detections`)."""
    spec = caption if isinstance(caption, CaptionSpec) else parse_caption(caption)
    return judge_detections(detect(image), spec, canvas=image.shape[-1])


def score_image(image: Union[torch.Tensor, np.ndarray], caption: Union[str, CaptionSpec]) -> bool:
    """Whether `image` [3, H, W] shows exactly what `caption` says."""
    return judge(image, caption).correct


# ---------------------------------------------------------------------------------------------
# Evaluating a model
# ---------------------------------------------------------------------------------------------

KINDS = ("seen", "held_out")


def select_captions(size: int, num_captions: int, seed: int = 0) -> dict[str, list[tuple[int, str]]]:
    """`num_captions` test-split items of each kind, as (index, caption): "seen" items show only
    (colour, shape) pairs of the training images, "held_out" items at least one held-out pair.
    A seeded draw without replacement from the test split (a caption may come twice: single
    objects repeat, as in the test distribution)."""
    if isinstance(num_captions, bool) or not isinstance(num_captions, int) or num_captions < 1:
        raise ValueError(f"num_captions must be a positive int, got {num_captions!r}")
    dataset = ShapesDataset("test", size=size)
    picked: dict[str, list[tuple[int, str]]] = {kind: [] for kind in KINDS}
    for index in np.random.default_rng(seed).permutation(len(dataset)):
        scene = dataset.scene(int(index))
        chosen = picked["held_out" if scene.held_out else "seen"]
        if len(chosen) < num_captions:
            chosen.append((int(index), scene.caption))
        if all(len(v) == num_captions for v in picked.values()):
            return picked
    raise ValueError(f"the test split has only {len(picked['seen'])} seen and {len(picked['held_out'])} "
                     f"held-out items, fewer than {num_captions} of each")


def _pooled(accuracy: dict[str, float], picked: dict[str, list[tuple[int, str]]]) -> float:
    """The accuracy over all picked captions, from the per-kind ones."""
    return sum(accuracy[kind] * len(picked[kind]) for kind in KINDS) / sum(len(picked[kind]) for kind in KINDS)


def detector_accuracy(size: int, picked: dict[str, list[tuple[int, str]]]) -> dict[str, float]:
    """The share of the picked test images, the dataset's own renders at `size` px, that the
    detector reads as their caption: its own error, counted in every other accuracy. 1.0 on the
    shipped sizes (48 px and up); its bounds were measured on 64 px renders and misread a few
    percent of 32 px ones."""
    dataset = ShapesDataset("test", size=size)
    accuracy = {kind: sum(score_image(dataset[index][0], caption) for index, caption in picked[kind])
                / len(picked[kind]) for kind in KINDS}
    accuracy["all"] = _pooled(accuracy, picked)
    return accuracy


@torch.no_grad()
def reconstruction_accuracy(dvae, picked: dict[str, list[tuple[int, str]]], batch_size: int = 64) -> dict[str, float]:
    """The share of the picked test images whose dVAE reconstruction, decode(encode(image)), the
    detector still reads as their caption: the ceiling of any prior sampling through this dVAE."""
    size = dvae.config.image_size
    dataset = ShapesDataset("test", size=size)
    device = next(dvae.parameters()).device
    accuracy = {}
    for kind in KINDS:
        items = picked[kind]
        correct = 0
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = torch.stack([dataset[index][0] for index, _ in chunk]).to(device)
            recon = dvae.decode(dvae.encode(images)).float().cpu()
            correct += sum(score_image(r, caption) for r, (_, caption) in zip(recon, chunk))
        accuracy[kind] = correct / len(items)
    accuracy["all"] = _pooled(accuracy, picked)
    return accuracy


def caption_text(spec: CaptionSpec) -> str:
    """The dataset's caption for `spec` (parse_caption's inverse)."""
    phrases = [f"a {colour} {shape}" for colour, shape in spec.objects]
    return phrases[0] if spec.relation is None else f"{phrases[0]} {spec.relation} {phrases[1]}"


def one_attribute_away(spec: CaptionSpec) -> list[str]:
    """The captions that differ from `spec` in one object's colour or shape (never two objects
    of the same colour and shape, which the dataset does not draw)."""
    out = []
    for k, (colour, shape) in enumerate(spec.objects):
        others = [(c, shape) for c in COLORS if c != colour] + [(colour, g) for g in SHAPES if g != shape]
        for obj in others:
            objects = spec.objects[:k] + (obj,) + spec.objects[k + 1:]
            if len(set(objects)) == len(objects):
                out.append(caption_text(CaptionSpec(objects, spec.relation)))
    return out


@torch.no_grad()
def reranker_accuracy(models, picked: dict[str, list[tuple[int, str]]]) -> dict[str, float]:
    """The share of the picked test images (the dataset's own renders) for which the reranker
    scores the true caption above every caption one attribute away (`one_attribute_away`): for
    held-out pairs, whether it reads a colour and a shape it never saw together. Rendered at the
    dVAE's resolution, as the candidates are."""
    reranker, tokenizer = models.reranker, models.tokenizer
    dataset = ShapesDataset("test", size=models.dvae.config.image_size)
    device = next(reranker.parameters()).device
    from .pipeline import encode_prompt

    accuracy = {}
    for kind in KINDS:
        correct = 0
        for index, caption in picked[kind]:
            texts = [caption] + one_attribute_away(parse_caption(caption))
            ids = torch.cat([encode_prompt(tokenizer, t, reranker.config.text_len) for t in texts]).to(device)
            image = dataset[index][0][None].to(device)
            scores = reranker.score(ids, image.expand(len(texts), -1, -1, -1))
            correct += bool(scores[0] > scores[1:].max())
        accuracy[kind] = correct / len(picked[kind])
    accuracy["all"] = _pooled(accuracy, picked)
    return accuracy


def _verdict(judgement: Judgement) -> dict:
    return {"correct": judgement.correct, "reasons": list(judgement.reasons),
            "found": [f"{d.color} {d.shape}" for d in judgement.detections]}


def evaluate_shapes(models, *, num_captions: int = 50, candidates: int = 8, seed: int = 0,
                    out_png: Optional[Union[str, Path]] = None, out_json: Optional[Union[str, Path]] = None,
                    sheet_rows: int = 4, sampling=None, progress=None) -> dict:
    """Zero-shot accuracy of `models` (a `pipeline.Models`) on the shapes test split.

    For each of `num_captions` seen and `num_captions` held-out captions (`select_captions`),
    `candidates` images are sampled as one batch and judged by the detector:
    - "no_rerank": the first candidate sampled (what a model without a reranker shows);
    - "reranked": the reranker's best candidate (None when the folder has no reranker);
    - "mean_candidate": the share of all candidates that are correct (no_rerank's expectation,
      with less variance; reranked minus it is what reranking adds);
    - "any_candidate": the share of captions with at least one correct candidate (what a perfect
      reranker would reach: the gap to "reranked" is the reranker's, the rest the generator's);
    - "reconstruction": the share of the captions' own test images that survive the dVAE
      (`reconstruction_accuracy`), the ceiling of the other three;
    - "reranker_on_renders": the share of those test images whose true caption the reranker
      prefers to every caption one attribute away (`reranker_accuracy`; None without a reranker).
    The report's "detector_on_renders" is the detector's own accuracy on those test images
    (`detector_accuracy`); below 1.0 (small images) a warning says that every figure includes it.
    Writes the result as JSON to `out_json` and a sample sheet to `out_png` (`sheet_rows` captions
    of each kind, candidates best first, each with a green / red bar for the detector's verdict).
    `progress(done, total)` is called after each caption. Returns the JSON's dict.
    """
    from .pipeline import generate
    from .sampler import SamplingConfig

    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be a positive int, got {candidates!r}")
    size = models.dvae.config.image_size
    picked = select_captions(size, num_captions, seed)
    has_reranker = models.reranker is not None
    detector = detector_accuracy(size, picked)
    if detector["all"] < 1.0:
        warnings.warn(f"the shapes detector misreads {1 - detector['all']:.1%} of the clean test renders at "
                      f"{size} px; every accuracy below includes those errors", stacklevel=2)
    ceiling = reconstruction_accuracy(models.dvae, picked)
    reading = reranker_accuracy(models, picked) if has_reranker else None
    start = time.perf_counter()
    sampling_seconds = 0.0
    items, rows = [], []
    total = sum(len(v) for v in picked.values())
    for kind in KINDS:
        for index, caption in picked[kind]:
            # Seeded by the item, so a caption's samples do not change with num_captions.
            gen_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            result = generate(models, caption, num=candidates, keep=candidates, seed=gen_seed,
                              sampling=sampling)
            sampling_seconds += result.seconds
            spec = parse_caption(caption)
            judgements = [judge(image, spec) for image in result.images]  # best first
            first = int((result.order == 0).nonzero()[0, 0])
            items.append({
                "index": index, "caption": caption, "kind": kind, "seed": gen_seed,
                "no_rerank": _verdict(judgements[first]),
                "reranked": _verdict(judgements[0]) if has_reranker else None,
                "candidates_correct": sum(j.correct for j in judgements),
            })
            if sum(r[0] == kind for r in rows) < sheet_rows:
                rows.append((kind, caption, result.images, [j.correct for j in judgements]))
            if progress is not None:
                progress(len(items), total)
    elapsed = time.perf_counter() - start

    def histogram(mine: list[dict], mode: str) -> dict[str, int]:
        found = Counter(reason for it in mine for reason in it[mode]["reasons"])
        return {reason: found[reason] for reason in REASONS if found[reason]}

    accuracy, counts, failures = {}, {}, {}
    for kind in KINDS + ("all",):
        mine = [it for it in items if kind in ("all", it["kind"])]
        first = sum(it["no_rerank"]["correct"] for it in mine)
        best = sum(it["reranked"]["correct"] for it in mine) if has_reranker else None
        correct = sum(it["candidates_correct"] for it in mine)
        covered = sum(it["candidates_correct"] > 0 for it in mine)
        counts[kind] = {"captions": len(mine), "images": len(mine) * candidates, "no_rerank_correct": first,
                        "reranked_correct": best, "candidates_correct": correct, "captions_with_a_correct_candidate": covered}
        accuracy[kind] = {"no_rerank": first / len(mine),
                          "reranked": None if best is None else best / len(mine),
                          "mean_candidate": correct / (len(mine) * candidates),
                          "any_candidate": covered / len(mine),
                          "reconstruction": ceiling[kind],
                          "reranker_on_renders": None if reading is None else reading[kind]}
        failures[kind] = {"no_rerank": histogram(mine, "no_rerank"),
                          "reranked": histogram(mine, "reranked") if has_reranker else None}
    report = {
        "model": str(models.folder), "device": str(models.device), "image_size": size,
        "reranker": has_reranker, "captions_per_kind": num_captions, "candidates": candidates, "seed": seed,
        "sampling": dataclasses.asdict(sampling if sampling is not None else SamplingConfig()),
        "accuracy": accuracy, "counts": counts, "failures": failures, "detector_on_renders": detector,
        "seconds": {"total": elapsed, "sampling": sampling_seconds,
                    "per_image": sampling_seconds / (total * candidates)},
        "items": items,
    }
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if out_png is not None:
        sample_sheet(rows, out_png, reranked=has_reranker)
    return report


def sample_sheet(rows: Sequence[tuple[str, str, torch.Tensor, Sequence[bool]]], path: Union[str, Path],
                 *, reranked: bool = True, scale: int = 2) -> Path:
    """A PNG of one row per caption: (kind, caption, images [N, 3, H, W] in [0, 1], verdicts [N]);
    the caption above its images, a green (correct) or red bar under each image."""
    from PIL import Image, ImageDraw, ImageFont

    from .images import to_pil

    if not rows:
        raise ValueError("the sample sheet needs at least one row")
    pad, text_h, bar = 4, 14, 3
    _, _, h, w = rows[0][2].shape
    tile_w, tile_h = w * scale, h * scale
    ncol = max(len(r[2]) for r in rows)
    order = "best first (reranked)" if reranked else "in sampling order"
    width = max(pad + ncol * (tile_w + pad), 360)
    row_h = text_h + tile_h + bar + 2 * pad
    sheet = Image.new("RGB", (width, text_h + pad + len(rows) * row_h), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad, 2), f"candidates {order}; bar: detector verdict", fill=(200, 200, 200), font=font)
    for r, (kind, caption, images, verdicts) in enumerate(rows):
        y = text_h + pad + r * row_h
        draw.text((pad, y), f"[{kind.replace('_', '-')}] {caption}", fill=(255, 255, 255), font=font)
        for c, (image, ok) in enumerate(zip(images, verdicts)):
            x = pad + c * (tile_w + pad)
            sheet.paste(to_pil(image).resize((tile_w, tile_h), Image.NEAREST), (x, y + text_h))
            draw.rectangle([x, y + text_h + tile_h + 1, x + tile_w - 1, y + text_h + tile_h + bar],
                           fill=(0, 200, 0) if ok else (220, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def format_report(report: dict) -> str:
    """The accuracy table, failure reasons and timing of `evaluate_shapes`' report, as text."""
    def cell(value):
        return "     -" if value is None else f"{value:6.3f}"

    lines = [f"{'':16}{'no rerank':>10}{'reranked':>10}{'mean cand':>11}{'any cand':>10}{'dVAE recon':>12}"
             f"{'rerank renders':>16}"]
    for kind in KINDS + ("all",):
        acc, n = report["accuracy"][kind], report["counts"][kind]["captions"]
        label = f"{kind.replace('_', '-')} ({n})"
        lines.append(f"{label:16}{cell(acc['no_rerank']):>10}{cell(acc['reranked']):>10}"
                     f"{cell(acc['mean_candidate']):>11}{cell(acc.get('any_candidate')):>10}"
                     f"{cell(acc.get('reconstruction')):>12}{cell(acc.get('reranker_on_renders')):>16}")
    for mode in ("no_rerank", "reranked"):
        fails = report["failures"]["all"][mode]
        if fails is not None:
            text = ", ".join(f"{reason} {count}" for reason, count in fails.items()) or "none"
            lines.append(f"failures ({mode.replace('_', ' ')}): {text}")
    detector = report.get("detector_on_renders")
    if detector is not None and detector["all"] < 1.0:
        lines.append(f"the detector misreads {1 - detector['all']:.1%} of the clean test renders at "
                     f"{report['image_size']} px: every figure above includes those errors")
    sec = report["seconds"]
    lines.append(f"{sec['total']:.1f} s in all, {sec['per_image'] * 1e3:.1f} ms per image sampled on "
                 f"{report['device']} ({report['candidates']} candidates per caption)")
    return "\n".join(lines)
