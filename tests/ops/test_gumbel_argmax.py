"""gumbel_argmax, the sampler's token draw: our kernels against the formula on the same noise."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast import ops
from dalle_fast.ops import reference
from tests.conftest import DEVICES, requires_kernels

pytestmark = requires_kernels
fwd = torch.ops.dalle_fast.gumbel_softmax_fwd
noise_of = torch.ops.dalle_fast.gumbel_noise
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

shapes = st.sampled_from([((16, 8192), -1), ((4, 7), -1), ((3, 33, 17), 1), ((2, 5, 6), 0), ((1, 3, 2, 19), 3),
                          ((5, 1), 1), ((2, 64, 4, 4), 1), ((40, 9), 1), ((3, 1000), 1)])


def generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
@given(shape_dim=shapes, dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1.0, 0.5, 20.0, 1 / 3]),
       seed=st.integers(0, 2**20))
def test_draw_is_the_argmax_of_the_formula_on_the_same_noise(device, shape_dim, dtype, scale, seed):
    shape, dim = shape_dim
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(device, dtype)
    index = ops.gumbel_argmax(x, dim, scale, generator=generator(device, seed))
    # the soft sample's forward from the same generator state reports the (seed, offset) it drew with
    _, _, state = fwd(x, 1.0, dim, False, False, generator(device, seed))
    want = reference.gumbel_argmax(x, dim, scale, noise=noise_of(x, state, dim))
    assert index.dtype == torch.long and index.shape == want.shape
    # float64 rounding of x * scale + g to float32 can differ from the kernel's fused multiply-add
    # in the last bit; only an exact near-tie could turn that into another index: none here
    assert torch.equal(index, want), (index, want)


@pytest.mark.parametrize("device", DEVICES)
@given(shape_dim=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**20))
def test_draw_at_scale_one_is_the_hard_samples_one_hot(device, shape_dim, dtype, seed):
    shape, dim = shape_dim
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).to(device, dtype)
    y_hard, _, _ = fwd(x, 1.0, dim, True, False, generator(device, seed + 1))
    assert torch.equal(ops.gumbel_argmax(x, dim, generator=generator(device, seed + 1)), y_hard.argmax(dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_draw_frequencies_follow_the_tempered_softmax(device, scale):
    # 120k draws over 8 classes, one row of the vocabulary per draw: chi-square, 7 degrees of freedom
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0]) / scale
    x = logits.expand(120000, 8).contiguous().to(device)
    counts = torch.bincount(ops.gumbel_argmax(x, -1, scale, generator=generator(device, 4)).cpu(), minlength=8)
    expected = torch.softmax(logits.double() * scale, 0) * counts.sum()
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.32, (chi2, counts, expected)  # p = 0.001 critical value, df = 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_and_extreme_logits(device, dtype):
    big = 6e4 if dtype == torch.float16 else 1e4  # times the scale: past float16's range (float32 math)
    x = torch.randn(64, 300).to(device, dtype)
    x[3, 7] = big
    x[4, :] = -big
    x[:, ::2] = float("-inf")  # even entries: never drawn
    x[4, 11] = float("-inf")
    x[:3] = float("-inf")  # nothing to draw: index 0, as the hard sample's one-hot
    index = ops.gumbel_argmax(x, -1, 2.0, generator=generator(device, 0)).cpu()
    assert index[:3].tolist() == [0, 0, 0]
    assert index[3] == 7
    assert (index[5:] % 2 == 1).all() and index[4] % 2 == 1 and index[4] != 11


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_draw_and_fresh_draws_each_call(device):
    x = torch.randn(16, 512, device=device)
    gen = generator(device, 9)
    a, b = ops.gumbel_argmax(x, generator=gen), ops.gumbel_argmax(x, generator=gen)
    assert not torch.equal(a, b)
    assert torch.equal(ops.gumbel_argmax(x, generator=generator(device, 9)), a)
    torch.manual_seed(2)
    c = ops.gumbel_argmax(x)
    torch.manual_seed(2)
    assert torch.equal(ops.gumbel_argmax(x), c)


def test_strided_logits_and_a_middle_dim():
    x = torch.randn(3, 40, 5, 6).to(memory_format=torch.channels_last)
    index = ops.gumbel_argmax(x, 1, 0.7, generator=generator("cpu", 1))
    assert torch.equal(index, ops.gumbel_argmax(x.contiguous(), 1, 0.7, generator=generator("cpu", 1)))
    assert index.shape == (3, 5, 6)


def test_opcheck():
    x = torch.randn(2, 6, 3, 3)
    torch.library.opcheck(torch.ops.dalle_fast.gumbel_argmax.default, (x, 0.5, 1, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ops.gumbel_argmax(x, scale=0.0), ValueError, "scale must be a positive"),
    (lambda x: ops.gumbel_argmax(x, scale=-1.0), ValueError, "scale must be a positive"),
    (lambda x: ops.gumbel_argmax(x, scale=float("nan")), ValueError, "scale must be a positive"),
    (lambda x: ops.gumbel_argmax(x, scale=1e39), ValueError, "scale must be a positive number in"),
    (lambda x: ops.gumbel_argmax(x[:0]), ValueError, "non-empty"),
    (lambda x: ops.gumbel_argmax(x.long()), TypeError, "floating"),
    (lambda x: ops.gumbel_argmax(x, dim=2), ValueError, "out of range"),
    (lambda x: ops.gumbel_argmax(x, generator=3), TypeError, "torch.Generator"),
    (lambda x: torch.ops.dalle_fast.gumbel_argmax(x, 0.0, 1, None), ValueError, "scale must be a positive"),
    (lambda x: torch.ops.dalle_fast.gumbel_argmax(x, 1e39, 1, None), ValueError, "scale must be a positive number in"),
    (lambda x: torch.ops.dalle_fast.gumbel_argmax(x.double(), 1.0, 1, None), TypeError, "float32, float16"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(4, 9))


def test_float64_falls_back_to_the_reference():
    x = torch.randn(8, 30, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falls back"):
        index = ops.gumbel_argmax(x, generator=torch.Generator().manual_seed(0))
    assert index.shape == (8,) and index.dtype == torch.long


def test_environment_switch_draws_with_the_reference(monkeypatch):
    x = torch.randn(6, 40)
    monkeypatch.setenv("DALLE_FAST_GUMBEL_ARGMAX", "0")
    got = ops.gumbel_argmax(x, scale=0.5, generator=torch.Generator().manual_seed(3))
    want = reference.gumbel_argmax(x, -1, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
