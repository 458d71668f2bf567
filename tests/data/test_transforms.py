"""Crop-and-resize, decoding and tensor conversion."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dalle_fast.data.transforms import (RandomResizedCrop, UnreadableImage, center_crop_resize,
                                        load_rgb, load_rgb_transparency, prepare_image, to_tensor)


def _noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@given(width=st.integers(1, 400), height=st.integers(1, 400), seed=st.integers(0, 2**32 - 1),
       scale_lo=st.floats(0.05, 1.0), ratio_lo=st.floats(0.25, 1.0), ratio_hi=st.floats(1.0, 4.0))
def test_box_fits_and_follows_the_config(width, height, seed, scale_lo, ratio_lo, ratio_hi):
    crop = RandomResizedCrop(scale=(scale_lo, 1.0), ratio=(ratio_lo, ratio_hi))
    left, top, right, bottom = crop.box(width, height, np.random.default_rng(seed))
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    if min(w, h) >= 20:  # away from rounding: the ratio and the area fraction are honoured
        assert ratio_lo * 0.9 <= w / h <= ratio_hi * 1.1
        assert max(w / width, h / height) >= math.sqrt(scale_lo) * 0.9


def test_output_size_and_determinism():
    image = _noise_image(120, 80)
    crop = RandomResizedCrop()
    for size in (8, 32, 100, 200):
        out = crop(image, size, np.random.default_rng(0))
        assert out.size == (size, size)
    a = prepare_image(image, 32, crop, np.random.default_rng(123))
    b = prepare_image(image, 32, crop, np.random.default_rng(123))
    c = prepare_image(image, 32, crop, np.random.default_rng(124))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_full_scale_square_crop_is_the_identity():
    image = _noise_image(40, 40)
    crop = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = crop(image, 40, np.random.default_rng(0))
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_paper_preset_is_square_with_flips():
    crop = RandomResizedCrop.paper()
    assert crop.ratio == (1.0, 1.0) and crop.hflip
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, right, bottom = crop.box(300, 200, rng)
        side = right - left
        assert bottom - top == side and 2 / 3 * 200 - 1 <= side <= 8 / 9 * 200 + 1
    # Left half black, right half white: a flip shows as a bright left column.
    image = Image.fromarray(np.concatenate([np.zeros((64, 32, 3), np.uint8),
                                            np.full((64, 32, 3), 255, np.uint8)], axis=1))
    firsts = {int(np.asarray(crop(image, 16, np.random.default_rng(s)))[8, 0, 0] > 128)
              for s in range(20)}
    assert firsts == {0, 1}
    assert not RandomResizedCrop().hflip


@pytest.mark.parametrize("kwargs", [dict(scale=(0.0, 1.0)), dict(scale=(0.8, 0.5)),
                                    dict(scale=(0.5, 1.5)), dict(ratio=(2.0, 1.0)),
                                    dict(ratio=(0.0, 1.0))])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        RandomResizedCrop(**kwargs)


def test_center_crop_resize():
    # A wide image: the centre square is the middle third of three coloured bands.
    bands = np.zeros((30, 90, 3), np.uint8)
    bands[:, :30] = (255, 0, 0)
    bands[:, 30:60] = (0, 255, 0)
    bands[:, 60:] = (0, 0, 255)
    out = np.asarray(center_crop_resize(Image.fromarray(bands), 12))
    assert out.shape == (12, 12, 3)
    assert (out[2:-2, 2:-2] == (0, 255, 0)).all()
    same = _noise_image(16, 16)
    assert np.array_equal(np.asarray(center_crop_resize(same, 16)), np.asarray(same))


def test_to_tensor_and_load_rgb():
    gray = Image.fromarray(np.full((5, 7), 51, np.uint8))
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    loaded = load_rgb(buf.getvalue())
    assert loaded.mode == "RGB" and loaded.size == (7, 5)
    tensor = to_tensor(loaded)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.full_like(tensor, 0.2))

    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buf = io.BytesIO()
    transparent.save(buf, format="PNG")
    assert np.asarray(load_rgb(buf.getvalue()))[0, 0].tolist() == [255, 255, 255]

    for junk in (b"", b"not an image", buf.getvalue()[:40]):
        with pytest.raises(UnreadableImage):
            load_rgb(junk)


def test_16_bit_and_float_greyscale_images_are_rescaled_not_clipped(tmp_path):
    # Pillow's own conversion clips 16-bit values at 255: a mid-grey 16-bit PNG came out white.
    ramp = np.linspace(0, 65535, 12 * 10).reshape(10, 12).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # decoded as mode I or I;16, depending on Pillow
    pixels = np.asarray(load_rgb(path)).astype(int)
    expected = np.rint(ramp / 257.0).astype(int)
    assert (np.abs(pixels[..., 0] - expected) <= 1).all() and (pixels[..., 0] == pixels[..., 2]).all()
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F")
    buf = io.BytesIO()
    floats.save(buf, format="TIFF")
    assert np.asarray(load_rgb(buf.getvalue()))[0, 0].tolist() == [128, 128, 128]
    # a 16-bit grey PNG's transparent value (tRNS) is composited on white like every other transparency
    ramp[0, :2] = 1234
    Image.fromarray(ramp).save(path, transparency=1234)
    pixels = np.asarray(load_rgb(path)).astype(int)
    assert (pixels[0, :2] == 255).all() and (np.abs(pixels[0, 2:, 0] - expected[0, 2:]) <= 1).all()


def _grey_png(levels: list[int], bits: int, transparent: int) -> bytes:
    """A one-row grey PNG of `bits`-bit levels with tRNS naming `transparent` (Pillow writes no
    2- or 4-bit grey)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    per_byte = 8 // bits
    row = bytearray()
    for start in range(0, len(levels), per_byte):
        byte = 0
        for level in levels[start:start + per_byte]:
            byte = (byte << bits) | level
        row.append(byte << bits * (per_byte - len(levels[start:start + per_byte])))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", len(levels), 1, bits, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", transparent)) + chunk(b"IDAT", zlib.compress(b"\x00" + bytes(row)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("bits", [2, 4])
def test_low_bit_grey_transparency_is_composited_on_white(bits):
    # Pillow widens 2- and 4-bit grey to 8 bits but kept the tRNS level as stored: level 1 of 2-bit
    # grey loaded as grey 85, not white.
    top = 2**bits - 1
    image, transparent = load_rgb_transparency(_grey_png([1, 0, top, 1], bits, 1))
    assert np.asarray(image)[0, :, 0].tolist() == [255, 0, 255, 255] and transparent
    image, transparent = load_rgb_transparency(_grey_png([1, 0, 1, 1], bits, 2))  # no pixel uses it
    assert np.asarray(image)[0, :, 0].tolist() == [255 // top, 0, 255 // top, 255 // top] and not transparent


def test_transparency_is_reported_only_where_a_pixel_uses_it():
    for colour, expected in (((255, 0, 0, 0), True), ((255, 0, 0, 255), False)):
        buf = io.BytesIO()
        Image.new("RGBA", (3, 3), colour).save(buf, format="PNG")
        assert load_rgb_transparency(buf.getvalue())[1] is expected
    buf = io.BytesIO()
    _noise_image(3, 3).save(buf, format="PNG")
    assert load_rgb_transparency(buf.getvalue())[1] is False


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_malformed_exif_leaves_the_image_readable(fmt):
    # A PNG's or WebP's malformed EXIF block made exif_transpose raise, and the image unreadable.
    buf = io.BytesIO()
    Image.new("RGB", (4, 2), (10, 200, 30)).save(buf, format=fmt, exif=b"Exif\x00\x00garbage-not-tiff")
    image = load_rgb(buf.getvalue())
    assert image.size == (4, 2) and abs(int(np.asarray(image)[0, 0, 1]) - 200) <= 8


def test_to_tensor_refuses_what_it_would_cast():
    # np.asarray(..., uint8) made floats in [0, 1] black and wrapped 300 to 44.
    for bad in (np.full((2, 2, 3), 0.7), np.full((2, 2, 3), 300, np.int32), Image.new("L", (2, 2)),
                [[[1, 2, 3]]]):
        with pytest.raises(ValueError, match="RGB"):
            to_tensor(bad)


def test_caption_lines_break_at_newlines_only():
    from dalle_fast.data.transforms import caption_lines

    text = "a red\x0ccircle\u2028left\r\n  a blue square \rthird\n\n"
    # whitespace inside a line is one space, as generate reads a prompt: "a  red" and "a red"
    # tokenized apart, so a caption's double space was a text no prompt could match
    assert caption_lines(text) == ["a red circle left", "a blue square", "third"]
    assert caption_lines("a  red\tcircle\u00a0above a square") == ["a red circle above a square"]


def test_image_grid_of_no_images_or_a_bad_row_length_is_a_clear_error():
    from dalle_fast.images import image_grid

    assert image_grid(torch.zeros(3, 3, 4, 4), nrow=2).size == (2 + 2 * 6, 2 + 2 * 6)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid(torch.zeros(0, 3, 4, 4))
    with pytest.raises(ValueError, match="nrow"):
        image_grid(torch.zeros(2, 3, 4, 4), nrow=-1)
    # a row longer than the images has no empty columns (3 images at nrow 8 were 8 columns wide)
    assert image_grid(torch.zeros(3, 3, 4, 4), nrow=8).size == (2 + 3 * 6, 2 + 6)


@pytest.mark.parametrize("scale", [0, -1, 1.5, 2.0, True])
def test_save_grid_refuses_a_scale_that_is_not_a_positive_int(tmp_path, scale):
    # 0 and -1 saved at 1x without a word, 2.0 was a TypeError from PIL
    from dalle_fast.images import save_grid

    with pytest.raises(ValueError, match="scale must be a positive int"):
        save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "g.png", scale=scale)
    assert not (tmp_path / "g.png").exists()
