"""Fused Gumbel-softmax: our kernels against the formula on the same noise, and the sampler's law."""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast import ops
from dalle_fast.ops import reference
from dalle_fast.ops._backend import _C
from dalle_fast.ops.gumbel import cuda_one_read_kernel
from tests.conftest import DEVICES, requires_kernels

pytestmark = requires_kernels
fwd = torch.ops.dalle_fast.gumbel_softmax_fwd
bwd = torch.ops.dalle_fast.gumbel_softmax_bwd
noise_of = torch.ops.dalle_fast.gumbel_noise

# Storage rounding of the low-precision outputs (math is float32 throughout).
STORE_TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 2e-3)}
# Gradients, relative to their largest entry: the backward reads y as stored (rounded).
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def kl_reference(x, dim):
    return reference.gumbel_softmax_kl(x, 1.0, dim, noise=torch.zeros_like(x, dtype=torch.float32))[1]


def close(a, b, dtype, what):
    atol, rtol = STORE_TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


shapes = st.sampled_from([((2, 10, 3, 5), 1), ((4, 7), -1), ((3, 33, 17), 1), ((2, 5, 6), 0), ((1, 3, 2, 19), 3),
                          ((5, 1), 1), ((2, 64, 4, 4), 1), ((40, 9), 1)])


