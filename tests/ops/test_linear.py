"""skinny_linear: the sampling step's linear layers (bias, GELU, residual add fused), kernel vs reference."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle_fast import ops
from dalle_fast.ops import linear, reference
from dalle_fast.prior import Prior, PriorConfig
from tests.conftest import num_threads, requires_cuda, requires_kernels

pytestmark = requires_kernels


def make_inputs(m, k, n, dtype, device="cpu", seed=0, bias=True, residual=True, row_pad=0):
    """x [m, k] (rows row_pad apart beyond k: a view), w [n, k], b [n] and r [m, n] or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    r = torch.randn(m, n, generator=gen, dtype=torch.float64) if residual else None
    rows = torch.zeros(m, k + row_pad, device=device, dtype=dtype)
    rows[:, :k] = x.to(device, dtype)
    return (rows[:, :k], *(None if t is None else t.to(device, dtype) for t in (w, b, r)))


def expected(x, w, b, r, activation, norm=None):
    """The reference in float64 from the same (rounded) inputs, the result rounded to x's dtype;
    with a norm, its output rounded to x's dtype too, as the layer (and the kernel) store it."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    if norm is not None:
        x = F.layer_norm(up(x), norm.normalized_shape, up(norm.weight), up(norm.bias), norm.eps).to(x.dtype)
    return reference.linear(up(x), up(w), up(b), up(r), activation).to(x.dtype)


def make_norm(k, dtype, device, seed):
    norm = torch.nn.LayerNorm(k, eps=1e-5).to(device, dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(k, generator=gen))
        norm.bias.copy_(0.2 * torch.randn(k, generator=gen))
    return norm


def test_reference_is_the_prior_blocks_arithmetic():
    # The sampler's step replaces a Block's proj and MLP by skinny_linear, whose reference must
    # give the Block's own numbers bit for bit.
    torch.manual_seed(0)
    block = Prior(PriorConfig.preset("tiny")).blocks[0]
    attn, fc1, fc2 = block.attn, block.mlp[0], block.mlp[2]
    x, out = torch.randn(3, 2, fc1.in_features), torch.randn(3, attn.cfg.heads, 2, attn.cfg.head_dim)
    h = reference.linear(block.ln_2(x), fc1.weight, fc1.bias, activation="gelu")
    torch.testing.assert_close(reference.linear(h, fc2.weight, fc2.bias, residual=x), x + block.mlp(block.ln_2(x)),
                               rtol=0, atol=0)
    torch.testing.assert_close(reference.linear(attn.concat_heads(out), attn.proj.weight, attn.proj.bias, residual=x),
                               x + attn.merge_heads(out), rtol=0, atol=0)
    torch.testing.assert_close(reference.linear(x, fc1.weight), F.linear(x, fc1.weight), rtol=0, atol=0)


def check_close_f32(out, x, w, b, r, activation, norm=None, what=""):
    """A float32 result against float64 from the same inputs, within an elementwise bound on the
    rounding of a K-term dot product ((K + 4) eps of the sum of the products' magnitudes), of the
    norm (its float32 mean is off by up to (K + 4) eps of the row's largest |x|, which the
    normalised row carries over scaled by 1 / std) and of the epilogue: a product dropped or
    counted twice is far outside it."""
    assert out.dtype == torch.float32 and torch.isfinite(out).all(), what
    k, eps = x.shape[-1], torch.finfo(torch.float32).eps
    with torch.no_grad():
        want = expected(x, w, b, r, activation, norm).double()  # rounded to float32, then widened
        wa = w.double().abs()
        if norm is None:
            xn, norm_err = x.double(), 0
        else:
            xd = x.double()
            rstd = (xd.var(-1, unbiased=False, keepdim=True) + norm.eps).rsqrt()
            xn = (xd - xd.mean(-1, keepdim=True)) * rstd * norm.weight.double() + norm.bias.double()
            norm_err = (k + 4) * eps * xd.abs().amax(-1, keepdim=True) * rstd * (norm.weight.double().abs() @ wa.t())
    magnitude = xn.abs() @ wa.t() + (0 if b is None else b.double().abs())
    bound = (k + 4) * eps * magnitude + norm_err + 4 * eps * want.abs() + 1e-30
    err = (out.double() - want).abs()
    assert (err <= bound).all(), f"{what}: error {(err / bound).max().item():.3g} x the bound"


@pytest.fixture(params=["wide", "narrow"])
def cpu_lanes(request, monkeypatch):
    """The CPU kernel's blocks: 16 lanes on an AVX-512 CPU ("wide"), or the 8-lane ones of the
    AVX2 version ("narrow"; the same on a CPU without AVX-512)."""
    if request.param == "narrow":
        monkeypatch.setenv("DALLE_FAST_LINEAR_AVX512", "0")
    else:
        monkeypatch.delenv("DALLE_FAST_LINEAR_AVX512", raising=False)
    return request.param


@given(m=st.integers(1, 70), k=st.sampled_from([1, 7, 8, 13, 16, 24, 32, 96, 257]),
       n=st.sampled_from([1, 2, 3, 4, 5, 8, 25, 100]),
       lead=st.sampled_from([(), (1,), (2,)]), activation=st.sampled_from([None, "gelu"]),
       with_bias=st.booleans(), with_residual=st.booleans(), with_norm=st.booleans(),
       row_pad=st.sampled_from([0, 1, 8]), offset=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cpu_kernel_matches_reference(cpu_lanes, m, k, n, lead, activation, with_bias, with_residual, with_norm,
                                      row_pad, offset, seed):
    # k around the 8- and 16-lane vectors (a tail, none, only a tail), n around the 3- and 4-column
    # blocks and the 24-column chunks the threads share, rows around the 4-row blocks and past the
    # 64 the kernel takes (the reference then); rows of x apart by more than K (a view), rows with
    # a mean far from 0 for the layer norm's variance, leading dims.
    rows = m * (lead[0] if lead else 1)
    x, w, b, r = make_inputs(rows, k, n, torch.float32, "cpu", seed, with_bias, with_residual, row_pad)
    x += offset
    norm = make_norm(k, torch.float32, "cpu", seed) if with_norm else None
    what = f"rows={rows} k={k} n={n} {activation} bias={with_bias} residual={with_residual} norm={with_norm}"
    with torch.no_grad():  # as the sampler calls it (the norm's parameters require grad)
        out = ops.skinny_linear(x.view(*lead, m, k), w, b, None if r is None else r.view(*lead, m, n), activation, norm)
        assert out.shape == (*lead, m, n)
        check_close_f32(out.reshape(rows, n), x, w, b, r, activation, norm, what)
        assert linear._kernel_takes(x, w, b, r, norm) == (rows <= 64)
        if rows <= 64:  # the wrapper took the kernel: the op itself gives the same bits
            ln = (None, None, 1e-5) if norm is None else (norm.weight, norm.bias, norm.eps)
            direct = torch.ops.dalle_fast.skinny_linear(x, w, b, r, 1 if activation == "gelu" else 0, *ln)
            torch.testing.assert_close(out.reshape(rows, n), direct, rtol=0, atol=0)


@torch.no_grad()
def test_cpu_kernel_rows_do_not_depend_on_the_batch_or_the_threads(cpu_lanes):
    # Each output is one dot product in the kernel's own order: a row gives the same bits alone, in
    # a block of 4, in the last rows of a batch, and on 1 or 2 threads (the sampler's draws do not
    # change with the batch size or the machine's core count).
    x, w, b, r = make_inputs(11, 200, 150, torch.float32, "cpu", 5)
    norm = make_norm(200, torch.float32, "cpu", 5)
    with num_threads(2):
        whole = ops.skinny_linear(x, w, b, r, None, norm)
    for threads in (1, 2):
        with num_threads(threads):
            for i in range(11):
                alone = ops.skinny_linear(x[i:i + 1], w, b, r[i:i + 1], None, norm)
                torch.testing.assert_close(alone, whole[i:i + 1], rtol=0, atol=0)
            torch.testing.assert_close(ops.skinny_linear(x[6:], w, b, r[6:], None, norm), whole[6:], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*falls back to the dense PyTorch reference")
def test_step_linear_checks_its_layer_once_and_gives_skinny_linears_bits():
    x, w, b, r = make_inputs(5, 40, 24, torch.float32)
    norm = make_norm(40, torch.float32, "cpu", 0)
    layer = linear.StepLinear(x, w, b, "gelu", norm)
    assert layer.fits
    with torch.no_grad():
        assert linear.step_takes_kernel(x, [layer])
        want = ops.skinny_linear(x, w, b, r, "gelu", norm)
        torch.testing.assert_close(layer(x, r, direct=True), want, rtol=0, atol=0)
        torch.testing.assert_close(layer(x[None], r[None], direct=True)[0], layer(x, r), rtol=0, atol=0)
        assert not linear.StepLinear(x.double(), w.double()).fits  # a dtype the CPU kernel does not take
        assert not linear.StepLinear(x.repeat(13, 1), w).fits  # 65 rows
        assert not linear.step_takes_kernel(x, [layer, linear.StepLinear(x.repeat(13, 1), w)])
        with linear.skinny_linear_kernel(False):
            assert not linear.step_takes_kernel(x, [layer])
        with ops.backend("reference"):
            assert not linear.step_takes_kernel(x, [layer])
    with torch.enable_grad():  # the norm's parameters require grad: autograd would record the call
        assert not linear.step_takes_kernel(x, [layer])
    with pytest.raises(ValueError, match="activation"):
        linear.StepLinear(x, w, activation="relu")
    with pytest.raises(ValueError, match="norm"):
        linear.StepLinear(x, w, norm=torch.nn.LayerNorm(7))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        linear.StepLinear(x, w.t())


def test_cpu_gelu_keeps_its_relative_accuracy_where_the_erf_form_cancels(cpu_lanes):
    """The CPU kernel's GELU against x * Phi(x) in float64 with Phi from erfc (nn.GELU's
    0.5 x (1 + erf(x / sqrt 2)) cancels, in float64 too, as Phi(x) falls below the epsilon): within
    (16 + 2 x^2) eps relative (ATen's float32 GELU is off by 1700 eps at x = -3 and returns 0 from
    -5.5 down), plus 1e-38 where x * Phi(x) leaves float's normal range (below x = -13)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([torch.linspace(-14, 14, 64 * 500), torch.randn(64 * 100, generator=gen) * 3])
    w, b = torch.ones(1, 1), torch.zeros(1)
    with torch.no_grad():  # k = 1: each output is GELU of one z; 64 rows a call (whole 16 / 8 lanes, tails)
        out = torch.cat([ops.skinny_linear(rows.view(-1, 1), w, b, activation="gelu") for rows in z.split(64)])
        special = ops.skinny_linear(torch.tensor([[float("inf")], [float("nan")], [0.0], [-1e4]]), w, b,
                                    activation="gelu")
    zd, out = z.double(), out.view(-1).double()
    want = zd * 0.5 * torch.erfc(-zd / 2**0.5)
    eps = torch.finfo(torch.float32).eps
    err, bound = (out - want).abs(), (16 + 2 * zd.square()) * eps * want.abs() + 1e-38
    worst = (err / bound).argmax()
    assert (err <= bound).all(), f"error {(err / bound)[worst].item():.3g} x the bound at z = {z[worst].item()}"
    assert special[0].item() == float("inf") and special[1].isnan().item() and (special[2:] == 0).all()


