"""Loads the compiled library dalle_fast._C and decides which implementation runs an op.

Backends: "reference" (dense PyTorch, always there), "cpu" and "cuda" (our kernels, when the
extension was built with them), "auto" (the default: our kernel when one fits the inputs,
otherwise the reference, with one warning saying why).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda")

try:  # by its full name: `from dalle_fast import _C` would blame a circular import when it is not built
    _C = importlib.import_module("dalle_fast._C")  # importing registers torch.ops.dalle_fast
    _LOAD_ERROR: str | None = None
    BUILD_INFO: dict = dict(_C.build_info)
    CPU_CLONE: str | None = _C.cpu_clone()  # the instruction-set version of the CPU kernels this CPU runs
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"dalle_fast._C could not be imported ({exc}); build it with `pip install --no-build-isolation -e .`"
    BUILD_INFO = {}
    CPU_CLONE = None

_selected = "auto"  # process-wide; a plain global so torch.compile can guard on it
_warned: set[str] = set()


def has_kernels() -> bool:
    return _C is not None


def _cpu_status() -> tuple[bool, str]:
    if _C is None:
        return False, _LOAD_ERROR or "not built"
    return True, (f"compiled with {BUILD_INFO.get('compiler', '?')} against torch {BUILD_INFO.get('torch_version', '?')}; "
                  f"this CPU runs its {CPU_CLONE} version")


def _cuda_status() -> tuple[bool, str]:
    if _C is None:
        return False, _LOAD_ERROR or "not built"
    if not BUILD_INFO.get("cuda", False):
        return False, ("the extension was built without CUDA kernels (no nvcc or CPU-only torch at build "
                       "time, or DALLE_FAST_CUDA=0)")
    if not torch.cuda.is_available():
        return False, f"built for CUDA archs {BUILD_INFO.get('cuda_archs')}, but torch sees no CUDA device"
    return True, f"built for CUDA archs {BUILD_INFO.get('cuda_archs')}, device: {torch.cuda.get_device_name()}"


def backend_info() -> dict:
    """Which backends can run, and for each missing one, why not."""
    info = {"selected": _selected, "reference": {"available": True, "why": "dense PyTorch, always available"}}
    for name, status in (("cpu", _cpu_status), ("cuda", _cuda_status)):
        ok, why = status()
        info[name] = {"available": ok, "why": why}
    info["build"] = dict(BUILD_INFO)
    return info


def current_backend() -> str:
    return _selected


@contextlib.contextmanager
def backend(name: str):
    """Select the implementation inside the block: "auto", "reference", "cpu" or "cuda"."""
    global _selected
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    previous, _selected = _selected, name
    try:
        yield
    finally:
        _selected = previous


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """Inside: os.environ[name] = value, restored after. For our ops' switches (to compare two
    paths in one process: benchmarks, tests); not thread-safe. See switch_on for when they are read."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def switch_on(name: str) -> bool:
    """One of our ops' on/off switches: False when the environment sets name=0. Read at every eager
    call; inside torch.compile it is read once, when the function is traced, and the compiled
    function keeps the path it was traced with (Dynamo does not guard on os.environ): recompile,
    or call torch._dynamo.reset(), to change it. (DALLE_FAST_GUMBEL_RESIDENT and
    DALLE_FAST_DECODE_FAST, which our C++ launchers read, are read at every call, compiled or not;
    a captured CUDA graph replays the kernels it captured.)"""
    return os.environ.get(name, "1") != "0"


def switch(name: str, enabled: bool):
    """A context in which the switch `name` is on (True) or off (False), for eager calls and
    functions traced inside it (see switch_on); not thread-safe."""
    if enabled not in (True, False):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    return environment_variable(name, "1" if enabled else "0")


def _warn_once(key: str, message: str) -> None:
    if torch.compiler.is_compiling():  # a warning would break the graph; the next eager call warns
        return
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_kernel(op: str, x: torch.Tensor, cpu_dtypes: tuple[torch.dtype, ...],
               cuda_dtypes: tuple[torch.dtype, ...] | None = None, no_backward=()) -> bool:
    """True to run our compiled kernel for `op` on inputs like `x`, False for the reference.
    `no_backward`: the inputs of a kernel without a backward; under "auto", when autograd would
    record the call (grad mode on and one of them requires grad), the reference runs, which it
    differentiates. A forced backend runs the kernel all the same (a layer's parameters require
    grad with nothing to differentiate); a backward through it then raises."""
    name = _selected
    if name == "reference":
        return False
    device = x.device.type
    dtypes = cpu_dtypes if device == "cpu" else cuda_dtypes
    if device == "cpu":
        ok, why = _cpu_status()
    elif device == "cuda":
        ok, why = _cuda_status()
    else:
        ok, why = False, f"no kernel of {op} for device {device}"
    if ok and dtypes is not None and x.dtype not in dtypes:
        ok, why = False, f"the {device} kernel of {op} supports {', '.join(map(str, dtypes))}, got {x.dtype}"
    if ok and name == "auto" and torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                  for t in no_backward):
        ok, why = False, f"the kernel of {op} has no backward and an input requires grad"
    if name in ("cpu", "cuda") and name != device:
        raise RuntimeError(f"backend({name!r}) selected, but the inputs of {op} are on {device}")
    if ok:
        return True
    if name != "auto":
        raise RuntimeError(f"backend({name!r}) cannot run {op}: {why}")
    if _C is None:  # no library: one warning for every op, not one per op
        _warn_once("no library", f"dalle_fast: every op falls back to the dense PyTorch reference: {why}")
    else:
        _warn_once(f"{op}:{device}:{x.dtype}", f"dalle_fast: {op} falls back to the dense PyTorch reference: {why}")
    return False


def one_device(op: str, **tensors) -> None:
    """For an op's fake (register_fake) function: a ValueError unless the tensors given (None for an
    absent optional one) are on one device. The fake runs in place of the C++ checks both under
    torch.compile and in eager mode whenever an input is on the meta device: without this, a call
    mixing meta and CPU tensors returned uninitialised CPU memory instead of the C++ device error."""
    present = {name: t for name, t in tensors.items() if t is not None}
    if len({t.device for t in present.values()}) > 1:
        raise ValueError(f"{op}: the tensors must be on one device, got "
                         + ", ".join(f"{name} on {t.device}" for name, t in present.items()))


def forbid_double_backward(op: str, public_name: str) -> None:
    """Register an autograd formula for the backward op `op` that refuses to be differentiated."""

    def _refuse(ctx, *grads):
        raise NotImplementedError(f"{public_name} does not support double backward; use "
                                  "dalle_fast.ops.backend('reference') for higher-order gradients")

    torch.library.register_autograd(op, _refuse, setup_context=lambda ctx, inputs, output: None)
