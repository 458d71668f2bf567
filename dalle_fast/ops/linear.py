"""dalle_fast.ops.skinny_linear: act(norm(x) @ weight.T + bias) + residual for the few rows of a sampling step.

A sampling step multiplies one position of each sequence (16 rows for a batch of 16) by every
weight matrix of the prior. cuBLAS runs those as GEMMs with few blocks: about 4 us each on the
H100 for a 512 x 1536 weight, where reading the weight takes well under 1 us. The CUDA kernel
(csrc/linear/cuda/skinny_linear.cu) spreads the weight over n / 8 blocks, issues each warp's
loads in one wave and multiplies on the tensor cores; it also applies the layer norm before and
the bias, the GELU and the residual add after in the same kernel, so a step of the prior runs
five fewer kernels per layer. On the CPU, PyTorch's addmm (MKL) runs such products on one thread
at 35-45 GFLOP/s; the CPU kernel (csrc/linear/cpu/) splits the weight's rows over torch's threads
and fuses the layer norm, the bias, the GELU and the residual add. Its GELU takes Phi(x) from
erfc, accurate in relative terms for negative x, where the erf form (ATen's, and the CUDA
kernel's) cancels: 10.4 eps at most for |x| < 3 against ATen's 1700, and no 0 from x = -5.5 down.

The CUDA kernel takes float16 / bfloat16 tensors with at most 64 rows, K % 32 == 0, N % 8 == 0
and 16-byte aligned rows; the CPU kernel float32 tensors with at most 64 rows, rows of x and
the weight contiguous along K. Every other call (more rows, another dtype) runs the reference:
the norm, then `reference.linear` (F.linear, the activation, the residual). Neither kernel has
a backward: under the "auto" backend a call that autograd would record (grad mode on and an
input that requires grad) runs the reference, which it differentiates. Each output is one dot
product over K in an order fixed by the kernel alone, so a row's result does not depend on the
other rows or (CPU) the number of threads. DALLE_FAST_SKINNY_LINEAR=0 in the environment sends
every call to the reference, so a benchmark can time both in one process; it is read at every
eager call, and when torch.compile traces the call (a compiled function keeps the path it was
traced with; see _backend.switch_on).

A sampler's step calls each layer with inputs of one shape, dtype and device: `StepLinear` checks a
layer's arguments once, and `step_takes_kernel` decides once per step (the switch, the backend,
autograd) whether all of them run the op directly, without skinny_linear's per-call checks.
"""

from __future__ import annotations

import itertools
import math

import torch

from . import _backend, reference

_ACTIVATIONS = {None: 0, "gelu": 1}
_MAX_ROWS = 64


def kernel_enabled() -> bool:
    """False when DALLE_FAST_SKINNY_LINEAR=0: every call takes the reference (F.linear)."""
    return _backend.switch_on("DALLE_FAST_SKINNY_LINEAR")


def skinny_linear_kernel(enabled: bool):
    """Inside: whether calls may take the kernel (True) or always run the reference, F.linear and
    the epilogue in PyTorch (False). Sets DALLE_FAST_SKINNY_LINEAR; not thread-safe."""
    return _backend.switch("DALLE_FAST_SKINNY_LINEAR", enabled)


def _aligned(t: torch.Tensor) -> bool:
    # Under torch.compile the tensors have no storage yet: the op checks the alignment when it runs
    # and copies a row layout its 16-byte loads cannot read (e.g. a view at an odd offset).
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def _cuda_takes(x2: torch.Tensor, weight: torch.Tensor, bias, residual2, norm=None) -> bool:
    """Whether the CUDA kernel takes these shapes, dtypes and layouts (wherever the tensors are)."""
    m, k = x2.shape
    n = weight.shape[0]
    if x2.dtype not in (torch.float16, torch.bfloat16) or not (1 <= m <= _MAX_ROWS and k % 32 == 0 and n % 8 == 0):
        return False
    if weight.dtype != x2.dtype or not weight.is_contiguous() or not _aligned(weight):
        return False
    if x2.stride(1) != 1 or x2.stride(0) % 8 != 0 or not _aligned(x2):
        return False
    return _operands_fit(x2, bias, residual2, norm, aligned=True)


def _cpu_takes(x2: torch.Tensor, weight: torch.Tensor, bias, residual2, norm=None) -> bool:
    """Whether the CPU kernel takes these shapes, dtypes and layouts (wherever the tensors are)."""
    m, k = x2.shape
    if x2.dtype != torch.float32 or not (1 <= m <= _MAX_ROWS and k >= 1 and weight.shape[0] >= 1):
        return False
    if weight.dtype != x2.dtype or not weight.is_contiguous() or x2.stride(1) != 1:
        return False
    return _operands_fit(x2, bias, residual2, norm, aligned=False)


def _operands_fit(x2, bias, residual2, norm, aligned: bool) -> bool:
    # bias, residual and the norm's affine vectors of x's dtype; the norm's contiguous (and aligned)
    if bias is not None and bias.dtype != x2.dtype:
        return False
    if norm is not None:
        for t in (norm.weight, norm.bias):
            if t is None or t.dtype != x2.dtype or not t.is_contiguous() or (aligned and not _aligned(t)):
                return False
    return residual2 is None or residual2.dtype == x2.dtype