def test_cpu_calls_the_kernel_leaves_to_the_reference():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    for args in ((x.double(), w.double(), b.double()),  # another dtype
                 (x, w.t().contiguous().t(), b),  # a weight not contiguous along K
                 (x.t().contiguous().t(), w, b),  # rows of x not contiguous
                 (x.repeat(17, 1), w, b)):  # 68 rows
        assert not linear._kernel_takes(args[0], args[1], args[2], None)
        torch.testing.assert_close(ops.skinny_linear(*args, activation="gelu"),
                                   reference.linear(*args, activation="gelu"), rtol=0, atol=0)
    # A call autograd records takes the reference (saying so once): every input gets its gradient.
    norm = make_norm(16, torch.float32, "cpu", 1)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dalle_fast: skinny_linear falls back", RuntimeWarning)
        out = ops.skinny_linear(*inputs, activation="gelu", norm=norm)
    grads = torch.autograd.grad(out.square().sum(), [*inputs, norm.weight, norm.bias])
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    wants = torch.autograd.grad(reference.linear(norm(leaves[0]), *leaves[1:], activation="gelu").square().sum(),
                                [*leaves, norm.weight, norm.bias])
    for got, want in zip(grads, wants):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with linear.skinny_linear_kernel(False), torch.no_grad():  # switched off: the reference, bit for bit
        torch.testing.assert_close(ops.skinny_linear(x, w, b, activation="gelu", norm=norm),
                                   reference.linear(norm(x), w, b, activation="gelu"), rtol=0, atol=0)


