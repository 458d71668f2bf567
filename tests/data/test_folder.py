"""ImageTextFolder: export round trip, caption choice, skipping what cannot be read."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dalle_fast.data import ImageTextFolder, RandomResizedCrop, ShapesDataset, export_folder


def _write(path, color=(10, 20, 30), size=(16, 16), fmt=None, mode="RGB"):
    Image.new(mode, size, color).save(path, format=fmt)


def test_export_round_trip(tmp_path):
    shapes = ShapesDataset("test", 32, seed=5, length=12)
    assert export_folder(shapes, tmp_path, limit=10) == 10
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["000000.png", "000000.txt"]
    assert len(list(tmp_path.glob("*.png"))) == len(list(tmp_path.glob("*.txt"))) == 10
    folder = ImageTextFolder(tmp_path, size=32)
    assert len(folder) == 10 and folder.missing_captions == 0
    for i in range(10):
        image, caption = folder[i]
        expected_image, expected_caption = shapes[i]
        assert caption == expected_caption
        assert torch.equal(image, expected_image)  # lossless PNG, no resampling at equal size


def test_export_limit_and_whole_dataset(tmp_path):
    shapes = ShapesDataset("train", 16, length=3)
    assert export_folder(shapes, tmp_path / "a") == 3
    assert export_folder(shapes, tmp_path / "b", limit=100) == 3
    assert export_folder(shapes, tmp_path / "c", limit=0) == 0


def test_caption_choice_is_random_and_reproducible(tmp_path):
    for name in ("a", "b"):
        _write(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("one\n\n  two  \nthree\n")
    folder = ImageTextFolder(tmp_path, size=8, seed=1)
    draws = []
    for epoch in range(12):
        folder.set_epoch(epoch)
        draws.append(folder[0][1])
        assert folder[0][1] == draws[-1]  # same (seed, epoch, index): same caption
    assert set(draws) == {"one", "two", "three"}
    again = ImageTextFolder(tmp_path, size=8, seed=1)
    again.set_epoch(3)
    assert again[0][1] == draws[3]
    every = ImageTextFolder(tmp_path, size=8, seed=1, all_captions=True)
    assert every[0][1] == "one\ntwo\nthree"


def test_formats_modes_and_crops(tmp_path):
    _write(tmp_path / "rgb.jpg", size=(40, 20))
    _write(tmp_path / "gray.PNG", color=128, mode="L")
    _write(tmp_path / "alpha.webp", color=(0, 0, 255, 255), mode="RGBA")
    _write(tmp_path / "pal.png", mode="P", color=3)
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "deep.jpeg")
    for stem in ("rgb", "gray", "alpha", "pal", "sub/deep"):
        (tmp_path / f"{stem}.txt").write_text(f"{stem}\n")
    (tmp_path / "notes.md").write_text("ignored")
    for crop in (None, RandomResizedCrop()):
        folder = ImageTextFolder(tmp_path, size=24, crop=crop)
        assert len(folder) == 5
        captions = set()
        for i in range(len(folder)):
            image, caption = folder[i]
            assert image.shape == (3, 24, 24) and image.dtype == torch.float32
            assert 0 <= image.min() and image.max() <= 1
            captions.add(caption)
        assert captions == {"rgb", "gray", "alpha", "pal", "sub/deep"}
        assert folder.skipped == 0


def test_corrupt_and_uncaptioned_are_skipped_and_counted(tmp_path, caplog):
    for i in range(3):
        _write(tmp_path / f"good{i}.png", color=(i * 50, 0, 0))
        (tmp_path / f"good{i}.txt").write_text(f"good {i}\n")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "bad.txt").write_text("bad\n")
    _write(tmp_path / "truncated.jpg", size=(64, 64))
    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "truncated.txt").write_text("truncated\n")
    _write(tmp_path / "empty_caption.png")
    (tmp_path / "empty_caption.txt").write_text("\n  \n")
    _write(tmp_path / "nocaption.png")

    with caplog.at_level(logging.WARNING, logger="dalle_fast.data"):
        folder = ImageTextFolder(tmp_path, size=8)
        assert folder.missing_captions == 1 and len(folder) == 6
        for _ in range(2):
            captions = [folder[i][1] for i in range(len(folder))]
            assert set(captions) == {"good 0", "good 1", "good 2"}
        assert folder.skipped == 3
    for name in ("bad.png", "truncated.jpg", "empty_caption", "nocaption.png"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    # The result of an access does not depend on what earlier accesses found.
    fresh = ImageTextFolder(tmp_path, size=8)
    for i in reversed(range(len(fresh))):
        image, caption = fresh[i]
        assert caption == captions[i] and torch.equal(image, folder[i][0])


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="could be read"):  # what the command line reports as an error
        ImageTextFolder(tmp_path, size=8)[0]


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageTextFolder(tmp_path / "missing", size=8)
    _write(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match="no image-caption pairs"):
        ImageTextFolder(tmp_path, size=8)
    (tmp_path / "lonely.txt").write_text("hi")
    with pytest.raises(ValueError, match="size"):
        ImageTextFolder(tmp_path, size=4)
    with pytest.raises(TypeError):
        ImageTextFolder(tmp_path, size=8, crop=(0.5, 1.0))
    folder = ImageTextFolder(tmp_path, size=8)
    with pytest.raises(IndexError):
        folder[1]


def test_dataloader_batches(tmp_path):
    export_folder(ShapesDataset("train", 16, length=6), tmp_path)
    loader = DataLoader(ImageTextFolder(tmp_path, size=16), batch_size=4)
    images, captions = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and len(captions) == 4
    assert np.isclose(float(images.max()), 1.0)


def test_captions_with_a_bom_or_an_upper_case_extension(tmp_path):
    _write(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red circle\n".encode("utf-8"))  # Notepad's UTF-8
    _write(tmp_path / "B.JPG", fmt="JPEG")
    (tmp_path / "B.TXT").write_text("a blue square")
    data = ImageTextFolder(tmp_path, size=8)
    assert data.missing_captions == 0
    assert sorted(data[i][1] for i in range(len(data))) == ["a blue square", "a red circle"]


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path, caplog):
    texts = {"a": "un café rouge".encode("latin-1"), "b": "a red circle\n".encode("utf-16"),
             "c": "a blue square".encode("utf-16-le"), "d": "un café bleu".encode()}
    for name, text in texts.items():
        _write(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(text)
    data = ImageTextFolder(tmp_path, size=8)
    with caplog.at_level(logging.WARNING, logger="dalle_fast.data"):
        assert [data[i][1] for i in range(4)] == ["a red circle", "a red circle", "un café bleu", "un café bleu"]
    assert data.skipped == 2
    said = [r.getMessage() for r in caplog.records]
    assert any("a.txt" in m and "not UTF-8" in m for m in said) and any("c.txt" in m and "NUL" in m for m in said)
