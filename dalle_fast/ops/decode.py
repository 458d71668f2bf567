"""dalle_fast.ops.sparse_decode: the attention of one sampling step over a KV cache.

Each layer's mask depends only on the raster offset between query and key (SPEC.md section 2),
so a step at image position g reads the T text keys and the image keys g - d for a fixed list
of offsets d (sampler.key_offsets). The compiled op `torch.ops.dalle_fast.sparse_decode` does
that in one kernel per layer (scores, softmax and the weighted sum of values), reading g from a
device tensor so that a CUDA graph replays it for every position; given this step's key and value
(`torch.ops.dalle_fast.sparse_decode_append`), the same kernel writes them to the cache first.
The kernels have no backward: under the "auto" backend a call that autograd would record (grad
mode on and an input that requires grad) runs the reference, which it differentiates.

A sampler's step calls each layer with inputs of one shape, dtype and device: `StepDecode` checks
a layer's arguments once, and `step_takes_kernel` decides once per step (the switch, the backend,
autograd) whether all of them run the fused op directly, without sparse_decode's per-call checks.
"""

from __future__ import annotations

import itertools
import math

import torch

from . import _backend, reference

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, cache_k, cache_v, offsets, g, text_len) -> None:
    for name, t in (("q", q), ("cache_k", cache_k), ("cache_v", cache_v), ("offsets", offsets), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or cache_k.dim() != 4:
        raise ValueError(f"q must be [B, H, D] and the caches [B, H, N, D], got {tuple(q.shape)} and "
                         f"{tuple(cache_k.shape)}")
    if cache_k.shape != cache_v.shape or cache_k.shape[:2] != q.shape[:2] or cache_k.shape[3] != q.shape[2]:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, cache_k {tuple(cache_k.shape)}, "
                         f"cache_v {tuple(cache_v.shape)}")
    if not (q.dtype == cache_k.dtype == cache_v.dtype) or not q.is_floating_point():
        raise TypeError(f"q and the caches must share one floating dtype, got {q.dtype}, {cache_k.dtype}, "
                        f"{cache_v.dtype}")
    if offsets.dim() != 1 or offsets.dtype != torch.long or g.dim() != 0 or g.dtype != torch.long:
        raise TypeError("offsets must be a 1-D int64 tensor and g a 0-dim int64 tensor")
    if len({t.device for t in (q, cache_k, cache_v, offsets, g)}) != 1:
        raise ValueError("q, the caches, offsets and g must be on one device")
    if q.shape[2] < 1:
        raise ValueError(f"the head dim D must be at least 1, got q of shape {tuple(q.shape)}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or not 1 <= text_len <= cache_k.shape[2]:
        raise ValueError(f"text_len must be an int in [1, N={cache_k.shape[2]}], got {text_len!r}")
    # On the CPU g is read for free: outside its range the kernel wrote nothing and attended anyway, and
    # index_copy_ (the other path) overwrote a text key. On CUDA reading it would cost a synchronisation.
    if g.device.type == "cpu" and not torch.compiler.is_compiling():
        image_len = cache_k.shape[2] - text_len
        if not 0 <= int(g) < image_len:
            raise ValueError(f"g must be an image position in [0, N - text_len = {image_len}), got {int(g)}")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [begin, end) from t's first element to its last; empty for no elements."""
    if t.numel() == 0:
        return 0, 0
    begin = t.data_ptr()
    return begin, begin + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def _check_apart(cache_k, cache_v, k_new, v_new) -> None:
    """The caches are written in place: they may share no memory with each other, nor with this
    step's key and value, which are read while they are written. Refused where two byte spans
    meet, as spans_meet in csrc/attention/decode_args.cpp refuses for the kernel: PyTorch's own
    overlap test gives up on tensors that are not dense (a strided view of a cache row). This
    refuses some that share no element (interleaved caches) but passes views of one buffer that
    do not interleave (the sampler's keys and values)."""
    spans = {name: _byte_span(t) for name, t in (("cache_k", cache_k), ("cache_v", cache_v), ("k_new", k_new),
                                                 ("v_new", v_new))}
    for a, b in (("cache_k", "cache_v"), ("cache_k", "k_new"), ("cache_k", "v_new"), ("cache_v", "k_new"),
                 ("cache_v", "v_new")):
        (a_begin, a_end), (b_begin, b_end) = spans[a], spans[b]
        if a_begin < b_end and b_begin < a_end:
            raise ValueError(f"{a} and {b} share memory (their spans from first to last element meet), but the caches "
                             "are written in place; give each its own memory (clone() k_new / v_new; allocate the "
                             "caches apart, not interleaved)")


def append_enabled() -> bool:
    """False when DALLE_FAST_DECODE_APPEND=0: sparse_decode writes k_new / v_new with index_copy_
    and then attends (two more kernels per call) instead of doing both in one kernel. Read at
    every eager call; inside torch.compile sparse_decode always takes index_copy_ (a graph holds
    no in-place op on the caches), whatever the switch."""
    return _backend.switch_on("DALLE_FAST_DECODE_APPEND")


def fused_cache_write(enabled: bool):
    """Inside: whether sparse_decode writes k_new / v_new in its kernel (True) or with index_copy_
    before it (False). Sets DALLE_FAST_DECODE_APPEND; not thread-safe."""
    return _backend.switch("DALLE_FAST_DECODE_APPEND", enabled)


def fast_kernel(enabled: bool):
    """Inside: whether CUDA calls in fp16 / bf16 at head dim 32, 64 or 128 with aligned rows take
    the fast decode kernel (True, the default) or the general one (False). Sets
    DALLE_FAST_DECODE_FAST, which the launcher reads at every call; not thread-safe."""
    return _backend.switch("DALLE_FAST_DECODE_FAST", enabled)


def sparse_decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, offsets: torch.Tensor,
                  g: torch.Tensor, text_len: int, scale: float | None = None,
                  k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, H, D] at image position g (0-dim int64 tensor, 0 <= g < N - text_len)
    over the text keys and the image keys g - d (d in `offsets` [K], int64, those >= 0) of the
    caches [B, H, N, D], whose position text_len + g must hold this step's key and value: given
    k_new and v_new [B, H, D] (both or neither), they are written there first, in place, in the
    same kernel (a ValueError where the caches and k_new / v_new may share memory). Returns
    [B, H, D]; `scale` defaults to 1/sqrt(D). No host synchronisation on CUDA."""
    _check(q, cache_k, cache_v, offsets, g, text_len)
    scale = _scale(q, scale)
    if (k_new is None) != (v_new is None):
        raise ValueError("give both k_new and v_new, or neither")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must be a tensor of q's shape {tuple(q.shape)}, dtype and device")
        if not (_writable(cache_k, cache_v) and _append_allowed(q, (q, cache_k, cache_v, k_new, v_new))):
            if not torch.compiler.is_compiling():  # fake tensors (torch.compile's tracing) have no addresses
                _check_apart(cache_k, cache_v, k_new, v_new)  # as sparse_decode_append does in C++
            position = (text_len + g).view(1)
            cache_k.index_copy_(2, position, k_new.unsqueeze(2))
            cache_v.index_copy_(2, position, v_new.unsqueeze(2))
            return sparse_decode(q, cache_k, cache_v, offsets, g, text_len, scale)
        return torch.ops.dalle_fast.sparse_decode_append(q, k_new, v_new, cache_k, cache_v, offsets, g, text_len, scale)
    if not _backend.use_kernel("sparse_decode", q, _CPU_DTYPES, _CUDA_DTYPES, no_backward=(q, cache_k, cache_v)):
        return reference.sparse_decode(q, cache_k, cache_v, offsets, g, text_len, scale)
    return torch.ops.dalle_fast.sparse_decode(q, cache_k, cache_v, offsets, g, text_len, scale)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _writable(cache_k: torch.Tensor, cache_v: torch.Tensor) -> bool:
    """Whether the fused kernel can write the caches in place (their last dim contiguous)."""
    return cache_k.stride(3) == 1 and cache_v.stride(3) == 1


def _append_allowed(q: torch.Tensor, tensors) -> bool:
    """Whether a call on q that writes the caches may run the fused kernel now: the switch,
    torch.compile (a graph holds no in-place op on the caches), the backend, and autograd (which
    must not record a call on `tensors`: the kernel has no backward)."""
    return (append_enabled() and not torch.compiler.is_compiling()
            and _backend.use_kernel("sparse_decode", q, _CPU_DTYPES, _CUDA_DTYPES, no_backward=tensors))


class StepDecode:
    """One layer's sparse_decode (its caches, key offsets, text length and scale) for the calls of
    a sampling step on queries like `q` [B, H, D], each writing that step's key and value: its
    arguments are checked once, here. A call with direct=True runs the fused op itself
    (sparse_decode_append, which checks its arguments in C++ too) without sparse_decode's Python
    checks: for a step that `step_takes_kernel` allowed. direct=False is ops.sparse_decode. The
    caches are held, not copied: the calls write them."""

    def __init__(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, offsets: torch.Tensor,
                 text_len: int, scale: float | None = None):
        _check(q, cache_k, cache_v, offsets, torch.zeros((), dtype=torch.long, device=q.device), text_len)
        self.cache_k, self.cache_v, self.offsets, self.text_len = cache_k, cache_v, offsets, text_len
        self.scale = _scale(q, scale)
        self.fits = _writable(cache_k, cache_v)

    def __call__(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, g: torch.Tensor,
                 direct: bool = False) -> torch.Tensor:
        if direct:
            return torch.ops.dalle_fast.sparse_decode_append(q, k_new, v_new, self.cache_k, self.cache_v,
                                                             self.offsets, g, self.text_len, self.scale)
        return sparse_decode(q, self.cache_k, self.cache_v, self.offsets, g, self.text_len, self.scale,
                             k_new=k_new, v_new=v_new)


def step_takes_kernel(x: torch.Tensor, layers: list[StepDecode], sources=()) -> bool:
    """Whether a step's calls of `layers` may all run the fused kernel directly on queries of x's
    dtype and device: each layer's caches fit it (checked once) and, read now, the switch,
    torch.compile, the backend and autograd allow it. `sources`: the tensors besides x that the
    step computes its queries, keys and values from (its layers' parameters); autograd would
    record the calls if x or one of them requires grad."""
    if not all(layer.fits for layer in layers):
        return False
    # the tensors lazily: autograd's rule reads them only in grad mode, never in a sampling step
    caches = itertools.chain.from_iterable((layer.cache_k, layer.cache_v) for layer in layers)
    return _append_allowed(x, itertools.chain((x,), sources, caches))


if _backend.has_kernels():

    @torch.library.register_fake("dalle_fast::sparse_decode")
    def _decode_fake(q, cache_k, cache_v, offsets, g, text_len, scale):
        _backend.one_device("sparse_decode", q=q, cache_k=cache_k, cache_v=cache_v, offsets=offsets, g=g)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    @torch.library.register_fake("dalle_fast::sparse_decode_append")
    def _decode_append_fake(q, k_new, v_new, cache_k, cache_v, offsets, g, text_len, scale):
        _backend.one_device("sparse_decode_append", q=q, k_new=k_new, v_new=v_new, cache_k=cache_k, cache_v=cache_v,
                            offsets=offsets, g=g)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
