"""dalle_fast.ops.gumbel_softmax and gumbel_softmax_kl: the fused relaxation of the dVAE.

One pass over the logits draws Philox noise keyed by (seed, offset, position, index), so the
backward regenerates it instead of storing it and a seed repeats a run bit for bit. The seed
comes from PyTorch's generator (the given one or the default of the logits' device).
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from . import _backend, reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# tau (and gumbel_argmax's scale) and their reciprocals stay normal float32 numbers; outside, the
# float32 math of the kernels would turn 1 / tau into inf (or tau into 0) and the sample into NaN.
# Equal to kTauMin / kTauMax in csrc/gumbel/gumbel_args.cpp.
TAU_RANGE = (1e-30, 1e30)


def _check(logits: torch.Tensor, tau: float, dim: int, generator: torch.Generator | None, tau_name: str = "tau") -> int:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() == 0 or logits.numel() == 0:
        raise ValueError(f"logits must be non-empty with at least one dimension, got shape {tuple(logits.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not TAU_RANGE[0] <= tau <= TAU_RANGE[1]:
        raise ValueError(f"{tau_name} must be a positive number in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}], got {tau!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim {dim!r} is out of range for logits of shape {tuple(logits.shape)}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device}, logits on {logits.device}")
    return dim


@contextlib.contextmanager
def cuda_one_read_kernel(enabled: bool | str):
    """Inside: whether CUDA soft samples and their backward may take the one-read cluster kernels
    (sm_90, a strided softmax dimension of at most 16384 entries, 8192 for the backward of the
    KL term) or always run the two-sweep kernels; both give the formula on the same noise.
    "require": a call of a shape they take fails where the device cannot run them instead of
    falling back (for tests that must exercise them). Sets DALLE_FAST_GUMBEL_RESIDENT, which
    the kernels read at every call; for comparing the paths (benchmarks, tests), not thread-safe."""
    if enabled not in (True, False, "require"):
        raise ValueError(f"enabled must be True, False or 'require', got {enabled!r}")
    with _backend.environment_variable("DALLE_FAST_GUMBEL_RESIDENT", {True: "1", False: "0"}.get(enabled, "require")):
        yield


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, dim: int = 1, hard: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """y = softmax((logits + g) / tau) along `dim`, g ~ Gumbel(0, 1).

    hard=True returns the one-hot of the first argmax of logits + g (the soft sample's argmax,
    except where exp rounding ties the soft sample's entries at very large tau) with the soft
    sample's gradient (straight through); from the same generator state it draws the same noise
    as the soft sample. Works on the channel dim of NCHW logits without a
    permuted copy; -inf logits are never sampled, and a position whose logits are all -inf gets
    y = 0 from the kernels. Any finite logits give a finite sample (the kernels subtract the max
    of logits + g before dividing by tau). float32, bfloat16 and float16 run our kernels
    (float32 math). A position with a NaN logit gets NaN at every entry of its sample, soft or
    hard, of its gradient and (gumbel_softmax_kl) its KL, as the reference's softmax gives; the
    other positions are untouched.
    """
    dim = _check(logits, tau, dim, generator)
    if not _backend.use_kernel("gumbel_softmax", logits, _DTYPES, _DTYPES):
        return reference.gumbel_softmax(logits, tau, dim, hard, generator=generator)
    y, _, _ = torch.ops.dalle_fast.gumbel_softmax_fwd(logits, float(tau), dim, bool(hard), False, generator)
    return y


def gumbel_softmax_kl(logits: torch.Tensor, tau: float = 1.0, dim: int = 1,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, kl): the soft sample of gumbel_softmax and, from the same read of the logits,
    KL(softmax(logits) || uniform) per position (the dVAE's KL term), both differentiable."""
    dim = _check(logits, tau, dim, generator)
    if not _backend.use_kernel("gumbel_softmax", logits, _DTYPES, _DTYPES):
        return reference.gumbel_softmax_kl(logits, tau, dim, generator=generator)
    y, kl, _ = torch.ops.dalle_fast.gumbel_softmax_fwd(logits, float(tau), dim, False, True, generator)
    return y, kl


def gumbel_argmax(logits: torch.Tensor, dim: int = -1, scale: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from softmax(logits * scale) along `dim` by Gumbel-max: int64 indices (logits' shape
    without `dim`), the first argmax of logits * scale + g (one fused multiply-add in float32),
    g ~ Gumbel(0, 1) the noise gumbel_softmax would draw from the same generator state. One pass
    over the logits, no softmax and no host synchronisation: the sampler's token draw (scale =
    1 / temperature). -inf logits are never drawn; a position whose logits are all -inf gets 0,
    one with a NaN logit the index of its first NaN (as torch.argmax).
    DALLE_FAST_GUMBEL_ARGMAX=0 in the environment (read at every eager call, and when
    torch.compile traces the call: a compiled function keeps the path it was traced with; see
    _backend.switch_on) draws with the reference instead (PyTorch's noise, a few kernels), e.g.
    to rule the kernel out."""
    dim = _check(logits, scale, dim, generator, "scale")
    if (not _backend.switch_on("DALLE_FAST_GUMBEL_ARGMAX")
            or not _backend.use_kernel("gumbel_argmax", logits, _DTYPES, _DTYPES)):
        return reference.gumbel_argmax(logits, dim, scale, generator=generator)
    return torch.ops.dalle_fast.gumbel_argmax(logits, float(scale), dim, generator)


if _backend.has_kernels():

    def _reduced_shape(logits, dim):
        shape = list(logits.shape)
        del shape[dim if dim >= 0 else dim + logits.dim()]
        return shape

    @torch.library.register_fake("dalle_fast::gumbel_softmax_fwd")
    def _fwd_fake(logits, tau, dim, hard, with_kl, generator):
        y = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        kl_shape = _reduced_shape(logits, dim) if with_kl else [0]
        kl = torch.empty(kl_shape, dtype=logits.dtype, device=logits.device)
        return y, kl, torch.empty(2, dtype=torch.long, device=logits.device)

    @torch.library.register_fake("dalle_fast::gumbel_softmax_bwd")
    def _bwd_fake(grad_y, grad_kl, logits, y, rng_state, tau, dim, hard):
        _backend.one_device("gumbel_softmax_bwd", grad_y=grad_y, grad_kl=grad_kl, logits=logits, y=y,
                            rng_state=rng_state)
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    @torch.library.register_fake("dalle_fast::gumbel_argmax")
    def _argmax_fake(logits, scale, dim, generator):
        return torch.empty(_reduced_shape(logits, dim), dtype=torch.long, device=logits.device)

    @torch.library.register_fake("dalle_fast::gumbel_noise")
    def _noise_fake(logits, rng_state, dim):
        _backend.one_device("gumbel_noise", logits=logits, rng_state=rng_state)
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)

    def _setup_context(ctx, inputs, output):
        logits, tau, dim, hard, with_kl, _ = inputs
        y, _, rng_state = output
        # a hard sample's backward recomputes the soft one and never reads y: not saving it leaves y
        # free to be edited in place before the backward, as F.gumbel_softmax's is
        ctx.save_for_backward(logits, None if hard else y, rng_state)
        ctx.args = (tau, dim, hard, with_kl)

    def _backward(ctx, grad_y, grad_kl, _grad_rng):
        logits, y, rng_state = ctx.saved_tensors
        tau, dim, hard, with_kl = ctx.args
        if y is None:  # hard: only its shape is checked
            y = logits.new_zeros(()).expand(logits.shape)
        if grad_y is None:
            grad_y = torch.zeros_like(logits)
        grad = torch.ops.dalle_fast.gumbel_softmax_bwd(
            grad_y, grad_kl if with_kl else None, logits, y, rng_state, tau, dim, hard)
        return grad, None, None, None, None, None

    torch.library.register_autograd("dalle_fast::gumbel_softmax_fwd", _backward, setup_context=_setup_context)

    _backend.forbid_double_backward("dalle_fast::gumbel_softmax_bwd", "dalle_fast.ops.gumbel_softmax")
