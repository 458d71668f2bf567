"""sparse_decode: one sampling step's attention over a KV cache, kernels against the reference."""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from dalle_fast import ops
from dalle_fast.ops import KINDS, reference
from dalle_fast.ops.decode import fused_cache_write
from dalle_fast.sampler import key_offsets
from tests.conftest import DEVICES, assert_close, assert_within_reference_error, requires_cuda, requires_kernels

pytestmark = requires_kernels


def assert_matches_reference(out, q, k, v, offsets, g, T, what=""):
    """A kernel's sparse_decode result against the reference in float64: float16 / bfloat16 by the
    flash-attention rule (within twice the error of the reference computed in that dtype, plus a
    floor; atol = rtol = 2e-2 passed a result that dropped every image key), float32 / float64
    within 1e-5 + 1e-4 relative."""
    scale = 1 / math.sqrt(q.shape[-1])
    want = reference.sparse_decode(q.double(), k.double(), v.double(), offsets, g, T, scale)
    if out.dtype in (torch.float16, torch.bfloat16):
        assert_within_reference_error(out, reference.sparse_decode(q, k, v, offsets, g, T, scale), want, what)
    else:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def make_step(B, H, T, S, D, g, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
    k, v = (torch.randn(B, H, T + S * S, D, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(2))
    return q, k, v, torch.tensor(g, device=device)


@given(kind=st.sampled_from(KINDS), B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 20),
       S=st.integers(1, 7), D=st.sampled_from([1, 5, 13, 16, 64]), kernel=st.sampled_from([1, 3, 5]),
       where=st.floats(0, 1), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_cpu_kernel_matches_reference(kind, B, H, T, S, D, kernel, where, dtype, seed):
    g = min(int(where * S * S), S * S - 1)
    q, k, v, g_t = make_step(B, H, T, S, D, g, dtype, seed=seed)
    offsets = key_offsets(kind, S, kernel)
    with ops.backend("cpu"):
        out = ops.sparse_decode(q, k, v, offsets, g_t, T)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference.sparse_decode(q, k, v, offsets, g_t, T, 1 / math.sqrt(D)), f"{kind} g={g}")


@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_one_row_of_sparse_attention(kind):
    # The decode step's attention is row T + g of the full masked attention.
    B, H, T, S, D, kernel = 2, 2, 5, 4, 8, 3
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T + S * S, D, generator=gen, dtype=torch.float64) for _ in range(3))
    full = reference.sparse_attention(q, k, v, kind, T, S, kernel)
    offsets = key_offsets(kind, S, kernel)
    for g in range(S * S):
        step = ops.sparse_decode(q[:, :, T + g], k, v, offsets, torch.tensor(g), T)
        assert_close(step, full[:, :, T + g], f"{kind} g={g}")


def test_bad_inputs():
    q, k, v, g = make_step(1, 2, 3, 2, 4, 1)
    offsets = key_offsets("row", 2, 1)
    cases = [
        (dict(q=q[..., :3]), ValueError, "shapes"),
        (dict(q=q.unsqueeze(2)), ValueError, r"\[B, H, D\]"),
        (dict(cache_v=v.double()), TypeError, "dtype"),
        (dict(offsets=offsets.int()), TypeError, "int64"),
        (dict(g=g.view(1)), TypeError, "0-dim"),
        (dict(text_len=0), ValueError, "text_len"),
        (dict(text_len=99), ValueError, "text_len"),
    ]
    base = dict(q=q, cache_k=k, cache_v=v, offsets=offsets, g=g, text_len=3)
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            ops.sparse_decode(**(base | change))
    with pytest.raises(ValueError, match="finite"):
        ops.sparse_decode(**base, scale=float("nan"))
    # a g outside the image: the kernel wrote nothing and attended anyway, index_copy_ overwrote a text key
    k0, v0 = k.clone(), v.clone()
    for bad_g in (-1, -3, 4, 99):
        for new in ({}, dict(k_new=q.clone(), v_new=q.clone())):
            for write in (True, False):
                with fused_cache_write(write), pytest.raises(ValueError, match=r"g must be an image position in \[0, "):
                    ops.sparse_decode(**(base | dict(g=torch.tensor(bad_g)) | new))
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_opcheck():
    q, k, v, g = make_step(2, 2, 3, 3, 8, 4)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_decode.default, (q, k, v, key_offsets("conv", 3, 3), g, 3, 0.3))


