"""Image decoding and the crop-and-resize step shared by the folder and tar-shard datasets.

Pillow and numpy only: torchvision is not installable beside our torch build.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]


class UnreadableSample(ValueError):
    """A sample the datasets skip (and count) instead of yielding: its image or its caption."""


class UnreadableImage(UnreadableSample):
    """An image that Pillow cannot decode (corrupt, truncated, not an image, too large)."""


class UnreadableCaption(UnreadableSample):
    """A caption file that is not text in a known encoding, or holds no caption."""


# Byte-order marks that name an encoding (the UTF-32 ones first: FF FE 00 00 starts with UTF-16's FF FE).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_caption(data: bytes) -> str:
    """A caption file's bytes as text: UTF-8 (a UTF-8 BOM is dropped), or UTF-16 / UTF-32 when the
    file starts with their BOM. Decoding is strict: anything else (Latin-1, cp1252, a UTF-16 file
    without a BOM, ...) raises `UnreadableCaption` rather than becoming replacement characters."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8-sig")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UnreadableCaption(f"caption is not {encoding.replace('-sig', '').upper()} text ({exc.reason} at byte "
                                f"{exc.start})") from None
    if "\x00" in text:  # valid UTF-8, but no text holds NULs: UTF-16 without its BOM, or a binary file
        raise UnreadableCaption(f"caption holds NUL characters (UTF-16 without a BOM?) at {text.index(chr(0))}")
    return text


def load_rgb(source: ImageSource) -> Image.Image:
    """Decode a path, bytes or file object into a fully loaded RGB image.

    EXIF orientation is applied; transparency is composited on white (web images with alpha
    mean "paper" there, and black would read as an object in the shapes-style data).
    Any decoding failure is raised as `UnreadableImage`, so callers can skip one exception.
    """
    return _load(source, report=False)[0]


def load_rgb_transparency(source: ImageSource) -> tuple[Image.Image, bool]:
    """load_rgb's image, and whether some pixel of it was (partly) transparent, composited on white."""
    return _load(source, report=True)


