"""Dense PyTorch oracles for every op: plain, slow, obviously right."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def sparse_decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, offsets: torch.Tensor,
                  g: torch.Tensor, text_len: int, scale: float) -> torch.Tensor:
    """One decoding step's attention: query q [B, H, D] at image position g (a 0-dim int64
    tensor) over the T = text_len text keys and the image keys g - d of the cache [B, H, N, D]
    for each offset d in `offsets` [K] with g - d >= 0 (the mask's keys; the cache must hold
    position T + g already). Softmax in float32 at least. Returns [B, H, D] in q's dtype."""
    t = text_len
    source = g - offsets  # image keys this query may see (negative: none)
    valid = source >= 0
    index = t + source.clamp(min=0)
    k_img, v_img = cache_k.index_select(2, index), cache_v.index_select(2, index)  # (B, H, K, D)
    k_txt, v_txt = cache_k[:, :, :t], cache_v[:, :, :t]
    acc = torch.promote_types(q.dtype, torch.float32)
    qq = q.unsqueeze(2)  # (B, H, 1, D)
    s_txt = (qq @ k_txt.transpose(-1, -2)).to(acc) * scale  # (B, H, 1, T)
    s_img = ((qq @ k_img.transpose(-1, -2)).to(acc) * scale).masked_fill(~valid, float("-inf"))
    p = torch.cat([s_txt, s_img], dim=-1).softmax(-1).to(q.dtype)
    return (p[..., :t] @ v_txt + p[..., t:] @ v_img).squeeze(2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual, as the prior's layers compute it: F.linear, then
    nn.GELU() (the erf one) when activation is "gelu", then the residual add."""
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else residual + y


def gumbel_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Gumbel(0, 1) noise from torch's RNG, uniforms kept strictly inside (0, 1)."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32).clamp(tiny, 1.0 - 2.0**-24)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, dim: int = 1, hard: bool = False,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logits + g) / tau) over `dim`; hard: the one-hot of the first argmax of logits + g
    (the Gumbel-max draw, as the kernels take it) in the forward pass with the soft sample's
    gradient (straight-through). That is the soft sample's argmax except where exp rounding ties
    entries of the soft sample (tau ~1e6 and above). `noise` defaults to fresh g."""
    if noise is None:
        noise = gumbel_noise(logits.shape, generator, logits.device)
    compute = torch.promote_types(logits.dtype, torch.float32)
    u = logits.to(compute) + noise.to(compute)
    # The max is subtracted before dividing: (logits + g) / tau itself passes the float range for
    # finite logits beyond its largest value times tau. softmax does not depend on the shift.
    y = torch.softmax((u - u.detach().amax(dim, keepdim=True)) / tau, dim=dim)
    if hard:
        index = u.argmax(dim=dim, keepdim=True)
        y_hard = torch.zeros_like(y).scatter_(dim, index, 1.0)
        y = y_hard - y.detach() + y
    return y.to(logits.dtype)


def gumbel_argmax(logits: torch.Tensor, dim: int = -1, scale: float = 1.0, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The first argmax over `dim` of logits * scale + g, computed in float64 and rounded to
    float32 (kept in float64 for float64 logits). `noise` defaults to fresh g."""
    if noise is None:
        noise = gumbel_noise(logits.shape, generator, logits.device)
    if logits.dtype == torch.float64:
        return (logits * scale + noise.double()).argmax(dim)
    # the kernel's scale is a float32; its product with a float32 logit is exact in float64
    z = (logits.double() * float(torch.tensor(scale, dtype=torch.float32)) + noise.double()).float()
    return z.argmax(dim)


def gumbel_softmax_kl(logits: torch.Tensor, tau: float = 1.0, dim: int = 1, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft sample and KL(softmax(logits) || uniform) per position (no noise, no tau)."""
    y = gumbel_softmax(logits, tau, dim, False, noise, generator)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return y, kl_to_uniform(x, dim).to(logits.dtype)


def kl_to_uniform(x: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(softmax(x) || uniform) over `dim`, as the kernels compute it: the sum over v of
    p log(p V) - p + 1/V (the added terms sum to 0) = phi(w) / V with w = log(p V) and
    phi(w) = (w - 1) e^w + 1 >= 0. log V + sum p log p cancelled to a few 1e-7 in float32 for
    near-uniform x (KL ~1e-9) and came out negative; every term here is >= 0, and an error in
    the log-sum-exp changes the sum only to second order. Near w = 0 phi is its series."""
    V = x.shape[dim]
    d = x - x.detach().amax(dim, keepdim=True)  # -inf logits stay -inf
    w = d - (torch.logsumexp(d, dim, keepdim=True) - math.log(V))
    # p = 0 (-inf logits): phi = 1 and no gradient; computing it from w = -inf would
    # backpropagate (-inf) * 0 = NaN into the whole position.
    live = w != float("-inf")
    w = w.masked_fill(~live, 0.0)
    series = torch.full_like(w, 1 / 5760)
    for coefficient in (1 / 840, 1 / 144, 1 / 30, 1 / 8, 1 / 3, 1 / 2):
        series = series * w + coefficient
    # The series (to w^8) is float32-exact below 0.25; float64 needs it only closer to 0.
    series_below = 0.25 if x.dtype == torch.float32 else 1e-3
    phi = torch.where(w.abs() < series_below, w * w * series, (w - 1) * torch.exp(w) + 1)
    return torch.where(live, phi, 1.0).sum(dim) / V
