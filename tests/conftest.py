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
# CUDA results are held to the flash-attention rule instead (see test_attention_cuda.py).
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


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