@pytest.mark.filterwarnings("ignore:.*has no backward and an input requires grad")  # the fallback's, once
def test_gradients_come_from_the_reference():
    # The kernels have no backward: a call that autograd records runs the reference (exact
    # gradients, with the cache write too); a forced kernel backend and the raw ops run the kernel,
    # whose backward raises instead of leaving .grad at None with a warning.
    q, k, v, g = make_step(1, 2, 3, 3, 4, 4, torch.float64)
    offsets, T = key_offsets("conv", 3, 3), 3
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    k_new, v_new = (torch.randn(q.shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.autograd.gradcheck(lambda q, k, v: ops.sparse_decode(q, k, v, offsets, g, T), (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v, kn, vn: ops.sparse_decode(q, k.clone(), v.clone(), offsets, g, T,
                                                                       k_new=kn, v_new=vn), (q, k, v, k_new, v_new))
    out = ops.sparse_decode(q, k.clone(), v.clone(), offsets, g, T, k_new=k_new, v_new=v_new)
    grads = torch.autograd.grad(out.sum(), (k_new, v_new))
    assert all(grad.abs().sum() > 0 for grad in grads), "this step's key and value get no gradient"
    with ops.backend("cpu"), torch.no_grad():
        assert_close(ops.sparse_decode(q, k, v, offsets, g, T), reference.sparse_decode(q, k, v, offsets, g, T, 0.5),
                     "no_grad")
    with ops.backend("cpu"):
        forced = ops.sparse_decode(q, k, v, offsets, g, T)
    raw = [forced, torch.ops.dalle_fast.sparse_decode(q, k, v, offsets, g, T, 0.5),
           torch.ops.dalle_fast.sparse_decode_append(q, k_new, v_new, k.detach().clone(), v.detach().clone(),
                                                     offsets, g, T, 0.5)]
    for out in raw:
        with pytest.raises(RuntimeError, match="not implemented"):
            out.sum().backward()


def check_append(q, k, v, offsets, g, T, backend, qkv_view=False):
    """sparse_decode with k_new / v_new against index_copy_ and the reference: the caches get this
    step's row (exactly) and nothing else; the output is the reference's on the written caches."""
    D = q.shape[-1]
    gen = torch.Generator().manual_seed(int(g) + 1)
    if qkv_view:  # as the sampler's: rows of one [B, 3, H, D] projection
        qkv = torch.randn(q.shape[0], 3, *q.shape[1:], generator=gen, dtype=torch.float64).to(q.device, q.dtype)
        q, k_new, v_new = qkv.unbind(1)
    else:
        k_new, v_new = (torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device, q.dtype) for _ in range(2))
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, T + int(g)] = k_new
    want_v[:, :, T + int(g)] = v_new
    with ops.backend(backend):
        out = ops.sparse_decode(q, k, v, offsets, g, T, k_new=k_new, v_new=v_new)
    for got, expected in ((k, want_k), (v, want_v)):  # bit for bit (NaN where the test put NaN)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert_matches_reference(out, q, want_k, want_v, offsets, g, T, f"append g={int(g)} D={D} {q.dtype}")


@given(kind=st.sampled_from(KINDS), B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 20),
       S=st.integers(1, 7), D=st.sampled_from([1, 5, 13, 16, 64]), where=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), qkv_view=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_kernel_appends_this_steps_key_and_value(kind, B, H, T, S, D, where, dtype, qkv_view, seed):
    g = min(int(where * S * S), S * S - 1)
    q, k, v, g_t = make_step(B, H, T, S, D, g, dtype, seed=seed)
    check_append(q, k, v, key_offsets(kind, S, 3), g_t, T, "cpu", qkv_view)


