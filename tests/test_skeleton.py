"""without_random_init: models built for their shapes or for a checkpoint's values draw nothing."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dalle_fast.dvae import DVAE, DVAEConfig
from dalle_fast.prior import Prior, PriorConfig
from dalle_fast.rerank import Reranker, RerankerConfig
from dalle_fast.skeleton import without_random_init

RANDOM_OPS = {"normal_", "uniform_", "bernoulli_", "exponential_", "log_normal_", "cauchy_", "geometric_",
              "random_", "normal", "uniform", "bernoulli"}

MODELS = [
    (Prior, PriorConfig.preset("tiny", layers=1, d_model=32)),
    (DVAE, DVAEConfig.preset("tiny")),
    (Reranker, RerankerConfig(image_size=64, text_len=16, text_vocab=64, embed_dim=16, width=16, text_layers=1,
                              heads=2, image_width=8)),
]


class RecordOps(TorchDispatchMode):
    """The names of the aten ops run inside (on any device, meta included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def random_ops(names) -> set:
    return RANDOM_OPS & set(names)


@pytest.mark.parametrize("device", [None, "meta"])
@pytest.mark.parametrize("model_cls, config", MODELS, ids=lambda v: getattr(v, "__name__", ""))
def test_building_a_model_runs_no_random_fill(model_cls, config, device):
    with RecordOps() as plain:
        model_cls(config) if device is None else _on(device, model_cls, config)
    assert random_ops(plain.names), "the constructor draws its initial weights: nothing to skip"
    state = torch.get_rng_state()
    with RecordOps() as ops, without_random_init(device):
        model = model_cls(config)
    assert not random_ops(ops.names), sorted(random_ops(ops.names))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.is_meta == (device == "meta") for p in model.parameters())


def _on(device, model_cls, config):
    with torch.device(device):
        return model_cls(config)


def test_constant_fills_still_run_and_random_fills_return_their_tensor():
    with without_random_init():
        norm = torch.nn.LayerNorm(8)
        t = torch.full((4,), 3.0)
        row = t[None]  # a view of t: what kaiming_uniform_ would fill is t's storage
        assert torch.nn.init.normal_(tensor=t) is t and t.uniform_() is t and torch.nn.init.kaiming_uniform_(row) is row
    assert torch.equal(t, torch.full((4,), 3.0))
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    torch.nn.init.normal_(t)  # outside: a fill again
    assert not torch.equal(t, torch.full((4,), 3.0))


@pytest.mark.parametrize("model_cls, config", MODELS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_tensor_a_model_holds_is_in_its_state_dict(model_cls, config):
    # load_model relies on it: a strict load_state_dict then writes every value of a model built
    # without its random initialisation (a non-persistent buffer would stay uninitialised).
    with torch.device("meta"):
        model = model_cls(config)
    held = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    held |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    assert held <= set(model.state_dict()), sorted(held - set(model.state_dict()))
