"""Dense PyTorch oracles for every op: plain, slow, obviously right."""

from __future__ import annotations

import math

import torch

from .masks import attention_mask


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str,
                     text_len: int, grid: int, kernel: int = 11,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over [B, H, N, D], computed densely in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = attention_mask(kind, text_len, grid, kernel, device=q.device)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, N, N)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, N, D)


def sparse_attention_lse(q: torch.Tensor, k: torch.Tensor, kind: str, text_len: int,
                         grid: int, kernel: int = 11, scale: float | None = None) -> torch.Tensor:
    """Log-sum-exp of each query's masked, scaled scores: [B, H, N] (what the kernels save)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = attention_mask(kind, text_len, grid, kernel, device=q.device)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
