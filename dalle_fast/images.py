"""Images out: tensors as PIL images and PNG grids (reading files is dalle_fast.data.transforms)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor [3, H, W], got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """[N, 3, H, W] in [0, 1] -> one PIL image, `nrow` images per row, `pad` black pixels between."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image, got an empty batch [0, 3, H, W]")
    if nrow is not None and (isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 0):
        raise ValueError(f"nrow must be a positive int (or None / 0: about a square), got {nrow!r}")
    nrow = min(nrow or math.ceil(math.sqrt(n)), n)  # no empty columns past the last image
    rows = math.ceil(n / nrow)
    canvas = torch.zeros(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y : y + h, x : x + w] = images[i].detach().float().cpu()
    return to_pil(canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """image_grid's PNG at `path`, each pixel `scale` x `scale` pixels."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, nrow)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)
    return path
