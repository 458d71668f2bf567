"""Building a model whose values will come from elsewhere: without its random initialisation.

Loading a checkpoint builds the model twice: on the meta device (no storage) to check the file's
names and shapes before anything is allocated, then with storage for the file's values. Neither
needs the random initialisation the constructors run. On real tensors it is wasted work (seconds
for a paper-sized model, all of it overwritten). On the meta device it computes nothing, but
PyTorch runs normal_ there through a Python reference whose first call imports torch._dynamo:
1.5-3 s, most of the 3.1 s that loading the bundled model took.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

# The random fills: torch.nn.init's initialisers (a mode sees the outermost call only, and
# reset_parameters calls these) and the tensors' own in-place methods they are made of.
_RANDOM_FILLS = frozenset({
    *(getattr(torch.nn.init, name) for name in (
        "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
        "kaiming_normal_", "orthogonal_", "sparse_")),
    *(getattr(torch.Tensor, name) for name in (
        "normal_", "uniform_", "bernoulli_", "exponential_", "log_normal_", "cauchy_", "geometric_", "random_")),
})


class _SkipRandomFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RANDOM_FILLS:  # each takes the tensor first and returns it
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def without_random_init(device: str | torch.device | None = None) -> Iterator[None]:
    """Inside: tensors' random fills (normal_, uniform_, ...) leave them as they are, and factory
    functions make tensors on `device` (None: where they would anyway). A model built here has
    uninitialised weights wherever its constructor draws them (constant fills, zeros_ and ones_,
    still run): for the meta device, or to be overwritten whole by a strict load_state_dict."""
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        stack.enter_context(_SkipRandomFills())
        yield