def _load(source: ImageSource, report: bool) -> tuple[Image.Image, bool]:
    """load_rgb's image and, if `report` (an extra pass over the alpha the datasets skip), whether a
    pixel was transparent."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as im:
            _scale_grey_transparency(im)
            try:
                oriented = ImageOps.exif_transpose(im)  # returns a loaded copy, so closing the file is safe
            except Exception:  # malformed EXIF (a PNG's or WebP's raises): the pixels are still readable
                im.load()
                oriented = im.copy()
            return _to_rgb(oriented, report)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc


_LOW_BIT_GREY = re.compile(r"L;([24])")


def _scale_grey_transparency(im: Image.Image) -> None:
    """Pillow widens 2- and 4-bit grey PNGs to 8 bits (level k to k * 255 / (2**bits - 1)) but
    keeps their tRNS grey level as stored, which then matches no pixel: scaled here, before the
    pixels are read, so that the transparent level is composited on white like any other."""
    transparent = im.info.get("transparency")
    if im.mode != "L" or not isinstance(transparent, int) or not im.tile:
        return
    raw = im.tile[0][3]  # the decoder's raw mode, e.g. "L;2"
    match = _LOW_BIT_GREY.fullmatch(raw if isinstance(raw, str) else str(raw[0]) if raw else "")
    if match is not None:
        im.info["transparency"] = transparent * 255 // (2 ** int(match.group(1)) - 1)


def _to_rgb(im: Image.Image, report: bool) -> tuple[Image.Image, bool]:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        transparent = report and im.getextrema()[3][0] < 255
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB"), transparent
    return (im.convert("RGB") if im.mode != "RGB" else im), False


def _to_8bit(im: Image.Image) -> Image.Image:
    """A greyscale image of 16-bit integers (modes I;16*, and I, which is how Pillow decodes
    16-bit PNGs and TIFFs) or of floats in [0, 1] (mode F) as 8-bit 'L'. Pillow's own conversion
    clips those values at 255 instead of rescaling them, which turns nearly every pixel white.
    A transparent grey value (a 16-bit PNG's tRNS) becomes 'LA' with those pixels transparent."""
    values = np.asarray(im, dtype=np.float64)
    scale = 255.0 if im.mode == "F" else 255.0 / 65535.0
    grey = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    transparent = im.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), mode="L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def to_tensor(image: Union[Image.Image, np.ndarray]) -> torch.Tensor:
    """RGB PIL image or uint8 array [H, W, 3] -> contiguous float32 tensor [3, H, W] in [0, 1].
    Anything else is refused: a cast would have made floats in [0, 1] black and wrapped larger
    integers around."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r} (load_rgb converts any image)")
    elif not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        what = f"a {image.dtype} array" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an RGB PIL image or a uint8 array, got {what}")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got {array.shape}")
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    return torch.from_numpy(chw).to(torch.float32).div_(255.0)


def _resize(image: Image.Image, size: int, box: tuple[int, int, int, int]) -> Image.Image:
    if box == (0, 0) + image.size and image.size == (size, size):
        return image.copy()
    # reducing_gap=3 first shrinks by an integer factor (fast) and stays visually identical to
    # a full-quality bicubic resize (Pillow's documented threshold).
    return image.resize((size, size), resample=Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The deterministic path: the largest centred square, resized to `size` x `size`."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return _resize(image, size, (left, top, left + side, top + side))


@dataclass(frozen=True)
class RandomResizedCrop:
    """A random crop of the image, resized to the target square (the dVAE's augmentation).

    Draw an aspect ratio log-uniformly from `ratio` (width / height), take the largest crop of
    that ratio that fits the image, and shrink it to a fraction of that crop's area drawn
    uniformly from `scale`; place it uniformly at random. Unlike torchvision's transform the
    area is relative to the largest crop of the drawn ratio rather than to the whole image,
    so every draw fits and the number of random draws per call is fixed (no rejection loop).
    A crop whose ratio is not 1 is stretched to the square output.

    `RandomResizedCrop.paper()` approximates Listing 1 of the DALL-E paper (the dVAE's
    augmentation): a square crop whose side is 2/3 to 8/9 of the short side (the paper resizes
    the short side to 9/8..12/8 of the target, then takes a target-sized crop), plus a random
    horizontal flip. Flipping makes "left"/"right" in captions wrong, so it is only for
    training the dVAE, which ignores captions; `hflip` is off by default.
    """

    scale: tuple[float, float] = (0.75, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    @classmethod
    def paper(cls) -> "RandomResizedCrop":
        return cls(scale=((2 / 3) ** 2, (8 / 9) ** 2), ratio=(1.0, 1.0), hflip=True)

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The crop (left, top, right, bottom) for an image of `width` x `height`."""
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        area_fraction = rng.uniform(self.scale[0], self.scale[1])
        max_w = min(float(width), height * aspect)
        max_h = max_w / aspect
        crop_w = min(width, max(1, round(max_w * math.sqrt(area_fraction))))
        crop_h = min(height, max(1, round(max_h * math.sqrt(area_fraction))))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        return left, top, left + crop_w, top + crop_h

    def __call__(self, image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
        out = _resize(image, size, self.box(image.width, image.height, rng))
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


def prepare_image(image: Image.Image, size: int, crop: RandomResizedCrop | None,
                  rng: np.random.Generator) -> torch.Tensor:
    """Crop (random or centred) and resize to `size`, then convert to a [3, size, size] tensor."""
    out = center_crop_resize(image, size) if crop is None else crop(image, size, rng)
    return to_tensor(out)


def one_line(text: str) -> str:
    """Runs of whitespace (tabs, form feeds, line breaks, ...) as one space, the ends stripped: how
    captions are trained on and prompts read, so that both tokenize alike."""
    return " ".join(text.split())


def caption_lines(text: str) -> list[str]:
    """The non-empty lines of a caption file, each `one_line`: one caption each. Lines end at \n,
    \r\n or \r only (str.splitlines also splits at form feeds, \x1c-\x1e, NEL and U+2028/9, which
    may sit inside one caption, where they become spaces)."""
    return [line for line in (one_line(raw) for raw in _LINE_BREAK.split(text)) if line]


def pick_caption(text: str, rng: np.random.Generator, all_lines: bool = False) -> str | None:
    """One non-empty line of a caption file, chosen with `rng` (or, with `all_lines`, every
    non-empty line joined by newlines, `rng` unused); None when there is none."""
    lines = caption_lines(text)
    if not lines:
        return None
    if all_lines:
        return "\n".join(lines)
    return lines[int(rng.integers(len(lines)))]


def check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    return int(size)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
