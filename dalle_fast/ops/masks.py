"""The attention masks of SPEC.md section 2, in PyTorch.

The same predicates live in ``csrc/masks.h`` for the kernels; tests compare the two. Positions
``0..T-1`` are text, ``T + g`` is image token ``g`` at grid cell ``divmod(g, S)``.
"""

from __future__ import annotations

import torch

KINDS = ("row", "column", "conv", "causal")


def check_mask_args(kind: str, text_len: int, grid: int, kernel: int = 11) -> None:
    """Raise ValueError naming the problem if the mask arguments are invalid."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {', '.join(KINDS)}")
    for name, value in (("text_len", text_len), ("grid", grid), ("kernel", kernel)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if text_len < 1:
        raise ValueError(f"text_len must be >= 1 (position 0 holds BOS), got {text_len}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int, got {kernel}")


def image_offset_allowed(kind: str, grid: int, d: torch.Tensor, kernel: int = 11) -> torch.Tensor:
    """May image query g see image key g - d? (d: integer tensor; the mask depends on d only.)"""
    nonneg = d >= 0
    if kind == "row":
        return nonneg & (d <= grid)
    if kind == "column":
        return nonneg & (torch.remainder(d, grid) == 0)
    if kind == "causal":
        return nonneg
    if kind == "conv":
        half = min(kernel // 2, grid)  # from h = S on every d >= 0 of the grid is allowed: h + 1 stays small
        # d = S*a - dc with a in [0, h] and dc in [-h, h]: try every a (h + 1 small intervals).
        a = torch.arange(half + 1, device=d.device)
        near = (d.unsqueeze(-1) - grid * a).abs() <= half
        return nonneg & near.any(-1)
    raise ValueError(f"unknown attention kind {kind!r}")


def attention_mask(kind: str, text_len: int, grid: int, kernel: int = 11,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The bool [N, N] mask, N = text_len + grid**2; entry [q, k] is True where q may see k."""
    check_mask_args(kind, text_len, grid, kernel)
    n = text_len + grid * grid
    pos = torch.arange(n, device=device)
    q, k = pos[:, None], pos[None, :]
    causal = k <= q
    image_pair = (q >= text_len) & (k >= text_len)
    image_ok = image_offset_allowed(kind, grid, q - k, kernel)
    return causal & (~image_pair | image_ok)


def layer_kinds(num_layers: int) -> list[str]:
    """SPEC.md's schedule: last layer conv, else column when (i - 2) % 4 == 0, else row."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    kinds = []
    for i in range(1, num_layers + 1):
        if i == num_layers:
            kinds.append("conv")
        elif (i - 2) % 4 == 0:
            kinds.append("column")
        else:
            kinds.append("row")
    return kinds


def mask_density(kind: str, text_len: int, grid: int, kernel: int = 11) -> float:
    """Fraction of the N*N score matrix that the mask allows."""
    mask = attention_mask(kind, text_len, grid, kernel)
    return mask.sum().item() / mask.numel()
