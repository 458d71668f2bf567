"""sparse_attention: our kernels against the dense reference, values and gradients."""

import math
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast import ops
from dalle_fast.ops import KINDS, reference
from tests.conftest import DEVICES, assert_close, num_threads, requires_kernels

pytestmark = requires_kernels


def make_qkv(B, H, T, S, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, H, T + S * S, D)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) for _ in range(3)]


# The CPU backward has two schedules, picked by the thread count (csrc/attention/cpu/attention_bwd.cpp):
# one thread per head when batch * heads >= 2 * threads, else parallel over query and key tiles.
# A comparison that left the thread count to the machine ran only the tile schedule on a 16-core
# one (batch * heads <= 9 here), so each pins the count that makes it run the schedule it names.
SCHEDULES = ("per_head", "tiles")


def threads_for(schedule, heads):
    """A thread count at which the backward over `heads` = batch * heads heads runs `schedule`."""
    if schedule == "per_head":
        if heads < 2:
            raise ValueError("a single head takes the tile schedule at any thread count")
        return max(1, heads // 2)  # heads >= 2 * threads
    return max(2, heads // 2 + 1)  # heads < 2 * threads, on more than one thread


def check_against_reference(q, k, v, kind, T, S, kernel, scale=None, backend="auto", schedule=None):
    """Output and gradients of sparse_attention against the dense reference; `schedule` (for the
    CPU kernel) pins the thread count that selects the backward's schedule, see SCHEDULES."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    threads = threads_for(schedule, q.shape[0] * q.shape[1]) if schedule else torch.get_num_threads()
    with num_threads(threads):
        with ops.backend(backend):
            out = ops.sparse_attention(q, k, v, kind, T, S, kernel, scale)
        grad = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    expected = reference.sparse_attention(q, k, v, kind, T, S, kernel, scale)
    rq, rk, rv = torch.autograd.grad(expected, (q, k, v), grad)
    what = f"{kind} T={T} S={S} k={kernel} shape={tuple(q.shape)} {q.dtype} schedule={schedule} threads={threads}"
    assert_close(out, expected, f"out {what}")
    assert_close(dq, rq, f"dq {what}")
    assert_close(dk, rk, f"dk {what}")
    assert_close(dv, rv, f"dv {what}")


@given(
    kind=st.sampled_from(KINDS),
    B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 40), S=st.integers(1, 9),
    D=st.sampled_from([1, 3, 8, 16, 33, 64]), kernel=st.sampled_from([1, 3, 5, 11]),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
    schedule=st.sampled_from(SCHEDULES),
)
def test_matches_reference(kind, B, H, T, S, D, kernel, dtype, seed, schedule):
    if schedule == "per_head" and B * H == 1:
        H = 2  # one head cannot run the per-head schedule
    q, k, v = make_qkv(B, H, T, S, D, dtype, seed=seed)
    check_against_reference(q, k, v, kind, T, S, kernel, backend="cpu", schedule=schedule)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T, S, D", [(1, 1, 8), (1, 3, 8), (3, 1, 5), (256, 32, 64), (7, 5, 32), (64, 8, 128)])
def test_edge_and_paper_sizes(kind, T, S, D):
    # One head (tile schedule only) and several heads under each backward schedule.
    for B, H, schedule in ((1, 1, "tiles"), (2, 4, "per_head"), (2, 4, "tiles")):
        if T == 256 and B * H == 8:
            H = 1
        q, k, v = make_qkv(B, H, T, S, D, seed=T + S)
        check_against_reference(q, k, v, kind, T, S, 11, backend="cpu", schedule=schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scale_and_large_logits(schedule):
    # Scores in the thousands: the online softmax must not overflow. float64, so that the
    # reference's own rounding (large in float32 here) does not hide an error.
    q, k, v = make_qkv(2, 2, 5, 4, 16, torch.float64, seed=3)
    check_against_reference(q * 30, k * 30, v, "conv", 5, 4, 3, scale=0.7, backend="cpu", schedule=schedule)
    q, k, v = make_qkv(1, 2, 5, 4, 16, torch.float32, seed=3)
    with ops.backend("cpu"):
        assert torch.isfinite(ops.sparse_attention(q * 1e3, k * 1e3, v, "row", 5, 4)).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_non_contiguous_inputs(schedule):
    B, H, T, S, D = 2, 3, 6, 4, 16
    N = T + S * S
    base = torch.randn(B, N, H, 3 * D, dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in base.split(D, dim=-1))  # [B, H, N, D], strided
    assert not q.is_contiguous()
    check_against_reference(q, k, v, "row", T, S, 11, backend="cpu", schedule=schedule)
    qt = torch.randn(B, H, D, N, dtype=torch.float64).transpose(-1, -2)  # last dim not contiguous
    check_against_reference(qt, k, v, "column", T, S, 11, backend="cpu", schedule=schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind, schedule):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 3, 3, 4, torch.float64, seed=1))
    with ops.backend("cpu"), num_threads(threads_for(schedule, 2)):
        assert torch.autograd.gradcheck(lambda a, b, c: ops.sparse_attention(a, b, c, kind, 3, 3, 3), (q, k, v))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 4, 3, 8, seed=2))
    args = (q, k, v, kind, 4, 3, 3, 0.3)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_fwd.default, args)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), kind, 4, 3, 3, 0.3)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_bwd.default, bwd_args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 4, 3, 8, seed=4)

    def f(q, k, v):
        return (ops.sparse_attention(q, k, v, "conv", 4, 3, 3) * 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (q, k, v)]
    comp_in = [t.clone().requires_grad_() for t in (q, k, v)]
    with ops.backend("cpu"):
        ye, yc = f(*eager_in), compiled(*comp_in)
        ye.backward()
        yc.backward()
    assert_close(yc, ye, "compiled value")
    for a, b in zip(comp_in, eager_in):
        assert_close(a.grad, b.grad, "compiled grad")


def test_compile_with_dynamic_shapes_and_the_default_scale():
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: ops.sparse_attention(q, k, v, "row", 4, 3), fullgraph=True,
                             dynamic=True)
    for batch in (1, 2):
        q, k, v = make_qkv(batch, 2, 4, 3, 8, seed=batch)
        with ops.backend("cpu"):
            assert_close(compiled(q, k, v), ops.sparse_attention(q, k, v, "row", 4, 3), "dynamic compile")


@pytest.mark.parametrize("heads, schedule", [(1, "tiles"), (8, "tiles"), (8, "per_head")])
def test_deterministic(heads, schedule):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, heads, 16, 6, 32, seed=5))
    results = []
    for _ in range(2):
        with ops.backend("cpu"), num_threads(threads_for(schedule, heads)):
            out = ops.sparse_attention(q, k, v, "causal", 16, 6)
            results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch, heads, thread_counts", [(1, 2, (2, 3, 8)), (1, 3, (2, 3, 8)), (2, 5, (1, 2, 3, 5)),
                                                        (1, 12, (1, 2, 6))])
def test_backward_bits_do_not_depend_on_the_thread_count_within_a_schedule(batch, heads, thread_counts):
    """No two threads write the same row, so how the work is split among threads never changes a
    bit; only the choice of schedule (batch * heads >= 2 * threads: one thread per head) does,
    and these thread counts all make the same choice (README)."""
    q, k, v = make_qkv(batch, heads, 16, 6, 32, seed=7)
    dout = torch.randn_like(q)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in thread_counts:
            torch.set_num_threads(n)
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            with ops.backend("cpu"):
                out = ops.sparse_attention(qq, kk, vv, "conv", 16, 6, 5)
            results.append(torch.autograd.grad(out, (qq, kk, vv), dout))
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), results[0], grads):
            assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max()}"


def test_default_scale_is_inverse_sqrt_dim():
    q, k, v = make_qkv(1, 1, 3, 2, 16, torch.float64, seed=6)
    with ops.backend("cpu"):
        a = ops.sparse_attention(q, k, v, "row", 3, 2)
        b = ops.sparse_attention(q, k, v, "row", 3, 2, scale=1 / math.sqrt(16))
    assert torch.equal(a, b)


@pytest.mark.parametrize("mutate, error, message", [
    (lambda q, k, v: (q[0], k[0], v[0]), ValueError, r"\[B, H, N, D\]"),
    (lambda q, k, v: (q[:, :, :-1], k[:, :, :-1], v[:, :, :-1]), ValueError, "text_len \\+ grid\\*\\*2"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, "same shape"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "same dtype"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "same device"),
])
def test_bad_inputs(mutate, error, message):
    q, k, v = make_qkv(1, 2, 4, 3, 8)
    with pytest.raises(error, match=message):
        ops.sparse_attention(*mutate(q, k, v), "row", 4, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="diagonal"), "unknown attention kind"),
    (dict(kernel=4), "odd"),
    (dict(kernel=0), "odd"),
    (dict(scale=float("nan")), "scale must be finite"),
])
def test_bad_arguments(kwargs, message):
    q, k, v = make_qkv(1, 2, 4, 3, 8)
    args = dict(kind="conv", text_len=4, grid=3, kernel=3) | kwargs
    with pytest.raises(ValueError, match=message):
        ops.sparse_attention(q, k, v, **args)


def test_compiled_op_validates_too():
    """Direct callers of torch.ops.dalle_fast get the same named errors from C++."""
    q, k, v = make_qkv(1, 2, 4, 3, 8)
    with pytest.raises(ValueError, match="text_len \\+ grid\\*\\*2"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "row", 5, 3, 11, 1.0)
    with pytest.raises(ValueError, match="unknown attention kind"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "diag", 4, 3, 11, 1.0)
    with pytest.raises(ValueError, match="odd"):
        torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "conv", 4, 3, 2, 1.0)
    with pytest.raises(TypeError, match="float32 and float64"):
        torch.ops.dalle_fast.sparse_attention_fwd(q.half(), k.half(), v.half(), "row", 4, 3, 11, 1.0)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "row", 4, 3, 11, scale)


def test_compiled_op_refuses_a_grid_whose_square_overflows():
    """text_len + grid**2 in int64: grid = 2**32 wrapped it to text_len, so q, k, v of N = text_len
    passed the shape check and ran with a mask of 2**64 image positions."""
    q, k, v = make_qkv(1, 2, 4, 3, 8)  # N = 13
    for grid in (2**32, 2**31 * 3, 2**62):
        with pytest.raises(ValueError, match="does not fit in int64"):
            torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "row", 13, grid, 11, 1.0)
    with pytest.raises(ValueError, match="does not fit in int64"):  # text_len pushes it over
        torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "row", 2**63 - 2**62, 2**31, 11, 1.0)


def test_the_ops_lse_output_is_not_differentiable():
    """lse is the backward's input, not a result: a loss on it is refused rather than given no gradient."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 4, 3, 8))
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, "row", 4, 3, 11, 0.5)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_backend_selection():
    q, k, v = make_qkv(1, 1, 4, 3, 8)
    bf = [t.bfloat16() for t in (q, k, v)]
    with ops.backend("cpu"), pytest.raises(RuntimeError, match="supports"):
        ops.sparse_attention(*bf, "row", 4, 3)
    with pytest.warns(RuntimeWarning, match="falls back to the dense PyTorch reference"):
        out = ops.sparse_attention(*bf, "row", 4, 3)  # auto: reference for bf16 on CPU
    assert out.dtype == torch.bfloat16
    with ops.backend("cuda"), pytest.raises(RuntimeError, match="inputs of sparse_attention are on cpu"):
        ops.sparse_attention(q, k, v, "row", 4, 3)
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.backend("tpu"):
            pass
    with ops.backend("reference"):
        assert ops.current_backend() == "reference"
    assert ops.current_backend() == "auto"


def test_empty_batch():
    q, k, v = make_qkv(0, 2, 4, 3, 8)
    with ops.backend("cpu"):
        assert ops.sparse_attention(q, k, v, "row", 4, 3).shape == q.shape


def test_backend_info_names_missing_backends():
    info = ops.backend_info()
    assert info["reference"]["available"] and info["cpu"]["available"]
    assert isinstance(info["cuda"]["why"], str) and info["cuda"]["why"]


def test_the_cpu_kernels_run_a_vector_version_where_torch_does():
    """The kernels are compiled per instruction set and picked at load time. arch=haswell was
    picked by CPU model, so an AMD Zen 3 with AVX2 ran the SSE2 version (gumbel_softmax 13x
    slower); the pick must follow the CPU's features, as torch's own does. The AVX-512 version
    must have FMA and F16C too: a bare "avx512f" clone had neither, and an AVX-512 CPU ran the
    float16 Gumbel kernels 3x slower than F.gumbel_softmax."""
    from dalle_fast.ops import _backend

    clone = _backend.CPU_CLONE
    assert clone == _backend._C.cpu_clone() and clone in ops.backend_info()["cpu"]["why"]
    compiler = _backend.BUILD_INFO["compiler"]
    if not (platform.machine() == "x86_64" and sys.platform == "linux" and "gcc" in compiler):
        pytest.skip("one build for every CPU: no versions to pick from")
    # GCC 12 dispatches the psABI levels by feature; older ones have no such clone to offer
    levels = int(compiler.split()[1].split(".")[0]) >= 12
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        assert clone == ("arch=x86-64-v4" if levels else "avx512f"), (clone, capability)
    elif capability == "AVX2":
        assert clone == ("arch=x86-64-v3" if levels else "avx2"), (clone, capability)


def test_works_without_compiled_library():
    """With dalle_fast._C unimportable the package falls back to the reference, warning once."""
    code = """
import sys, warnings
sys.modules["dalle_fast._C"] = None  # makes importing dalle_fast._C raise ImportError
import torch, dalle_fast
from dalle_fast import ops
info = dalle_fast.backend_info()
assert not info["cpu"]["available"] and "could not be imported" in info["cpu"]["why"], info
q = torch.randn(1, 2, 13, 8, requires_grad=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = ops.sparse_attention(q, q, q, "row", 4, 3)
    ops.sparse_attention(q, q, q, "row", 4, 3)
    ops.gumbel_softmax(q, 0.5, dim=-1)  # another op: still the one warning
assert len(caught) == 1 and "falls back" in str(caught[0].message), [str(c.message) for c in caught]
assert "circular import" not in str(caught[0].message), str(caught[0].message)
torch.testing.assert_close(out, ops.reference.sparse_attention(q, q, q, "row", 4, 3))
out.sum().backward()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_matches_cuda_kernel(kind):
    q, k, v = make_qkv(2, 3, 16, 8, 64, seed=7)
    with ops.backend("cpu"):
        cpu = ops.sparse_attention(q, k, v, kind, 16, 8)
    with ops.backend("cuda"):
        gpu = ops.sparse_attention(q.cuda(), k.cuda(), v.cuda(), kind, 16, 8)
    assert_close(gpu.cpu(), cpu, f"cpu vs cuda {kind}")


def test_double_backward_says_unsupported():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 3, 2, 4, torch.float64))
    with ops.backend("cpu"):
        out = ops.sparse_attention(q, k, v, "row", 3, 2)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()
