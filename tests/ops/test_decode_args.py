"""sparse_decode's argument checks on every path: the compiled op, the index_copy_ fallback and the reference."""

import pytest
import torch

from dalle_fast import ops
from dalle_fast.ops import reference
from dalle_fast.ops.decode import fused_cache_write
from dalle_fast.sampler import key_offsets
from tests.conftest import requires_kernels

T, S = 2, 3  # text length, image grid side


def make_caches(B=2, H=2, D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=gen)
    k, v = (torch.randn(B, H, T + S * S, D, generator=gen) for _ in range(2))
    return q, k, v


# The Python op takes the compiled kernel (which writes the cache itself), index_copy_ then the
# kernel, or index_copy_ then the reference.
PATHS = [pytest.param(("cpu", True), marks=requires_kernels, id="kernel"),
         pytest.param(("cpu", False), marks=requires_kernels, id="index_copy"),
         pytest.param(("reference", False), id="reference")]


def test_head_dim_zero_is_refused():
    q, k, v = make_caches(D=0)
    with pytest.raises(ValueError, match="head dim D must be at least 1"):
        ops.sparse_decode(q, k, v, key_offsets("row", S, 1), torch.tensor(1), T)


@pytest.mark.parametrize("path", PATHS)
def test_append_refuses_a_strided_new_key_inside_the_cache(path):
    """k_new a non-dense view of the cache row being written (cache_k[h, b, T + g] as [b, h]):
    PyTorch's overlap test gives up on non-dense tensors, and the cache came out wrong."""
    name, fused = path
    q, k, v = make_caches()
    g = torch.tensor(1)
    k_new = k.transpose(0, 1)[:, :, T + 1]
    assert not k_new.is_contiguous()
    with ops.backend(name), fused_cache_write(fused), pytest.raises(ValueError, match="cache_k and k_new share memory"):
        ops.sparse_decode(q, k, v, key_offsets("row", S, 1), g, T, k_new=k_new, v_new=q.clone())


@pytest.mark.parametrize("path", PATHS)
def test_append_refuses_a_strided_new_value_inside_the_other_cache(path):
    name, fused = path
    q, k, v = make_caches()
    v_new = k.transpose(0, 1)[:, :, T + 1]
    with ops.backend(name), fused_cache_write(fused), pytest.raises(ValueError, match="cache_k and v_new share memory"):
        ops.sparse_decode(q, k, v, key_offsets("row", S, 1), torch.tensor(1), T, k_new=q.clone(), v_new=v_new)


@pytest.mark.parametrize("path", PATHS)
def test_append_takes_views_of_one_buffer_that_do_not_overlap(path):
    """Caches sliced from one buffer (the sampler's keys and values, here also cut short along N,
    so not dense) and k_new / v_new from another part of it are apart: written as for clones."""
    name, fused = path
    B, H, D = 2, 2, 4
    N = T + S * S
    buf = torch.randn(3, B, H, N + 1, D, generator=torch.Generator().manual_seed(3))
    cache_k, cache_v = buf[0, :, :, :N], buf[1, :, :, :N]
    k_new, v_new = buf[2, :, :, 0], buf[2, :, :, 1]
    q = torch.randn(B, H, D)
    g, offsets = torch.tensor(4), key_offsets("conv", S, 3)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    want_k[:, :, T + 4], want_v[:, :, T + 4] = k_new, v_new
    want = reference.sparse_decode(q, want_k, want_v, offsets, g, T, 0.5)
    with ops.backend(name), fused_cache_write(fused):
        out = ops.sparse_decode(q, cache_k, cache_v, offsets, g, T, 0.5, k_new=k_new, v_new=v_new)
    assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)
    torch.testing.assert_close(out, want)
