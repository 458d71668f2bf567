"""dalle_fast.ops.sparse_attention: the public op, its validation and its autograd.

The compiled op `torch.ops.dalle_fast.sparse_attention_fwd` returns (out, lse); autograd calls
`sparse_attention_bwd`, which recomputes the probabilities from q, k and lse.
"""

from __future__ import annotations

import math

import torch

from . import _backend, reference
from .masks import check_mask_args

_CPU_DTYPES = (torch.float32, torch.float64)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, grid: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)} (rank {t.dim()})")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    n = text_len + grid * grid
    if q.shape[2] != n:
        raise ValueError(f"q, k, v have N = {q.shape[2]} positions, but text_len + grid**2 = "
                         f"{text_len} + {grid}**2 = {n}")
    if q.shape[3] < 1:
        raise ValueError("head dim D must be >= 1")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, text_len: int,
                     grid: int, kernel: int = 11, scale: float | None = None) -> torch.Tensor:
    """Attention over [B, H, N, D] inputs with one of SPEC.md's masks (row, column, conv, causal).

    N = text_len + grid**2. Each query attends to the keys its mask allows, in one softmax;
    `scale` defaults to 1/sqrt(D). Differentiable in q, k and v. The implementation follows
    `dalle_fast.ops.backend(...)` (default: our kernel when it fits, else the reference).
    """
    check_mask_args(kind, text_len, grid, kernel)
    _check_inputs(q, k, v, text_len, grid)
    if scale is None:  # no float(): under torch.compile with dynamic shapes D may be symbolic
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if not _backend.use_kernel("sparse_attention", q, _CPU_DTYPES):
        return reference.sparse_attention(q, k, v, kind, text_len, grid, kernel, scale)
    out, _ = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, kind, text_len, grid, kernel, scale)
    return out


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _backend.has_kernels():

    @torch.library.register_fake("dalle_fast::sparse_attention_fwd")
    def _fwd_fake(q, k, v, kind, text_len, grid, kernel, scale):
        _backend.one_device("sparse_attention_fwd", q=q, k=k, v=v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q.dtype), device=q.device)
        return out, lse

    @torch.library.register_fake("dalle_fast::sparse_attention_bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, kind, text_len, grid, kernel, scale):
        _backend.one_device("sparse_attention_bwd", grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse)
        return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))

    def _setup_context(ctx, inputs, output):
        q, k, v, kind, text_len, grid, kernel, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)  # a loss on lse (calling the op directly) gets an error, not zeros
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask_args = (kind, text_len, grid, kernel, scale)

    def _backward(ctx, grad_out, grad_lse):
        # lse is marked non-differentiable: grad_lse is always None or zeros.
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.dalle_fast.sparse_attention_bwd(grad_out, q, k, v, out, lse, *ctx.mask_args)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("dalle_fast::sparse_attention_fwd", _backward, setup_context=_setup_context)

    _backend.forbid_double_backward("dalle_fast::sparse_attention_bwd", "dalle_fast.ops.sparse_attention")