def test_append_without_the_fused_kernel_and_bad_inputs():
    q, k, v, g = make_step(2, 2, 3, 3, 8, 4)
    offsets = key_offsets("conv", 3, 3)
    with ops.decode.fused_cache_write(False):
        check_append(q, k, v, offsets, g, 3, "auto")  # index_copy_, then the kernel
    with ops.backend("reference"):
        check_append(q, k, v, offsets, g, 3, "reference")
    with pytest.raises(ValueError, match="both"):
        ops.sparse_decode(q, k, v, offsets, g, 3, k_new=q)
    with pytest.raises(ValueError, match="k_new"):
        ops.sparse_decode(q, k, v, offsets, g, 3, k_new=q[:1], v_new=q)
    with pytest.raises(ValueError, match="in place"):
        torch.ops.dalle_fast.sparse_decode_append(q, q, q, k.transpose(2, 3), v.transpose(2, 3), offsets, g, 3, 0.3)
    with pytest.raises(ValueError, match="enabled"):
        with ops.decode.fused_cache_write("yes"):
            pass


def test_append_refuses_caches_sharing_memory():
    """The caches are written in place: an expanded cache (every batch's row in one place) or a
    cache sharing memory with the other or with k_new / v_new is refused, not written silently."""
    q, k, v, g = make_step(2, 2, 3, 3, 8, 4)
    offsets = key_offsets("conv", 3, 3)
    k_new, v_new = q.clone(), q.clone()
    expanded_k, expanded_v = k[:1].expand_as(k), v[:1].expand_as(v)
    for cache_k, cache_v, message in [(expanded_k, v, "sharing memory"), (k, expanded_v, "sharing memory"),
                                      (k, k, "cache_k and cache_v share memory")]:
        with pytest.raises(ValueError, match=message):
            torch.ops.dalle_fast.sparse_decode_append(q, k_new, v_new, cache_k, cache_v, offsets, g, 3, 0.3)
    # k_new / v_new inside a cache's memory (dense views: PyTorch's overlap test gives up on others)
    inside_k, inside_v = (c.reshape(-1)[: q.numel()].view_as(q) for c in (k, v))
    for new, message in [(dict(k_new=inside_k), "cache_k and k_new"), (dict(v_new=inside_v), "cache_v and v_new")]:
        args = dict(k_new=k_new, v_new=v_new) | new
        with pytest.raises(ValueError, match=message):
            torch.ops.dalle_fast.sparse_decode_append(q, args["k_new"], args["v_new"], k, v, offsets, g, 3, 0.3)
    with pytest.raises(ValueError, match="sharing memory"):  # through the Python op too
        ops.sparse_decode(q, expanded_k, v, offsets, g, 3, k_new=k_new, v_new=v_new)


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("g", [2**63 - 2, 2**63 - 1, -(2**63), 2**62])
def test_positions_far_outside_the_cache(append, g):
    """A g (or an offset) near the int64 limits reads only the keys inside the cache and writes
    nothing: the bounds must not be checked by forming text_len + g (it wrapped onto a text row)."""
    B, H, T, S, D = 1, 2, 3, 3, 8
    q, k, v, _ = make_step(B, H, T, S, D, 0)
    k0, v0 = k.clone(), v.clone()
    offsets = torch.tensor([0, 1, 2**62, -(2**63), 2**63 - 1])
    g_t = torch.tensor(g)
    inside = torch.tensor([d for d in offsets.tolist() if 0 <= g - d < S * S], dtype=torch.long)
    want = reference.sparse_decode(q, k, v, inside, g_t, T, 0.3)
    if append:
        out = torch.ops.dalle_fast.sparse_decode_append(q, q.clone(), q.clone(), k, v, offsets, g_t, T, 0.3)
    else:
        out = torch.ops.dalle_fast.sparse_decode(q, k, v, offsets, g_t, T, 0.3)
    assert torch.equal(k, k0) and torch.equal(v, v0), "a position outside the cache was written"
    assert_close(out, want, f"g={g}")


