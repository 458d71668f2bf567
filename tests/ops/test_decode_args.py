"""sparse_decode's argument checks."""

import pytest
import torch

from dalle_fast import ops
from dalle_fast.sampler import key_offsets

T, S = 2, 3  # text length, image grid side


def make_caches(B=2, H=2, D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=gen)
    k, v = (torch.randn(B, H, T + S * S, D, generator=gen) for _ in range(2))
    return q, k, v


def test_head_dim_zero_is_refused():
    q, k, v = make_caches(D=0)
    with pytest.raises(ValueError, match="head dim D must be at least 1"):
        ops.sparse_decode(q, k, v, key_offsets("row", S, 1), torch.tensor(1), T)
