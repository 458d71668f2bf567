"""The fused Gumbel-softmax on CUDA (skipped without a GPU).

Soft samples of logits whose softmax dimension is strided (inner > 1) with at most 16384 entries,
and their backward, run the one-read cluster kernels on sm_90 (gumbel_fwd_resident.cu,
gumbel_bwd_resident.cu); hard samples, contiguous vocabularies, larger ones, and every call
under DALLE_FAST_GUMBEL_RESIDENT=0 (read at every call) run the two-sweep kernels. Both are held
to the formula on the same noise.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast import ops
from dalle_fast.ops import reference
from dalle_fast.ops.gumbel import cuda_one_read_kernel
from tests.conftest import requires_cuda, requires_kernels
from tests.ops.test_gumbel import bwd, check_backward, close, fwd, noise_of

pytestmark = [requires_kernels, requires_cuda]

# (shape, dim): the dVAE's vocabulary (the forward in a cluster of 8 blocks, the backward with the
# KL term in 16), uneven splits of a vocabulary over the cluster, one that is not a multiple of 4,
# positions that are not a multiple of the 32-position tile, a non-portable cluster size (12
# blocks, where the device keeps enough of them on its SMs, else the two-sweep kernel; over 16 for
# the KL backward), one over every one-read limit, and contiguous vocabularies (two-sweep).
SHAPES = [((2, 8192, 3, 5), 1), ((1, 8190, 33), 1), ((3, 5000, 2, 7), 1), ((2, 40, 8, 8), 1), ((4, 129, 31), 1),
          ((2, 513, 64), 1), ((1, 12003, 2, 3), 1), ((1, 16385, 3), 1), ((3, 6, 5, 300), 3), ((5, 2, 7), 0)]


def sample(x, tau, dim, with_kl, seed, resident=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with cuda_one_read_kernel(resident):
        return fwd(x, tau, dim, False, with_kl, gen)


@given(shape_dim=st.sampled_from(SHAPES), tau=st.sampled_from([1.0, 0.5, 1 / 16, 3.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**20))
def test_cuda_forward_matches_formula_on_same_noise(shape_dim, tau, dtype, seed):
    shape, dim = shape_dim
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to("cuda", dtype)
    y, kl, state = sample(x, tau, dim, True, seed)
    xr = x.float().requires_grad_()
    yr, klr = reference.gumbel_softmax_kl(xr, tau, dim, noise=noise_of(x, state, dim))
    close(y, yr, dtype, "y")
    close(kl, klr, dtype, "kl")
    check_backward(x, y, kl, state, xr, yr, klr, tau, dim, gen)
    y_plain, _, state_plain = sample(x, tau, dim, False, seed)
    assert torch.equal(state_plain, state)
    assert torch.equal(y_plain, y), "the KL statistics changed the sample"


@pytest.mark.parametrize("shape_dim", SHAPES)
def test_cuda_resident_and_two_sweep_paths_agree(shape_dim):
    shape, dim = shape_dim
    x = torch.randn(shape, device="cuda") * 4
    y1, kl1, s1 = sample(x, 0.7, dim, True, 3, resident=True)
    y2, kl2, s2 = sample(x, 0.7, dim, True, 3, resident=False)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kl1, kl2, atol=1e-6, rtol=1e-5)
    dy, dkl = torch.randn_like(x), torch.randn_like(kl1)
    grads = []
    for resident in (True, False):
        with cuda_one_read_kernel(resident):
            grads.append([bwd(dy, dkl, x, y1, s1, 0.7, dim, False), bwd(dy, None, x, y1, s1, 0.7, dim, False)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cuda_resident_extreme_and_infinite_logits():
    x = torch.randn(2, 8192, 3, 3, device="cuda") * 1e4
    x[0, ::3] = float("-inf")  # a third of the vocabulary never sampled
    x[1, :, 1, 2] = float("-inf")  # every entry of one position
    for tau in (1.0, 1 / 16):
        y, kl, state = sample(x, tau, 1, True, 0)
        assert torch.isfinite(y).all() and torch.isfinite(kl[0]).all()
        assert (y[0, ::3] == 0).all() and (y[1, :, 1, 2] == 0).all()
        yr, _ = reference.gumbel_softmax_kl(x, tau, 1, noise=noise_of(x, state, 1))
        close(y, torch.nan_to_num(yr, nan=0.0), torch.float32, "y")


def test_cuda_forward_replays_in_a_graph_with_fresh_noise():
    x = torch.randn(2, 8192, 4, 4, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd(x, 1.0, 1, False, True, None)  # warm-up: the occupancy query runs outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, kl, state = fwd(x, 1.0, 1, False, True, None)
    draws = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        draws.append((y.clone(), state.clone()))
    assert not torch.equal(draws[0][1], draws[1][1]), "each replay must take a new Philox offset"
    assert not torch.equal(draws[0][0], draws[1][0])
    for yd, sd in draws:
        yr, _ = reference.gumbel_softmax_kl(x, 1.0, 1, noise=noise_of(x, sd, 1))
        close(yd, yr, torch.float32, "replayed y")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0), reason="before sm_90")
def test_cuda_one_read_kernels_take_the_dvae_vocabulary():
    # Under "require" a call the one-read kernels should take fails instead of falling back, so the
    # tests above are known to have exercised them and not only the two-sweep kernels twice: the
    # forward and the backward without the KL term run in clusters of 8 blocks. (The KL backward
    # needs 16, which a device may not keep on enough SMs; it may fall back.)
    x = torch.randn(4, 8192, 8, 8, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    with cuda_one_read_kernel("require"):
        y, kl = ops.gumbel_softmax_kl(x, 0.5)
        ops.gumbel_softmax(x.detach().bfloat16(), 1.0)
    ((y * dy).sum() + kl.sum()).backward()
    with cuda_one_read_kernel("require"):
        y = ops.gumbel_softmax(x, 1.0)
        (y * dy).sum().backward()
    assert torch.isfinite(x.grad).all()