@pytest.mark.filterwarnings("ignore:.*falls back to the dense PyTorch reference")
def test_step_decode_checks_its_layer_once_and_gives_sparse_decodes_bits():
    q, k, v, g = make_step(2, 3, 4, 3, 8, 5)
    offsets = key_offsets("conv", 3, 3)
    k_new, v_new = torch.randn_like(q), torch.randn_like(q)
    k0, v0 = k.clone(), v.clone()
    want_k, want_v = k.clone(), v.clone()
    want = ops.sparse_decode(q, want_k, want_v, offsets, g, 4, 0.3, k_new=k_new, v_new=v_new)
    layer = ops.decode.StepDecode(q, k, v, offsets, 4, 0.3)
    assert layer.fits
    with torch.no_grad():
        assert ops.decode.step_takes_kernel(q, [layer])
        torch.testing.assert_close(layer(q, k_new, v_new, g, direct=True), want, rtol=0, atol=0)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)  # this step's key and value written
        k.copy_(k0), v.copy_(v0)
        torch.testing.assert_close(layer(q, k_new, v_new, g), want, rtol=0, atol=0)  # through ops.sparse_decode
        assert torch.equal(k, want_k) and torch.equal(v, want_v)
        assert not ops.decode.StepDecode(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, offsets, 4).fits
        with ops.decode.fused_cache_write(False):
            assert not ops.decode.step_takes_kernel(q, [layer])
        with ops.backend("reference"):
            assert not ops.decode.step_takes_kernel(q, [layer])
        assert not ops.decode.step_takes_kernel(q.half(), [layer])  # a dtype the CPU kernel does not take
    weight = torch.ones(1, requires_grad=True)
    with torch.enable_grad():  # autograd would record a call whose queries come from `weight`
        assert ops.decode.step_takes_kernel(q, [layer])
        assert not ops.decode.step_takes_kernel(q, [layer], sources=[weight])
        assert not ops.decode.step_takes_kernel(q.requires_grad_(), [layer])
    with pytest.raises(ValueError, match="text_len"):
        ops.decode.StepDecode(q, k, v, offsets, 0)
    with pytest.raises(ValueError, match="shapes disagree"):
        ops.decode.StepDecode(q[:, :2], k, v, offsets, 4)
    with pytest.raises(ValueError, match="finite"):
        ops.decode.StepDecode(q, k, v, offsets, 4, float("nan"))


def test_append_opcheck():
    q, k, v, g = make_step(2, 2, 3, 3, 8, 4)
    torch.library.opcheck(torch.ops.dalle_fast.sparse_decode_append.default,
                          (q, q.clone(), q.clone(), k, v, key_offsets("conv", 3, 3), g, 3, 0.3))


@requires_cuda
@given(kind=st.sampled_from(KINDS), T=st.integers(1, 300), S=st.integers(1, 9), D=st.sampled_from([8, 32, 64, 128]),
       where=st.floats(0, 1), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       qkv_view=st.booleans(), seed=st.integers(0, 2**16))
