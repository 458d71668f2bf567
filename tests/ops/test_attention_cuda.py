"""sparse_attention on CUDA (skipped without a GPU).

fp16 / bf16 with head dims 32, 64, 128 run the flash-style tensor-core forward (flash_fwd.cu);
other dtypes and dims run the one-warp-per-row kernels. Low-precision results follow the
flash-attention rule: the kernel's error against an fp32 reference is at most twice the error
of the dense reference computed in the same low precision (plus a small floor), for the output
and for every gradient.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast import ops
from dalle_fast.ops import KINDS
from tests.conftest import assert_close, assert_within_reference_error, requires_cuda, requires_kernels

pytestmark = [requires_kernels, requires_cuda]

LOW = (torch.float16, torch.bfloat16)


def make_qkv(B, H, T, S, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T + S * S, D, generator=gen).to("cuda", dtype) for _ in range(3)]


def run(backend, q, k, v, kind, T, S, kernel, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with ops.backend(backend):
        out = ops.sparse_attention(q, k, v, kind, T, S, kernel)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def check_low_precision(q, k, v, kind, T, S, kernel, seed=0):
    dtype = q.dtype
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to("cuda", dtype)
    ref32 = run("reference", q.float(), k.float(), v.float(), kind, T, S, kernel, grad.float())
    ref_lp = run("reference", q, k, v, kind, T, S, kernel, grad)
    ours = run("cuda", q, k, v, kind, T, S, kernel, grad)
    for name, got, lp, want in zip(("out", "dq", "dk", "dv"), ours, ref_lp, ref32):
        assert got.dtype == dtype and torch.isfinite(got).all(), f"{name}: dtype or non-finite values"
        assert_within_reference_error(got, lp, want, f"{name} {kind} T={T} S={S} k={kernel} {tuple(q.shape)} {dtype}")


@given(kind=st.sampled_from(KINDS), B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 80),
       S=st.integers(1, 12), D=st.sampled_from([32, 64, 128]), kernel=st.sampled_from([1, 3, 11]),
       dtype=st.sampled_from(LOW), seed=st.integers(0, 2**16))
def test_tensor_core_forward_low_precision(kind, B, H, T, S, D, kernel, dtype, seed):
    check_low_precision(*make_qkv(B, H, T, S, D, dtype, seed), kind, T, S, kernel, seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128])
def test_paper_layout_low_precision(kind, dtype, D):
    # N = 1280: many 64-key chunks per query tile, full and partial ones, column-major order.
    check_low_precision(*make_qkv(2, 2, 256, 32, D, dtype, seed=D), kind, 256, 32, 11)


@given(kind=st.sampled_from(KINDS), T=st.integers(1, 40), S=st.integers(1, 9),
       D=st.sampled_from([8, 33, 64]), dtype=st.sampled_from(LOW), seed=st.integers(0, 2**16))
def test_other_head_dims_low_precision(kind, T, S, D, dtype, seed):
    check_low_precision(*make_qkv(2, 2, T, S, D, dtype, seed), kind, T, S, 5, seed)


@given(kind=st.sampled_from(KINDS), B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40),
       S=st.integers(1, 9), D=st.sampled_from([1, 16, 33, 64, 128]), seed=st.integers(0, 2**16))
def test_fp32_matches_reference(kind, B, H, T, S, D, seed):
    q, k, v = make_qkv(B, H, T, S, D, torch.float32, seed)
    grad = torch.randn_like(q)
    for name, got, want in zip(("out", "dq", "dk", "dv"), run("cuda", q, k, v, kind, T, S, 11, grad),
                               run("reference", q, k, v, kind, T, S, 11, grad)):
        assert_close(got, want, f"{name} {kind} T={T} S={S} D={D}")


@pytest.mark.parametrize("kind", KINDS)
def test_unaligned_and_strided_inputs(kind):
    # Rows that are not 16-byte aligned take the one-warp-per-row kernel; strided views with
    # aligned rows take the tensor-core one. Both must agree with the reference.
    B, H, T, S, D = 2, 3, 9, 6, 64
    base = torch.randn(B, T + S * S, H, 3 * D + 1, device="cuda", dtype=torch.bfloat16)
    q, k, v = (base[..., 1 + i * D: 1 + (i + 1) * D].transpose(1, 2) for i in range(3))  # unaligned
    check_low_precision(q, k, v, kind, T, S, 3)
    wide = torch.randn(B, T + S * S, H, 3 * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in wide.split(D, dim=-1))  # aligned, strided
    check_low_precision(q, k, v, kind, T, S, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_cuda(kind, dtype):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 4, 3, 32, dtype, seed=2))
    args = (q, k, v, kind, 4, 3, 3, 0.3)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_fwd.default, args)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), kind, 4, 3, 3, 0.3)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_attention_bwd.default, bwd)


@pytest.mark.parametrize("scale", [0.125, -0.3, 0.0])
@pytest.mark.parametrize("kind", KINDS)
def test_output_and_lse_for_any_finite_scale(kind, scale):
    from dalle_fast.ops import reference

    q, k, v = make_qkv(2, 2, 20, 7, 64, torch.bfloat16, seed=3)
    out, lse = torch.ops.dalle_fast.sparse_attention_fwd(q, k, v, kind, 20, 7, 5, scale)
    want = reference.sparse_attention_lse(q.float(), k.float(), kind, 20, 7, 5, scale)
    torch.testing.assert_close(lse, want, atol=3e-2, rtol=1e-2)
    expected = reference.sparse_attention(q.float(), k.float(), v.float(), kind, 20, 7, 5, scale)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_runs_on_a_side_stream_without_host_sync():
    q, k, v = make_qkv(2, 2, 16, 8, 64, torch.float16, seed=4)
    with ops.backend("cuda"):
        ops.sparse_attention(q, k, v, "row", 16, 8)  # first call: uploads the tile plan
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = ops.sparse_attention(q, k, v, "row", 16, 8)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        stream.synchronize()
        assert_close(out, ops.sparse_attention(q, k, v, "row", 16, 8), "side stream")


def test_one_warp_per_row_path_matches_the_tensor_core_path(tmp_path):
    # DALLE_FAST_FLASH=0 is read once per process: compare in a child process.
    import subprocess
    import sys

    code = """
import torch
from dalle_fast import ops
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 3, 20 + 49, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
with ops.backend("cuda"):
    torch.save([ops.sparse_attention(q, k, v, kind, 20, 7).cpu() for kind in ops.KINDS], "OUT")
"""
    outs = []
    for flag in ("1", "0"):
        path = str(tmp_path / f"flash_{flag}.pt")
        env = dict(__import__("os").environ, DALLE_FAST_FLASH=flag)
        result = subprocess.run([sys.executable, "-c", code.replace("OUT", path)], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outs.append(torch.load(path, weights_only=True))
    for kind, a, b in zip(KINDS, *outs):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{kind}: {m}")
