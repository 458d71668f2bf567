"""The fast layers: what users import into their own training scripts."""

from . import reference
from ._backend import backend, backend_info, current_backend
from .attention import sparse_attention
from .decode import sparse_decode
from .gumbel import gumbel_argmax, gumbel_softmax, gumbel_softmax_kl
from .linear import skinny_linear
from .masks import KINDS, attention_mask, layer_kinds, mask_density

__all__ = [
    "KINDS",
    "attention_mask",
    "backend",
    "backend_info",
    "current_backend",
    "gumbel_argmax",
    "gumbel_softmax",
    "gumbel_softmax_kl",
    "layer_kinds",
    "mask_density",
    "reference",
    "skinny_linear",
    "sparse_attention",
    "sparse_decode",
]