def test_cuda_kernels_append_this_steps_key_and_value(kind, T, S, D, where, dtype, qkv_view, seed):
    # fp16 / bf16 at D 32, 64, 128: the fast kernel (k_new / v_new rows 16-byte aligned in both
    # layouts), else the general one
    g = min(int(where * S * S), S * S - 1)
    q, k, v, g_t = make_step(2, 3, T, S, D, g, dtype, device="cuda", seed=seed)
    k[:, :, T + g:] = float("nan")  # this step's row too: it must come from k_new / v_new
    v[:, :, T + g:] = float("nan")
    check_append(q, k, v, key_offsets(kind, S, 3).cuda(), g_t, T, "cuda", qkv_view)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_matches_reference_and_replays_in_a_graph(kind, dtype):
    B, H, T, S, D = 3, 4, 17, 6, 64
    q, k, v, g = make_step(B, H, T, S, D, 0, dtype, device="cuda", seed=2)
    offsets = key_offsets(kind, S, 3).cuda()
    out = torch.empty_like(q)
    with ops.backend("cuda"):
        ops.sparse_decode(q, k, v, offsets, g, T)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(ops.sparse_decode(q, k, v, offsets, g, T))
    for position in range(S * S):  # the same graph, g moved on the device
        g.fill_(position)
        graph.replay()
        assert_matches_reference(out, q, k, v, offsets, g, T, f"{kind} {dtype} g={position}")


@requires_cuda
@given(kind=st.sampled_from(KINDS), B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 40),
       S=st.integers(1, 9), D=st.sampled_from([8, 32, 64, 128]), kernel=st.sampled_from([1, 3, 5]),
       where=st.floats(0, 1), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       padded_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_cuda_kernels_match_reference(kind, B, H, T, S, D, kernel, where, dtype, padded_rows, seed):
    # fp16 / bf16 with D in (32, 64, 128) and 16-byte aligned rows take the fast kernel; rows of
    # D + 1 values (padded_rows) or other dims and dtypes the general one.
    g = min(int(where * S * S), S * S - 1)
    q, k, v, g_t = make_step(B, H, T, S, D, g, dtype, device="cuda", seed=seed)
    # A sampler's cache holds nothing yet after position T + g: NaN there must not leak in.
    k[:, :, T + g + 1:] = float("nan")
    v[:, :, T + g + 1:] = float("nan")
    if padded_rows:
        k, v = (torch.cat([t, t[..., :1]], dim=-1)[..., :D] for t in (k, v))
    offsets = key_offsets(kind, S, kernel).cuda()
    with ops.backend("cuda"):
        out = ops.sparse_decode(q, k, v, offsets, g_t, T)
    assert_matches_reference(out, q, k, v, offsets, g_t, T,
                             f"{kind} T={T} S={S} g={g} D={D} {dtype} padded={padded_rows}")