def _kernel_takes(x2: torch.Tensor, weight: torch.Tensor, bias, residual2, norm=None) -> bool:
    """Whether the kernel of x2's device takes the call."""
    takes = _cuda_takes if x2.is_cuda else _cpu_takes if x2.device.type == "cpu" else None
    return takes is not None and takes(x2, weight, bias, residual2, norm)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, activation: str | None = None,
                  norm: torch.nn.LayerNorm | None = None) -> torch.Tensor:
    """act(norm(x) @ weight.T + bias) + residual: x [..., K], weight [N, K], bias [N] or None,
    residual [..., N] or None, activation None or "gelu" (the exact, erf one, as nn.GELU()), norm
    an nn.LayerNorm over K or None. Returns [..., N] in x's dtype. The kernel rounds the
    normalised x to x's dtype (as the layer's output would be) and the result once, after the
    residual (F.linear, GELU and the add in x's dtype round after each)."""
    _check_args(x, weight, bias, residual, activation, norm)
    n = weight.shape[0]
    x2 = _rows(x) if x.dim() != 2 else x
    residual2 = residual.reshape(-1, n) if residual is not None else None
    tensors = (x, weight, bias, residual, *((norm.weight, norm.bias) if norm is not None else ()))
    if _kernel_takes(x2, weight, bias, residual2, norm) and _kernel_allowed(x, tensors):
        ln = (None, None, 1e-5) if norm is None else (norm.weight, norm.bias, float(norm.eps))
        out = torch.ops.dalle_fast.skinny_linear(x2, weight, bias, residual2, _ACTIVATIONS[activation], *ln)
        return out.view(*x.shape[:-1], n)
    if norm is not None:
        x = norm(x)
    return reference.linear(x, weight, bias, residual, activation)


def _check_args(x, weight, bias, residual, activation, norm) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    n = weight.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    out_shape = (*x.shape[:-1], n)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must be {list(out_shape)}, got {list(residual.shape)}")
    if norm is not None and (not isinstance(norm, torch.nn.LayerNorm) or tuple(norm.normalized_shape) != (x.shape[-1],)):
        raise ValueError(f"norm must be an nn.LayerNorm over the last dimension ({x.shape[-1]}), got {norm!r}")
    if len({t.device for t in (x, weight, bias, residual) if t is not None}) != 1:
        raise ValueError("x, weight, bias and residual must be on one device")
    # one dtype: the result is x's (F.linear refused a bias of another with a bare RuntimeError, and a
    # residual of another promoted the result)
    others = {name: t.dtype for name, t in (("weight", weight), ("bias", bias), ("residual", residual))
              if t is not None and t.dtype != x.dtype}
    if others:
        raise TypeError(f"weight, bias and residual must have x's dtype {x.dtype}, got "
                        + ", ".join(f"{name} {dtype}" for name, dtype in others.items()))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] (reshape(-1, K) cannot infer M when K is 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _kernel_allowed(x: torch.Tensor, tensors) -> bool:
    """Whether a call on x that the kernel takes may run it now: the switch, the backend, and
    autograd (which must not record a call on `tensors`: the kernel has no backward)."""
    return kernel_enabled() and _backend.use_kernel("skinny_linear", x, (torch.float32,),
                                                    (torch.float16, torch.bfloat16), no_backward=tensors)


class StepLinear:
    """One layer's skinny_linear (weight, bias, activation, norm) for the many calls of a sampling
    step on inputs like `x` (its rows, K, dtype and device; a fresh or contiguous tensor): its
    arguments are checked once, here. A call with direct=True runs the op itself, none of
    skinny_linear's checks (which cost as much as the kernel on a CPU step's small products):
    for a step that `step_takes_kernel` allowed. direct=False is ops.skinny_linear. The layer's
    tensors are held, not copied: in-place updates show, a replaced parameter does not."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str | None = None, norm: torch.nn.LayerNorm | None = None):
        _check_args(x, weight, bias, None, activation, norm)
        self.weight, self.bias, self.activation, self.norm = weight, bias, activation, norm
        self.n = weight.shape[0]
        self.tensors = (weight, bias, *((norm.weight, norm.bias) if norm is not None else ()))
        self.fits = _kernel_takes(_rows(x), weight, bias, None, norm)
        self._op_args = (_ACTIVATIONS[activation],
                         *((None, None, 1e-5) if norm is None else (norm.weight, norm.bias, float(norm.eps))))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, direct: bool = False) -> torch.Tensor:
        if not direct:
            return skinny_linear(x, self.weight, self.bias, residual, self.activation, self.norm)
        out = torch.ops.dalle_fast.skinny_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias,
                                                 None if residual is None else residual.reshape(-1, self.n),
                                                 *self._op_args)
        return out.view(*x.shape[:-1], self.n)


def step_takes_kernel(x: torch.Tensor, layers: list[StepLinear]) -> bool:
    """Whether a step's calls of `layers` on inputs like x may all run the kernel directly: each
    layer fits it (checked once) and, read now, the switch, the backend and autograd allow it."""
    # the tensors lazily: autograd's rule reads them only in grad mode, never in a sampling step
    tensors = itertools.chain((x,), *(layer.tensors for layer in layers))
    return all(layer.fits for layer in layers) and _kernel_allowed(x, tensors)


if _backend.has_kernels():

    @torch.library.register_fake("dalle_fast::skinny_linear")
    def _linear_fake(x, weight, bias, residual, activation, ln_weight, ln_bias, ln_eps):
        _backend.one_device("skinny_linear", x=x, weight=weight, bias=bias, residual=residual, ln_weight=ln_weight,
                            ln_bias=ln_bias)
        return x.new_empty((x.shape[0], weight.shape[0]))