@given(shape_dim=shapes, tau=st.sampled_from([1.0, 0.5, 1 / 16, 3.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**20))
def test_forward_and_backward_match_formula_on_same_noise(shape_dim, tau, dtype, seed):
    shape, dim = shape_dim
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    y, kl, state = fwd(x, tau, dim, False, True, gen)
    g = noise_of(x, state, dim)
    xr = x.float().requires_grad_()
    yr, klr = reference.gumbel_softmax_kl(xr, tau, dim, noise=g)
    close(y, yr, dtype, "y")
    close(kl, klr, dtype, "kl")
    check_backward(x, y, kl, state, xr, yr, klr, tau, dim, gen)


def check_backward(x, y, kl, state, xr, yr, klr, tau, dim, gen):
    """The kernel's gradient for random dy, dkl against the reference's: autograd of the float32
    formula (xr -> yr, klr on the same noise) in float32, the formula on the stored y otherwise."""
    dtype = x.dtype
    dy, dkl = (torch.randn(t.shape, generator=gen).to(x.device, dtype) for t in (x, kl))
    got = bwd(dy, dkl, x, y, state, tau, dim, False).double()
    if dtype == torch.float32:
        (expected,) = torch.autograd.grad((yr * dy.float()).sum() + (klr * dkl.float()).sum(), xr)
    else:
        # The backward reads y as stored; low-precision y makes the autograd of the float32
        # reference a different function. Hold the kernel to the same formula on its own y.
        ys, g64, x64 = y.double(), dy.double(), x.double()
        expected = ys * (g64 - (ys * g64).sum(dim, keepdim=True)) / tau
        p, logp = torch.softmax(x64, dim), torch.log_softmax(x64, dim)
        expected = expected + dkl.double().unsqueeze(dim) * p * (logp - (p * logp).sum(dim, keepdim=True))
    scale = expected.abs().max().item() + 1e-6
    err = (got - expected.double()).abs().max().item() / scale
    assert err <= GRAD_TOL[dtype], \
        f"grad: relative error {err} > {GRAD_TOL[dtype]} ({dtype}, {tuple(x.shape)}, dim {dim})"


@given(shape_dim=shapes, seed=st.integers(0, 2**20))
def test_hard_is_one_hot_of_the_soft_argmax_with_soft_gradient(shape_dim, seed):
    shape, dim = shape_dim
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2
    y_hard, _, state = fwd(x, 0.7, dim, True, False, torch.Generator().manual_seed(seed + 1))
    y_soft, _, state_soft = fwd(x, 0.7, dim, False, False, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(state, state_soft)  # same generator state -> same noise
    assert torch.equal(y_hard.sum(dim), torch.ones_like(y_hard.sum(dim)))
    assert torch.equal(y_hard.argmax(dim), y_soft.argmax(dim))
    assert set(y_hard.unique().tolist()) <= {0.0, 1.0}
    dy = torch.randn(shape)
    assert torch.allclose(bwd(dy, None, x, y_hard, state, 0.7, dim, True),
                          bwd(dy, None, x, y_soft, state, 0.7, dim, False), atol=1e-6)


def test_public_api_gradients_match_reference_autograd():
    x = torch.randn(2, 12, 3, 3, requires_grad=True)
    for hard in (False, True):
        torch.manual_seed(3)
        y = ops.gumbel_softmax(x, 0.5, hard=hard)
        torch.manual_seed(3)
        _, _, state = fwd(x.detach(), 0.5, 1, hard, False, None)
        xr = x.detach().clone().requires_grad_()
        yr = reference.gumbel_softmax(xr, 0.5, 1, hard, noise=noise_of(x.detach(), state, 1))
        dy = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, x, dy)
        (expected,) = torch.autograd.grad(yr, xr, dy)
        torch.testing.assert_close(y, yr, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    y, kl = ops.gumbel_softmax_kl(x, 0.5)
    (kl.sum() + y[:, 0].sum()).backward()
    assert torch.isfinite(x.grad).all()
    # a hard sample edited in place before the backward (as F.gumbel_softmax's may be): its backward
    # never reads it, so it is not kept for it; the edit zeroes the gradient through row 0
    dy = torch.randn_like(x)
    for backend in ("auto", "reference"):
        with ops.backend(backend):
            torch.manual_seed(3)
            cut = dy.index_fill(1, torch.tensor([0]), 0)
            (expected,) = torch.autograd.grad(ops.gumbel_softmax(x, 0.5, hard=True), x, cut)
            torch.manual_seed(3)
            y = ops.gumbel_softmax(x, 0.5, hard=True)
            y[:, 0] = 0.0
            (got,) = torch.autograd.grad(y, x, dy)
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=backend)


def test_same_seed_same_bits_and_fresh_noise_each_call():
    x = torch.randn(4, 50, 6, 6)
    torch.manual_seed(7)
    a = ops.gumbel_softmax(x)
    b = ops.gumbel_softmax(x)
    torch.manual_seed(7)
    assert torch.equal(ops.gumbel_softmax(x), a)
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(ops.gumbel_softmax(x, generator=g1), ops.gumbel_softmax(x, generator=g2))
    # Threads split the work differently, the noise is keyed by position: same bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(7)
        assert torch.equal(ops.gumbel_softmax(x), a)
    finally:
        torch.set_num_threads(threads)


def test_compiled_draws_stay_separate_draws():
    """Two draws from the same logits in one compiled training step stay two draws, in eager's order
    (the ops are tagged nondeterministic_seeded: without it the joint graph's CSE merged them)."""
    x = torch.randn(16, 40, requires_grad=True)

    def step(x):
        return ops.gumbel_softmax(x, 0.5, dim=-1), ops.gumbel_softmax(x, 0.5, dim=-1, hard=True)

    torch.manual_seed(3)
    eager = step(x)
    torch.manual_seed(3)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    assert not torch.equal(eager[0].argmax(-1), eager[1].argmax(-1))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert "nondeterministic_seeded" in str(fwd.default.tags)
    assert "nondeterministic_seeded" in str(torch.ops.dalle_fast.gumbel_argmax.default.tags)


def test_argmax_frequencies_follow_softmax():
    # Gumbel-max: argmax(logits + g) ~ Categorical(softmax(logits)). 120k draws of one
    # distribution over 8 classes, chi-square with 7 degrees of freedom.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    x = logits.view(1, 8, 1).expand(30, 8, 4000).contiguous()
    y = ops.gumbel_softmax(x, tau=0.3, dim=1, generator=torch.Generator().manual_seed(11))
    counts = torch.bincount(y.argmax(1).flatten(), minlength=8).double()
    expected = torch.softmax(logits.double(), 0) * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.32, (chi2, counts, expected)  # p = 0.001 critical value, df = 7


def test_extreme_and_infinite_logits():
    x = torch.randn(3, 16, 5, 5) * 1e4
    x[0, :, 0, 0] = torch.tensor([1e4] * 8 + [-1e4] * 8)
    x[:, 3] = float("-inf")
    for tau in (1.0, 1 / 16, 1e-30, 1e30):  # 1e-30 and 1e30: the ends of the range tau may take
        y, kl, state = fwd(x, tau, 1, False, True, None)
        assert torch.isfinite(y).all() and torch.isfinite(kl).all()
        assert (y[:, 3] == 0).all()  # -inf is never sampled
        yh, _, _ = fwd(x, tau, 1, True, False, None)
        assert (yh[:, 3] == 0).all() and torch.equal(yh.sum(1), torch.ones(3, 5, 5))
        dx = bwd(torch.randn_like(x), torch.randn_like(kl), x, y, state, tau, 1, False)
        assert torch.isfinite(dx).all()


@pytest.mark.parametrize("device", DEVICES)
@given(shape_dim=shapes, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**20), data=st.data())
def test_nan_logits_make_their_position_nan_and_leave_the_others(device, shape_dim, dtype, seed, data):
    # The reference's semantics (softmax, amax and argmax propagate NaN): a position with a NaN
    # logit gets a NaN soft sample, hard sample, KL and gradient at every entry, -inf ones included,
    # and the Gumbel-max draw gives its first NaN. The kernels' max and argmax had passed over the
    # NaN: a finite hard sample and KL, a soft sample NaN at one entry and 0 elsewhere.
    shape, dim = shape_dim
    dim = dim % len(shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    x[torch.rand(shape, generator=gen) < 0.1] = float("-inf")
    reduced = shape[:dim] + shape[dim + 1:]
    poisoned = torch.tensor(data.draw(st.lists(st.booleans(), min_size=math.prod(reduced),
                                               max_size=math.prod(reduced)))).view(reduced)
    where = torch.randint(0, shape[dim], reduced, generator=gen)
    every = torch.rand(reduced, generator=gen) < 0.2  # some positions NaN at every entry
    entries = torch.arange(shape[dim]).view([-1 if d == dim else 1 for d in range(len(shape))])
    nan_at = poisoned.unsqueeze(dim) & ((entries == where.unsqueeze(dim)) | every.unsqueeze(dim))
    x_nan = x.masked_fill(nan_at, float("nan"))
    dy, dkl = torch.randn(shape, generator=gen), torch.randn(reduced, generator=gen)

    def run(logits):
        logits = logits.to(device, dtype).requires_grad_()
        y, kl = ops.gumbel_softmax_kl(logits, 0.7, dim, generator=torch.Generator(device).manual_seed(seed))
        (grad,) = torch.autograd.grad([y, kl], [logits], [dy.to(device, dtype), dkl.to(device, dtype)])
        hard = logits.detach().requires_grad_()
        yh = ops.gumbel_softmax(hard, 0.7, dim, hard=True, generator=torch.Generator(device).manual_seed(seed))
        (grad_h,) = torch.autograd.grad(yh, hard, dy.to(device, dtype))
        index = ops.gumbel_argmax(logits.detach(), dim, generator=torch.Generator(device).manual_seed(seed))
        return [t.detach().float().cpu() for t in (y, kl, grad, yh, grad_h)], index.cpu()

    clean, clean_index = run(x)
    dirty, dirty_index = run(x_nan)
    for name, a, b in zip(("y", "kl", "grad", "hard y", "hard grad"), clean, dirty):
        at = poisoned if a.shape == poisoned.shape else poisoned.unsqueeze(dim).expand(shape)
        assert b[at].isnan().all(), f"{name}: not NaN throughout a position with a NaN logit"
        # (a position whose logits are all -inf has a NaN KL either way)
        torch.testing.assert_close(b[~at], a[~at], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name}: changed at a position without a NaN logit: {m}")
    first_nan = nan_at.int().argmax(dim)
    assert torch.equal(dirty_index, torch.where(poisoned, first_nan, clean_index))
    assert reference.gumbel_softmax(x_nan, 0.7, dim)[poisoned.unsqueeze(dim).expand(shape)].isnan().all()


# |kl - float64 KL| for near-uniform logits (KL ~5e-9): the CPU kernel and the reference sum
# p log(p V) - p + 1/V term by term; CUDA's one-pass statistics leave the rounding of sum e^x.
NEAR_UNIFORM_KL_TOL = {"cpu": dict(atol=1e-11, rtol=1e-2), "cuda": dict(atol=3e-7, rtol=0.0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dim", [((4, 8192), -1), ((2, 8192, 3), 1)])
def test_kl_of_near_uniform_logits_is_not_negative(device, shape, dim):
    """KL(softmax(x) || uniform) as log V + sum p log p cancelled to a few -1e-6 for x ~ 1e-4."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 1e-4
    x64 = x.double()
    truth = (torch.softmax(x64, dim) * (torch.log_softmax(x64, dim) + math.log(x.shape[dim]))).sum(dim)
    assert (truth > 1e-9).all()
    xr = x.clone().requires_grad_()
    _, klr = reference.gumbel_softmax_kl(xr, 1.0, dim, noise=torch.zeros_like(x))
    y, kl, state = fwd(x.to(device), 1.0, dim, False, True, None)
    for what, got, tol in [("reference", klr.detach(), NEAR_UNIFORM_KL_TOL["cpu"]),
                           (device, kl.cpu(), NEAR_UNIFORM_KL_TOL[device])]:
        assert (got >= 0).all(), f"{what}: {got}"
        torch.testing.assert_close(got.double(), truth, **tol, msg=lambda m: f"{what}: {m}")
    # The gradient p (log p - sum p log p), ~1e-8 here, against float64.
    dkl = torch.randn(klr.shape, generator=gen)
    p, log_p = torch.softmax(x64, dim), torch.log_softmax(x64, dim)
    want = dkl.double().unsqueeze(dim) * p * (log_p - (p * log_p).sum(dim, keepdim=True))
    (from_reference,) = torch.autograd.grad((klr * dkl).sum(), xr)
    from_kernel = bwd(torch.zeros_like(y), dkl.to(device), x.to(device), y, state, 1.0, dim, False).cpu()
    for what, got in [("reference", from_reference), (device, from_kernel)]:
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-3, f"{what} gradient: relative error {err}"


@pytest.mark.parametrize("shape, dim", [((3, 32768), -1), ((1, 32768, 2), 1)])
def test_large_vocabulary_matches_float64(shape, dim):
    """Sums over V = 32768 entries (the softmax's, the KL's, the backward's dot product) stay
    within the float32 tolerance of the formula in float64 on the same noise: float running
    sums erred by ~V * 2^-24 relative (2e-4 in the KL)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen) * 3
    y, kl, state = fwd(x, 1.0, dim, False, True, gen)
    yh, _, _ = fwd(x, 1.0, dim, True, False, torch.Generator().set_state(gen.get_state()))
    x64 = x.double()
    u64 = x64 + noise_of(x, state, dim).double()
    y64 = torch.softmax(u64, dim)
    close(y, y64, torch.float32, "y")
    close(kl, reference.kl_to_uniform(x64, dim), torch.float32, "kl")
    dy, dkl = torch.randn(x.shape, generator=gen), torch.randn(kl.shape, generator=gen)
    p, log_p = torch.softmax(x64, dim), torch.log_softmax(x64, dim)
    soft = y64 * (dy.double() - (y64 * dy.double()).sum(dim, keepdim=True))
    with_kl = soft + dkl.double().unsqueeze(dim) * p * (log_p - (p * log_p).sum(dim, keepdim=True))
    for what, got, want in [("grad", bwd(dy, dkl, x, y, state, 1.0, dim, False), with_kl),
                            ("hard grad", bwd(dy, None, x, yh, state, 1.0, dim, True), soft)]:
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err <= GRAD_TOL[torch.float32], f"{what}: relative error {err}"


def test_reference_hard_sample_is_the_argmax_of_logits_plus_noise():
    """At tau = 1e8 exp((u - max) / tau) rounds to 1 for most entries: the soft sample's argmax
    is no longer that of u = logits + g, the Gumbel-max draw the kernels take."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen)
    y, _, state = fwd(x, 1e8, -1, True, False, gen)
    g = noise_of(x, state, -1)
    yr = reference.gumbel_softmax(x, 1e8, -1, True, noise=g)
    assert torch.equal(yr.argmax(-1), (x + g).argmax(-1))
    assert torch.equal(y, yr)


def test_reference_kl_gradient_at_minus_inf_logits():
    # d KL / d x_v = p_v (log p_v - sum p log p), 0 where x_v = -inf (not NaN over the position).
    x = torch.randn(3, 6, dtype=torch.float64)
    x[:, 2] = float("-inf")
    xr = x.clone().requires_grad_()
    _, kl = reference.gumbel_softmax_kl(xr, 1.0, 1, noise=torch.zeros_like(x, dtype=torch.float32))
    (got,) = torch.autograd.grad(kl.sum(), xr)
    p, log_p = torch.softmax(x, 1), torch.log_softmax(x, 1).nan_to_num(neginf=0.0)
    torch.testing.assert_close(got, p * (log_p - (p * log_p).sum(1, keepdim=True)))
    assert (got[:, 2] == 0).all()


def float_limit_logits(shape, dim, device, seed):
    """Logits up to float32's largest number (|logits + g| / tau far past it at small tau), with
    ties at +-max, a -inf entry per position, one position of -inf only and one of max only."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.finfo(torch.float32).max
    x = torch.randn(shape, generator=gen).clamp(-3, 3) * 1e38
    x = x.movedim(dim, -1)  # a view: positions first, the softmax dimension last
    x[..., 1] = big
    x[..., 2] = big
    x[..., 3] = -big
    x[..., 4] = float("-inf")
    flat = x.reshape(-1, x.shape[-1])
    flat[1] = float("-inf")
    flat[2] = big
    return x.movedim(-1, dim).contiguous().to(device), flat.shape[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_dim", [((2, 24, 3, 5), 1), ((6, 37), -1)])
def test_logits_up_to_the_float_limit_give_the_formula(device, shape_dim):
    # The kernels subtract each position's max of logits + g before dividing by tau: no finite
    # input overflows, at either end of the range tau may take. A position whose logits are all
    # -inf gets y = 0 and a zero gradient (the formula has no distribution there: NaN).
    shape, dim = shape_dim
    x, _ = float_limit_logits(shape, dim, device, 5)
    for one_read in ([True, False] if device == "cuda" else [True]):
        for tau in (1e-30, 0.1, 1.0, 1e30):
            with cuda_one_read_kernel(one_read):
                gen = torch.Generator(device=device).manual_seed(7)
                y, kl, state = fwd(x, tau, dim, False, True, gen)
                yh, _, state_h = fwd(x, tau, dim, True, False, torch.Generator(device=device).manual_seed(7))
            g = noise_of(x, state, dim)
            yr, klr = reference.gumbel_softmax_kl(x, tau, dim, noise=g)
            what = f"{device}, tau {tau}, one-read {one_read}"
            none_live = (x == float("-inf")).all(dim)
            assert torch.isfinite(y).all(), what
            assert torch.isfinite(kl[~none_live]).all(), what
            assert (y.sum(dim)[none_live] == 0).all(), what
            close(y, torch.nan_to_num(yr, nan=0.0), torch.float32, f"y ({what})")
            close(kl[~none_live], klr[~none_live], torch.float32, f"kl ({what})")
            # hard: the one-hot of the first argmax of logits + g (the same noise)
            assert torch.equal(state, state_h), what
            live = ~none_live.unsqueeze(dim).expand_as(x)
            first_max = (x + g).argmax(dim, keepdim=True)
            assert torch.equal(yh, torch.zeros_like(x).scatter_(dim, first_max, 1.0)), what
            dy, dkl = torch.randn_like(x), torch.randn_like(kl)
            with cuda_one_read_kernel(one_read):
                dx = bwd(dy, dkl, x, y, state, tau, dim, False)
                dx_hard = bwd(dy, None, x, yh, state, tau, dim, True)
                dx_soft = bwd(dy, None, x, y, state, tau, dim, False)
            assert torch.isfinite(dx).all() and torch.isfinite(dx_hard).all(), what
            assert (dx[~live] == 0).all(), what
            torch.testing.assert_close(dx_hard, dx_soft, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")
            # The formula in float64 on the sample (held to the reference above): the float32
            # autograd of the reference overflows here (dkl * log p at log p near -FLT_MAX).
            ys, g64, x64 = y.double(), dy.double(), x.double()
            expected = ys * (g64 - (ys * g64).sum(dim, keepdim=True)) / tau
            p, log_p = torch.softmax(x64, dim), torch.log_softmax(x64, dim).nan_to_num(neginf=0.0)
            expected = expected + dkl.double().unsqueeze(dim) * p * (log_p - (p * log_p).sum(dim, keepdim=True))
            expected = torch.where(live, expected, 0.0)
            scale = expected.abs().max().item() + 1e-6
            assert (dx.double() - expected).abs().max().item() / scale <= GRAD_TOL[torch.float32], what


def test_noise_is_finite_at_the_extreme_uniforms():
    lo, hi = _C.gumbel_from_bits(0), _C.gumbel_from_bits(0xFFFFFFFF)
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo == pytest.approx(-math.log(-math.log(2.0**-24)), rel=1e-6)
    assert hi == pytest.approx(-math.log(-math.log1p(-(2.0**-24))), rel=1e-5)
    bits = [0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 1]
    u = [((b >> 9) + 0.5) / 2**23 for b in bits]
    for b, uu in zip(bits, u):
        assert _C.gumbel_from_bits(b) == pytest.approx(-math.log(-math.log(uu)), rel=2e-6, abs=1e-6)


def test_noise_matches_float64_across_the_uniforms():
    # Every top-23-bit value near both ends (where each log loses the most) and a stride through the
    # rest: the float32 noise stays within 1e-6 of -log(-log(u)) in float64 (measured over all
    # 2^23 values: at most 5.3e-7).
    ks = list(range(4096)) + list(range(2**23 - 4096, 2**23)) + list(range(4096, 2**23 - 4096, 997))
    worst = max(abs(_C.gumbel_from_bits(k << 9) + math.log(-math.log((k + 0.5) / 2**23))) for k in ks)
    assert worst <= 1e-6


def test_noise_is_standard_gumbel():
    _, _, state = fwd(torch.zeros(1, 4, 250_000), 1.0, 1, False, False, torch.Generator().manual_seed(2))
    g = noise_of(torch.zeros(1, 4, 250_000), state, 1).double()
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni
    assert g.var().item() == pytest.approx(math.pi**2 / 6, rel=0.02)


def test_non_contiguous_logits():
    x = torch.randn(2, 9, 4, 4).to(memory_format=torch.channels_last)
    y, kl, state = fwd(x, 1.0, 1, False, True, None)
    yr, klr = reference.gumbel_softmax_kl(x, 1.0, 1, noise=noise_of(x.contiguous(), state, 1))
    torch.testing.assert_close(y, yr, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(kl, klr, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("with_kl, hard", [(False, False), (True, False), (False, True)])
def test_opcheck(with_kl, hard):
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    # The sample is random, so opcheck's run-twice comparisons need a fixed generator per run:
    # test_schema and friends call the op repeatedly with the same arguments.
    torch.library.opcheck(fwd.default, (x, 0.5, 1, hard, with_kl, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, kl, state = fwd(x.detach(), 0.5, 1, hard, with_kl, None)
    grad_kl = torch.randn(2, 3, 3) if with_kl else None
    torch.library.opcheck(bwd.default, (torch.randn_like(y), grad_kl, x.detach(), y, state, 0.5, 1, hard))


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ops.gumbel_softmax(x, tau=0), ValueError, "tau must be a positive"),
    (lambda x: ops.gumbel_softmax(x, tau=-1.0), ValueError, "tau must be a positive"),
    (lambda x: ops.gumbel_softmax(x, tau=float("inf")), ValueError, "tau must be a positive"),
    (lambda x: ops.gumbel_softmax(x, tau=1e-39), ValueError, r"tau must be a positive number in \[1e-30, 1e\+30\]"),
    (lambda x: ops.gumbel_softmax(x, tau=1e39), ValueError, "tau must be a positive"),
    (lambda x: fwd(x, 1e-39, 1, True, False, None), ValueError, "tau must be a positive number in"),
    (lambda x: fwd(x, 1e39, 1, False, False, None), ValueError, "tau must be a positive number in"),
    (lambda x: ops.gumbel_softmax(x[:0]), ValueError, "non-empty"),
    (lambda x: ops.gumbel_softmax(x.long()), TypeError, "floating"),
    (lambda x: ops.gumbel_softmax(x, dim=4), ValueError, "out of range"),
    (lambda x: ops.gumbel_softmax(x, generator=3), TypeError, "torch.Generator"),
    (lambda x: fwd(x, 0.0, 1, False, False, None), ValueError, "tau must be a positive"),
    (lambda x: fwd(x.double(), 1.0, 1, False, False, None), TypeError, "float32, float16 or bfloat16"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(2, 5, 3, 3))


def test_one_read_kernel_switch_takes_only_its_settings():
    before = os.environ.get("DALLE_FAST_GUMBEL_RESIDENT")
    for setting, value in ((True, "1"), (False, "0"), ("require", "require")):
        with cuda_one_read_kernel(setting):
            assert os.environ["DALLE_FAST_GUMBEL_RESIDENT"] == value
        assert os.environ.get("DALLE_FAST_GUMBEL_RESIDENT") == before
    with pytest.raises(ValueError, match="require"):
        with cuda_one_read_kernel("yes"):
            pass


def test_float64_falls_back_to_reference():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="falls back"):
        y = ops.gumbel_softmax(x)
    assert y.dtype == torch.float64
    with ops.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda t: reference.gumbel_softmax(t, 0.5, 1, noise=torch.ones_like(t, dtype=torch.float32)), (x,))


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_cuda_on_the_same_noise(dtype):
    x = (torch.randn(3, 40, 8, 8) * 2).to(dtype)
    _, _, state = fwd(x, 0.5, 1, False, False, None)
    assert torch.equal(noise_of(x, state, 1), noise_of(x.cuda(), state.cuda(), 1).cpu())
    y_cuda, kl_cuda, state_cuda = fwd(x.cuda(), 0.5, 1, False, True, None)
    g = noise_of(x.cuda(), state_cuda, 1).cpu()
    yr, klr = reference.gumbel_softmax_kl(x.float(), 0.5, 1, noise=g)
    close(y_cuda.cpu(), yr, dtype, "cuda y")
    close(kl_cuda.cpu(), klr, dtype, "cuda kl")
    dy = torch.randn_like(x)
    cpu_grad = bwd(dy, None, x, yr.to(dtype), state_cuda.cpu(), 0.5, 1, False)
    cuda_grad = bwd(dy.cuda(), None, x.cuda(), y_cuda, state_cuda, 0.5, 1, False).cpu()
    close(cuda_grad, cpu_grad, dtype, "cuda grad")