@requires_cuda
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_fast_kernel_over_several_key_groups(kind, D):
    # The fast kernel loads the keys of 8 rounds at once (1024, 512, 256 keys at D = 32, 64, 128)
    # and loops over such groups: a text prefix longer than one group takes the loop.
    T = {32: 1100, 64: 600, 128: 300}[D]
    S, g = 5, 17
    q, k, v, g_t = make_step(2, 3, T, S, D, g, torch.bfloat16, device="cuda", seed=D)
    k[:, :, T + g + 1:] = float("nan")
    v[:, :, T + g + 1:] = float("nan")
    offsets = key_offsets(kind, S, 3).cuda()
    out, names = decode_with_kernel_names(q, k, v, offsets, g_t, T)
    assert "decode_fast_kernel" in names, names  # the loop over groups is the fast kernel's
    assert_matches_reference(out, q, k, v, offsets, g_t, T, f"{kind} D={D}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rule_rejects_a_result_without_the_image_keys(dtype):
    """The CUDA tests' tolerance, checked on CPU with the reference in place of a kernel, at the
    shape of test_cuda_fast_kernel_over_several_key_groups (D = 64): the result computed in
    float32 and rounded once passes; one that dropped every image key (passed by the former
    atol = rtol = 2e-2 at D = 32 and 64) fails."""
    T, S, D, g = 600, 5, 64, 17
    q, k, v, g_t = make_step(2, 3, T, S, D, g, dtype, seed=D)
    scale = 1 / math.sqrt(D)
    for kind in KINDS:
        offsets = key_offsets(kind, S, 3)
        exact = reference.sparse_decode(q.float(), k.float(), v.float(), offsets, g_t, T, scale)
        assert_matches_reference(exact.to(dtype), q, k, v, offsets, g_t, T, kind)
        no_image_keys = reference.sparse_decode(q.float(), k.float(), v.float(), offsets[:0], g_t, T, scale)
        with pytest.raises(AssertionError, match="> bound"):
            assert_matches_reference(no_image_keys.to(dtype), q, k, v, offsets, g_t, T, kind)


def decode_with_kernel_names(*args):
    """ops.sparse_decode(*args) on the CUDA backend, and the names of the kernels it ran (profiler)."""
    with ops.backend("cuda"), profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = ops.sparse_decode(*args)
        torch.cuda.synchronize()
    return out, " ".join(event.name for event in prof.events())


@requires_cuda
@pytest.mark.parametrize("fast", [True, False])
def test_cuda_fast_kernel_switch_picks_the_kernel(fast):
    # DALLE_FAST_DECODE_FAST=0 (ops.decode.fast_kernel(False)) must run the general kernel where
    # the fast one would run, with the same result; the profiler names the kernel that ran.
    T, S, g, D = 40, 6, 20, 64
    q, k, v, g_t = make_step(2, 3, T, S, D, g, torch.bfloat16, device="cuda", seed=5)
    offsets = key_offsets("conv", S, 3).cuda()
    with ops.decode.fast_kernel(fast):
        out, names = decode_with_kernel_names(q, k, v, offsets, g_t, T)
    assert ("decode_fast_kernel" in names) == fast and ("decode_kernel<" in names) == (not fast), names
    assert_matches_reference(out, q, k, v, offsets, g_t, T, f"fast={fast}")


def test_fast_kernel_switch_sets_and_restores_the_environment():
    before = os.environ.get("DALLE_FAST_DECODE_FAST")
    with ops.decode.fast_kernel(False):
        assert os.environ["DALLE_FAST_DECODE_FAST"] == "0"
    assert os.environ.get("DALLE_FAST_DECODE_FAST") == before
    with pytest.raises(ValueError, match="enabled"):
        with ops.decode.fast_kernel("no"):
            pass


@requires_cuda
@pytest.mark.parametrize("D, dtype", [(128, torch.bfloat16), (64, torch.float16), (64, torch.float32)])
def test_cuda_kernels_take_key_lists_near_the_default_shared_memory_limit(D, dtype):
    # 8 bytes of shared memory per key: ~6000 keys ask for just under 48 KiB of dynamic shared
    # memory, which with the kernels' static arrays passes the default limit (the launcher must
    # raise it), and 7000 keys for more than 48 KiB.
    for T in (5900, 6135, 6139, 7000):  # T + 9 keys (causal, S = 3: 9 offsets)
        S, g = 3, 4
        q, k, v, g_t = make_step(1, 2, T, S, D, g, dtype, device="cuda", seed=T)
        offsets = key_offsets("causal", S, 3).cuda()
        with ops.backend("cuda"):
            out = ops.sparse_decode(q, k, v, offsets, g_t, T)
        assert_matches_reference(out, q, k, v, offsets, g_t, T, f"T={T} D={D} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_may_be_a_strided_view(device, dtype):
    # The sampler passes q as a view of its [B, 1, 3, H, D] projection: batch stride 3 * H * D.
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the CPU kernel takes float32 and float64")
    B, H, T, S, D, g = 3, 2, 9, 4, 64, 7
    _, k, v, g_t = make_step(B, H, T, S, D, g, dtype, device=device, seed=5)
    qkv = torch.randn(B, 3, H, D, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    q = qkv[:, 0]
    assert not q.is_contiguous()
    offsets = key_offsets("conv", S, 3).to(device)
    with ops.backend(device):
        out = ops.sparse_decode(q, k, v, offsets, g_t, T)
        want = ops.sparse_decode(q.contiguous(), k, v, offsets, g_t, T)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