def test_cpu_op_checks_its_inputs_and_passes_opcheck():
    x, w, b, r = make_inputs(5, 40, 16, torch.float32, "cpu", 4)
    lw, lb = (t.detach() for t in make_norm(40, torch.float32, "cpu", 4).parameters())
    op = torch.ops.dalle_fast.skinny_linear
    with pytest.raises(TypeError, match="float32"):
        op(x.double(), w.double(), None, None, 0, None, None, 1e-5)
    with pytest.raises(TypeError, match="one dtype"):
        op(x, w.double(), None, None, 0, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        op(x, w[:, :39], None, None, 0, None, None, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        op(x, w, None, r[:4], 0, None, None, 1e-5)
    with pytest.raises(ValueError, match="ln_weight"):
        op(x, w, None, None, 0, lw[:39], lb[:39], 1e-5)
    with pytest.raises(ValueError, match="activation"):
        op(x, w, None, None, 2, None, None, 1e-5)
    # layouts the kernel reads another way are copied: a weight not contiguous along K, strided rows
    check_close_f32(op(x.t().contiguous().t(), w.t().contiguous().t(), b, r.t().contiguous().t(), 1, None, None, 1e-5),
                    x, w, b, r, "gelu", what="copied layouts")
    torch.library.opcheck(op.default, (x, w, b, r, 1, lw, lb, 1e-5))
    torch.library.opcheck(op.default, (x, w, None, None, 0, None, None, 1e-5))


def test_which_calls_each_kernel_takes():
    # Shapes and layouts the CUDA kernel needs: at most 64 rows, K % 32 == 0, N % 8 == 0,
    # contiguous 16-byte aligned rows, one dtype (checked on CPU tensors: the predicate is shape only).
    x, w = torch.zeros(16, 512, dtype=torch.bfloat16), torch.zeros(1536, 512, dtype=torch.bfloat16)
    assert linear._cuda_takes(x, w, None, None)
    assert not linear._cuda_takes(torch.zeros(65, 512, dtype=torch.bfloat16), w, None, None)
    assert not linear._cuda_takes(x[:, :500], w[:, :500].contiguous(), None, None)
    assert not linear._cuda_takes(x, w[:1532], None, None)
    assert not linear._cuda_takes(x, w.t().contiguous().t(), None, None)
    assert not linear._cuda_takes(torch.zeros(16, 513, dtype=torch.bfloat16)[:, 1:], w, None, None)  # misaligned
    assert not linear._cuda_takes(x, w.half(), None, None)
    assert not linear._cuda_takes(x, w, torch.zeros(1536), None)
    assert not linear._cuda_takes(x.float(), w.float(), None, None)
    # The CPU kernel's: float32, at most 64 rows, any K and N, rows contiguous along K from any start.
    assert linear._kernel_takes(x.float()[:, 1:], w.float()[:, 1:].contiguous(), None, None)
    assert not linear._kernel_takes(x, w, None, None)
    assert not linear._kernel_takes(torch.zeros(65, 512), w.float(), None, None)


def test_bad_inputs():
    x, w = torch.zeros(4, 8), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="activation"):
        ops.skinny_linear(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        ops.skinny_linear(x, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="bias"):
        ops.skinny_linear(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="residual"):
        ops.skinny_linear(x, w, residual=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="weight"):
        ops.skinny_linear(x, [[0.0] * 8])
    with pytest.raises(ValueError, match="norm"):
        ops.skinny_linear(x, w, norm=torch.nn.LayerNorm(7))
    with pytest.raises(ValueError, match="norm"):
        ops.skinny_linear(x, w, norm=torch.nn.RMSNorm(8))
    with pytest.raises(ValueError, match="enabled"):
        with linear.skinny_linear_kernel("yes"):
            pass
    # one dtype (a float64 residual promoted the result; a float64 bias was F.linear's bare RuntimeError)
    for kw in (dict(residual=torch.zeros(4, 3, dtype=torch.float64)), dict(bias=torch.zeros(3, dtype=torch.float64)),
               dict(weight=w.double())):
        with pytest.raises(TypeError, match=r"x's dtype torch.float32, got (residual|bias|weight) torch.float64"):
            ops.skinny_linear(**(dict(x=x, weight=w) | kw))
    # K = 0 (an empty sum): zeros plus the bias, for any leading shape, as F.linear gives
    empty = ops.skinny_linear(torch.zeros(2, 3, 0), torch.zeros(5, 0), torch.arange(5.0))
    assert torch.equal(empty, torch.arange(5.0).expand(2, 3, 5))
    assert linear.StepLinear(torch.zeros(2, 1, 0), torch.zeros(5, 0)).fits is False


def test_the_op_refuses_to_be_differentiated():
    # No backward: the raw op raises in backward (on meta tensors, which its fake kernel runs)
    # instead of leaving .grad at None with a warning; the wrapper's CUDA test is below.
    x = torch.zeros(4, 32, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.zeros(8, 32, dtype=torch.bfloat16, device="meta")
    out = torch.ops.dalle_fast.skinny_linear(x, w, None, None, 0, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()


def test_switch_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.delenv("DALLE_FAST_SKINNY_LINEAR", raising=False)
    assert linear.kernel_enabled()
    with linear.skinny_linear_kernel(False):
        assert not linear.kernel_enabled()
        with linear.skinny_linear_kernel(True):
            assert linear.kernel_enabled()
        assert not linear.kernel_enabled()
    assert linear.kernel_enabled()


# ---- CUDA -----------------------------------------------------------------------------------

def check_close(out, want, what):
    # One rounding of the result to the dtype, plus float32 accumulation over K products.
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), want.float(), rtol=2 * eps, atol=4 * eps, msg=lambda m: f"{what}: {m}")


@requires_cuda
@given(m=st.integers(1, 64), k=st.sampled_from([32, 64, 96, 512, 2048, 3968]), n=st.sampled_from([8, 16, 520, 2048]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), activation=st.sampled_from([None, "gelu"]),
       with_bias=st.booleans(), with_residual=st.booleans(), with_norm=st.booleans(),
       row_pad=st.sampled_from([0, 8, 40]), offset=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_cuda_kernel_matches_reference(m, k, n, dtype, activation, with_bias, with_residual, with_norm, row_pad,
                                       offset, seed):
    # Every m16 tile count (1-4), k in one or many batches of blocks per warp, rows of x apart by
    # more than K (a view), with and without each part of the prologue and epilogue; rows with a
    # mean far from 0 (offset) for the layer norm's variance.
    x, w, b, r = make_inputs(m, k, n, dtype, "cuda", seed, with_bias, with_residual, row_pad)
    x += offset
    norm = make_norm(k, dtype, "cuda", seed) if with_norm else None
    assert linear._kernel_takes(x, w, b, r, norm)
    ln = (None, None, 1e-5) if norm is None else (norm.weight, norm.bias, norm.eps)
    out = torch.ops.dalle_fast.skinny_linear(x, w, b, r, 1 if activation == "gelu" else 0, *ln)
    check_close(out, expected(x, w, b, r, activation, norm), f"m={m} k={k} n={n} {dtype} {activation} norm={with_norm}")
    with ops.backend("cuda"):
        torch.testing.assert_close(ops.skinny_linear(x, w, b, r, activation, norm), out, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_replays_in_a_graph_and_leaves_other_calls_to_the_reference(dtype):
    x, w, b, r = make_inputs(16, 512, 1536, dtype, "cuda", 3)
    out = torch.empty(16, 1536, device="cuda", dtype=dtype)
    ops.skinny_linear(x, w, b, r, "gelu")  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(ops.skinny_linear(x, w, b, r, "gelu"))
    for seed in range(3):
        x.copy_(make_inputs(16, 512, 1536, dtype, "cuda", 10 + seed)[0])
        graph.replay()
        check_close(out, expected(x, w, b, r, "gelu"), f"replay {seed}")
    # Calls outside the kernel's shapes (a misaligned row start, 65 rows, float32) give the reference.
    xs = torch.zeros(16, 520, device="cuda", dtype=dtype)
    xs[:, 1:513] = x
    for args in ((xs[:, 1:513], w, b, r), (x.repeat(5, 1)[:65], w, b, r.repeat(5, 1)[:65]),
                 tuple(t.float() for t in (x, w, b, r))):
        assert not linear._kernel_takes(args[0], args[1], args[2], args[3])
        torch.testing.assert_close(ops.skinny_linear(*args, "gelu"), reference.linear(*args, "gelu"), rtol=0, atol=0)
    # The op itself copies rows it cannot read by 16 bytes (what a compiled call of such a view gets).
    ws = torch.zeros(1536, 520, device="cuda", dtype=dtype)
    ws[:, 1:513] = w
    for xv, wv in ((xs[:, 1:513], w), (x, ws[:, 1:513]), (xs[:, 1:513], ws[:, 1:513]), (x, ws[:, 8:520])):
        check_close(torch.ops.dalle_fast.skinny_linear(xv, wv, b, r, 1, None, None, 1e-5),
                    expected(x, w, b, r, "gelu"), "a row layout the loads cannot read, copied")
    with linear.skinny_linear_kernel(False):
        torch.testing.assert_close(ops.skinny_linear(x, w, b, r, "gelu"), reference.linear(x, w, b, r, "gelu"),
                                   rtol=0, atol=0)


@requires_cuda
def test_cuda_op_passes_opcheck():
    # Registration, fake (meta) implementation and schema, as torch.compile relies on them.
    x, w, b, r = make_inputs(5, 64, 16, torch.bfloat16, "cuda", 4)
    norm = make_norm(64, torch.bfloat16, "cuda", 4)
    # (the norm's parameters detached: opcheck would differentiate through an op that has no backward)
    torch.library.opcheck(torch.ops.dalle_fast.skinny_linear.default,
                          (x, w, b, r, 1, norm.weight.detach(), norm.bias.detach(), 1e-5))
    torch.library.opcheck(torch.ops.dalle_fast.skinny_linear.default, (x, w, None, None, 0, None, None, 1e-5))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gradients_come_from_the_reference(dtype):
    # A call that autograd records takes the reference, so every input gets its gradient.
    x, w, b, r = make_inputs(16, 64, 32, dtype, "cuda")
    norm = make_norm(64, dtype, "cuda", 3)
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    out = ops.skinny_linear(*inputs, activation="gelu", norm=norm)
    grads = torch.autograd.grad(out.float().square().sum(), [*inputs, norm.weight, norm.bias])
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    want = reference.linear(norm(leaves[0]), *leaves[1:], "gelu")
    wants = torch.autograd.grad(want.float().square().sum(), [*leaves, norm.weight, norm.bias])
    for got, expect in zip(grads, wants):
        torch.testing.assert_close(got, expect)
