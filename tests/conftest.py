"""Shared test fixtures: devices, the one tolerance table, hypothesis profiles."""

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (atol, rtol) of a kernel against the reference computed in the same dtype. Low-precision
# CUDA results are held to the flash-attention rule instead (assert_within_reference_error).
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# The floor of the flash-attention rule, relative to the largest reference value (at least 1).
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_within_reference_error(got: torch.Tensor, ref_low: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """The flash-attention rule for a float16 / bfloat16 result `got`: its largest error against
    `want` (the reference in float32 or float64) is at most twice the largest error of `ref_low`
    (the same reference computed in got's dtype) plus a floor. A fixed atol / rtol large enough
    for low precision also passed results that had lost a part of the computation."""
    dtype = got.dtype
    assert dtype in LOW_PRECISION_FLOOR and ref_low.dtype == dtype, f"{what}: {dtype} result, {ref_low.dtype} reference"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    want = want.to(got.device, torch.float64)  # the exact reference may come from a CPU float64 copy
    err = (got.double() - want).abs().max().item()
    bound = (2 * (ref_low.to(got.device, torch.float64) - want).abs().max().item()
             + LOW_PRECISION_FLOOR[dtype] * max(1.0, want.abs().max().item()))
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to n inside, restored after. For kernels whose schedule
    depends on the thread count: a test that pins it runs the same code on every machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


requires_kernels = pytest.mark.skipif(
    not __import__("dalle_fast").ops._backend.has_kernels(), reason="dalle_fast._C is not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _permissions_enforced() -> bool:
    """Whether file modes bind this process (not root with its override capabilities)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        open(probe, "w").close()
        os.chmod(probe, 0o444)
        try:
            open(probe, "r+").close()
        except PermissionError:
            return True
        return False


requires_file_permissions = pytest.mark.skipif(not _permissions_enforced(),
                                               reason="this process writes read-only files regardless (root)")
