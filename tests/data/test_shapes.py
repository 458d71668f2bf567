"""The synthetic shapes dataset: determinism, grammar, held-out pairs, geometry, exact pixels."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast.data.shapes import (COLORS, HELD_OUT, RELATIONS, SHAPES, Scene, ShapesDataset,
                                    relation_between, render)

_OBJ = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
CAPTION = re.compile(rf"^{_OBJ}(?: ({'|'.join(RELATIONS)}) {_OBJ})?$")


def test_constants_are_the_issue_s():
    assert COLORS == {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
                      "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
    assert SHAPES == ("circle", "square", "triangle")
    assert RELATIONS == ("to the left of", "to the right of", "above", "below")
    assert set(HELD_OUT) == {("red", "triangle"), ("green", "circle"), ("blue", "square"),
                             ("yellow", "triangle"), ("magenta", "circle"), ("cyan", "square")}


def test_same_index_same_item():
    a, b = ShapesDataset("train", 64, seed=3), ShapesDataset("train", 64, seed=3)
    for i in (0, 17, 999):
        (xa, ca), (xb, cb) = a[i], b[i]
        assert torch.equal(xa, xb) and ca == cb
        assert a.scene(i) == b.scene(i)
    # Access order does not matter (no hidden state).
    assert torch.equal(a[5][0], ShapesDataset("train", 64, seed=3)[5][0])
    other_seed = ShapesDataset("train", 64, seed=4)
    test_split = ShapesDataset("test", 64, seed=3)
    assert any(a.scene(i) != other_seed.scene(i) for i in range(10))
    assert any(a.scene(i).caption != test_split.scene(i).caption for i in range(10))


def test_scene_is_independent_of_resolution():
    small, large = ShapesDataset("test", 32, seed=1), ShapesDataset("test", 256, seed=1)
    for i in range(20):
        s, l = small.scene(i), large.scene(i)
        assert s.caption == l.caption
        for a, b in zip(s.objects, l.objects):
            assert a.center[0] * 8 == pytest.approx(b.center[0])
            assert a.size * 8 == pytest.approx(b.size)


def test_dtype_shape_range():
    ds = ShapesDataset("train", 48, length=20)
    for i in range(20):
        image, caption = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 48) and image.is_contiguous()
        assert image.min() >= 0 and image.max() <= 1
        assert image.max() == 1  # something is drawn, at full intensity inside
        assert caption == ds.scene(i).caption
    assert len(ds) == 20 and torch.equal(ds[-1][0], ds[19][0])
    with pytest.raises(IndexError):
        ds[20]


def test_captions_follow_the_grammar():
    for split in ("train", "test"):
        ds = ShapesDataset(split, 64)
        captions = [ds.scene(i).caption for i in range(1000)]
        assert all(CAPTION.match(c) for c in captions), [c for c in captions if not CAPTION.match(c)]
        relations = {r for r in RELATIONS for c in captions if f" {r} " in c}
        assert relations == set(RELATIONS)
        singles = sum(" a " not in c for c in captions)
        assert 0.2 < singles / len(captions) < 0.5  # both kinds present


def test_no_held_out_pair_in_train():
    for seed in (0, 1):
        ds = ShapesDataset("train", 64, seed=seed)
        pairs = {(o.color, o.shape) for i in range(3000) for o in ds.scene(i).objects}
        assert not pairs & set(HELD_OUT)
        assert len(pairs) == 12  # every seen pair occurs


def test_test_split_mixes_held_out_and_seen():
    ds = ShapesDataset("test", 64)
    scenes = [ds.scene(i) for i in range(1000)]
    novel = [s for s in scenes if s.held_out]
    assert 0.4 < len(novel) / len(scenes) < 0.6
    assert {(o.color, o.shape) for s in novel for o in s.objects} >= set(HELD_OUT)
    assert any(s.relation for s in novel) and any(s.relation is None for s in novel)
    seen = [s for s in scenes if not s.held_out]
    assert all((o.color, o.shape) not in HELD_OUT for s in seen for o in s.objects)


def _check_geometry(scene: Scene) -> None:
    size = scene.canvas
    for obj in scene.objects:
        assert 0.30 * size <= obj.size <= 0.45 * size
        x0, y0, x1, y1 = obj.bbox
        assert -1e-9 <= x0 < x1 <= size + 1e-9 and -1e-9 <= y0 < y1 <= size + 1e-9
    assert CAPTION.match(scene.caption)
    if scene.relation is None:
        assert len(scene.objects) == 1
        return
    a, b = scene.objects
    assert (a.color, a.shape) != (b.color, b.shape)
    dx, dy = (a.center[0] - b.center[0]) / size, (a.center[1] - b.center[1]) / size
    along, across = (dx, dy) if scene.relation in ("to the left of", "to the right of") else (dy, dx)
    assert abs(along) >= 0.25 and abs(across) < 0.25
    assert (along < 0) == (scene.relation in ("to the left of", "above"))
    assert relation_between(a.center, b.center, size) == scene.relation
    # Bounding boxes are apart, so the filled shapes cannot touch.
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_relation_geometry_and_sizes():
    for split in ("train", "test"):
        ds = ShapesDataset(split, 64, seed=7, length=2000)
        for i in range(2000):
            _check_geometry(ds.scene(i))


@given(split=st.sampled_from(["train", "test"]), seed=st.integers(0, 2**63 - 1),
       index=st.integers(0, 10**9), size=st.integers(8, 512))
def test_geometry_for_any_item(split, seed, index, size):
    scene = ShapesDataset(split, size, seed=seed, length=index + 1).scene(index)
    _check_geometry(scene)
    if split == "train":
        assert not scene.held_out


def test_pixels_exact_colors_and_no_overlap():
    ds = ShapesDataset("test", 64, seed=2)
    for i in range(150):
        scene = ds.scene(i)
        image = ds.image(i)
        assert torch.equal(ds[i][0], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
        layers = [render(replace(scene, objects=(obj,), relation=None)) for obj in scene.objects]
        masks = [layer.any(axis=2) for layer in layers]
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any(), f"item {i} overlaps"
        assert np.array_equal(image, np.maximum.reduce(layers))
        assert np.array_equal(image.any(axis=2), np.logical_or.reduce(masks))
        for obj, layer, mask in zip(scene.objects, layers, masks):
            rgb = np.array(obj.rgb)
            # Edge pixels are the colour scaled by coverage; channels off in the colour stay 0.
            assert not layer[:, :, rgb == 0].any()
            # Interior: the centroid's pixel (and its neighbours) carry the exact colour.
            cx, cy = int(obj.center[0]), int(obj.center[1])
            assert np.array_equal(image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3),
                                  np.tile(rgb, (9, 1)))
            full = (layer == rgb).all(axis=2)
            assert full.sum() > 0.5 * mask.sum()
            # The centroid measured from pixels matches the scene's (what a detector will do).
            weight = layer.max(axis=2).astype(np.float64)
            ys, xs = np.mgrid[0:64, 0:64] + 0.5
            measured = ((weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum())
            assert measured == pytest.approx(obj.center, abs=0.3)


def test_triangle_points_up():
    ds = ShapesDataset("train", 64, seed=0)
    i = next(i for i in range(100) if ds.scene(i).objects[0].shape == "triangle"
             and ds.scene(i).relation is None)
    obj = ds.scene(i).objects[0]
    mask = ds.image(i).any(axis=2)
    widths = mask.sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[0]] < widths[rows[-1]] / 3  # narrow on top, wide at the base
    assert rows[-1] + 1 == pytest.approx(obj.bbox[3], abs=1)


@pytest.mark.parametrize("kwargs", [
    dict(split="val"), dict(size=4), dict(size=7), dict(size=32.0), dict(seed=-1),
    dict(length=0), dict(length=2.5)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ShapesDataset(**kwargs)
