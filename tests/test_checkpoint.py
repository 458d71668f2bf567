"""Checkpoint files: a damaged, foreign or mismatched file is a ValueError naming it, found before the
model it describes is allocated."""

import dataclasses
import errno
import json

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel

from dalle_fast.checkpoint import load_checkpoint, load_model, load_weights, read_checkpoint, save_checkpoint
from dalle_fast.dvae import DVAE, DVAEConfig
from dalle_fast.prior import Prior, PriorConfig
from dalle_fast.rerank import Reranker, RerankerConfig
from tests.conftest import requires_file_permissions

TINY = PriorConfig.preset("tiny", layers=1, d_model=32)


def _forge(path, tensors, info):
    save_file(tensors, str(path), metadata={"dalle_fast": info if isinstance(info, str) else json.dumps(info)})


def _tiny_checkpoint(path):
    model = Prior(TINY)
    save_checkpoint(path, modules={"model": model}, meta={"model_config": dataclasses.asdict(TINY)}, rng=False)
    return model


def test_files_that_are_not_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 100)
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable safetensors file"):
        read_checkpoint(garbage)
    good = tmp_path / "good.safetensors"
    _tiny_checkpoint(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        read_checkpoint(truncated)
    weights = {"model.w": torch.zeros(2)}
    # a missing or mistyped step, meta or meta.inputs was a KeyError or AttributeError in the training
    # loop, and deeply nested JSON a RecursionError
    for info, message in (("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                          ({"meta": "text"}, "not a JSON object"), ({"step": 3}, "an object 'meta'"),
                          ({"meta": {}}, "an int 'step'"), ({"step": "3", "meta": {}}, "an int 'step'"),
                          ({"step": 3, "meta": {"inputs": [1]}}, "not a JSON object"),
                          ("[" * 100000 + "]" * 100000, "not valid JSON")):
        _forge(tmp_path / "bad.safetensors", weights, info)
        with pytest.raises(ValueError, match=message):
            read_checkpoint(tmp_path / "bad.safetensors")


def test_a_model_config_that_does_not_fit_its_weights_is_refused_before_allocation(tmp_path):
    path = tmp_path / "prior.safetensors"
    _tiny_checkpoint(path)
    tensors, info = read_checkpoint(path)
    # A config naming a 40-billion-parameter model: building it for real would need ~160 GB.
    huge = dataclasses.asdict(dataclasses.replace(TINY, d_model=16384, heads=128, layers=48))
    for config, message in ((huge, "do not fit this model"),
                            ({**dataclasses.asdict(TINY), "heads": "2"}, "not a valid PriorConfig"),
                            ({**dataclasses.asdict(TINY), "d_model": 33}, "not a valid PriorConfig"),
                            ([1, 2], "model_config is not a JSON object")):
        _forge(tmp_path / "forged.safetensors", tensors, {**info, "meta": {"model_config": config}})
        with pytest.raises(ValueError, match=message) as error:
            load_model(tmp_path / "forged.safetensors", Prior, PriorConfig)
        assert "forged.safetensors" in str(error.value)
    assert isinstance(load_model(path, Prior, PriorConfig), Prior)


def test_resuming_into_another_architecture_names_the_mismatch(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = Prior(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the optimizer holds state to save
    save_checkpoint(path, modules={"model": model}, optimizer=optimizer, step=3)
    other = Prior(dataclasses.replace(TINY, d_model=64))
    with pytest.raises(ValueError, match=r"ckpt.safetensors: its 'model' weights do not fit.*is \[.*32\]"):
        load_checkpoint(path, modules={"model": other}, optimizer=torch.optim.AdamW(other.parameters()))
    same = Prior(TINY)
    assert load_checkpoint(path, modules={"model": same}, optimizer=torch.optim.AdamW(same.parameters()))["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))


def _never_built(cls):
    """`cls`, except that building one fails the test: load_model must refuse before that."""
    return type(f"Unbuilt{cls.__name__}", (cls,), {"__init__": lambda self, config: pytest.fail("model built")})


def test_a_config_counting_more_layers_than_the_file_holds_is_refused_before_any_module_is_built(tmp_path):
    # Building even a storage-less model of 200000 layers takes many minutes: the counts are read
    # from the weights' names first. _never_built fails the test if load_model builds the model.
    dvae_config = DVAEConfig.preset("tiny")
    rerank_config = RerankerConfig(image_size=64, text_len=16, text_vocab=64, embed_dim=16, width=16, text_layers=1,
                                   heads=2, image_width=8)
    cases = [(Prior, PriorConfig, Prior(TINY), "layers", "layers=200000"),
             (DVAE, DVAEConfig, DVAE(dvae_config), "blocks_per_group", "blocks_per_group=200000"),
             (Reranker, RerankerConfig, Reranker(rerank_config), "text_layers", "text_layers=200000")]
    for model_cls, config_cls, model, field, message in cases:
        path = tmp_path / f"{model_cls.__name__}.safetensors"
        save_checkpoint(path, modules={"model": model}, rng=False,
                        meta={"model_config": {**dataclasses.asdict(model.config), field: 200000}})
        with pytest.raises(ValueError, match=message) as error:
            load_model(path, _never_built(model_cls), config_cls)
        assert path.name in str(error.value)
        save_checkpoint(path, modules={"model": model}, rng=False, meta={"model_config": dataclasses.asdict(model.config)})
        assert isinstance(load_model(path, model_cls, config_cls), model_cls)


def test_weights_of_an_integer_dtype_or_not_finite_are_refused(tmp_path):
    path = tmp_path / "prior.safetensors"
    _tiny_checkpoint(path)
    tensors, info = read_checkpoint(path)
    as_int = {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in tensors.items()}
    nan = {**tensors, "model.ln_f.weight": torch.full_like(tensors["model.ln_f.weight"], float("nan"))}
    inf = {**tensors, "model.ln_f.bias": torch.full_like(tensors["model.ln_f.bias"], float("-inf"))}
    for forged, message in ((as_int, "is torch.int8, the model's torch.float32"),
                            (nan, "ln_f.weight is not finite"),
                            (inf, "ln_f.bias is not finite")):
        _forge(tmp_path / "forged.safetensors", forged, info)
        with pytest.raises(ValueError, match=message) as error:
            load_model(tmp_path / "forged.safetensors", Prior, PriorConfig)
        assert "forged.safetensors" in str(error.value)
    # a training checkpoint resumed with such weights is refused the same way
    _forge(tmp_path / "forged.safetensors", nan, info)
    with pytest.raises(ValueError, match="not finite"):
        load_checkpoint(tmp_path / "forged.safetensors", modules={"model": Prior(TINY)}, restore_rng_state=False)


def test_load_model_reads_only_the_weights_it_uses(tmp_path, monkeypatch):
    """A training checkpoint holds the raw and EMA weights, the optimizer's moments and the RNG states:
    loading one model from it reads its EMA weights alone, not three to four times as much."""
    import dalle_fast.checkpoint as checkpoint

    model = Prior(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, modules={"model": model, "ema": AveragedModel(model, use_buffers=True)},
                    optimizer=optimizer, meta={"model_config": dataclasses.asdict(TINY)})
    read = []
    opened = checkpoint.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def metadata(self):
            return self.file.metadata()

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    loaded = load_model(tmp_path, Prior, PriorConfig)  # a run folder: its checkpoint.safetensors, EMA weights
    assert read and all(key.startswith("ema.") for key in read), sorted({k.split(".")[0] for k in read})
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    read.clear()
    load_model(path, Prior, PriorConfig, prefix="model")
    assert read and all(key.startswith("model.") for key in read)
    read.clear()
    assert set(load_weights(path, "ema")) == set(model.state_dict()) and all(k.startswith("ema.") for k in read)


def test_a_failed_write_is_an_os_error_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError, which no caller of save_checkpoint
    expects: it is an OSError (errno ENOSPC) naming the checkpoint."""
    import dalle_fast.checkpoint as checkpoint

    path = tmp_path / "prior.safetensors"
    _tiny_checkpoint(path)
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device") as error:
        _tiny_checkpoint(path)
    assert error.value.errno == errno.ENOSPC and str(path) in str(error.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["prior.safetensors"]


def test_load_model_draws_no_initial_weights_it_would_overwrite(tmp_path):
    # Random initialisation before load_state_dict is wasted work (seconds for a paper-sized
    # model); on the meta device PyTorch's normal_ imports torch._dynamo on first use (1.5 s).
    from tests.test_skeleton import MODELS, RecordOps, random_ops

    for model_cls, config in MODELS:
        model = model_cls(config)
        path = tmp_path / f"{model_cls.__name__}.safetensors"
        save_checkpoint(path, modules={"model": model}, rng=False, meta={"model_config": dataclasses.asdict(config)})
        state = torch.get_rng_state()
        with RecordOps() as ops:
            loaded = load_model(path, model_cls, type(config))
        assert not random_ops(ops.names), (model_cls.__name__, sorted(random_ops(ops.names)))
        assert torch.equal(torch.get_rng_state(), state)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_damaged_rng_state_is_a_clear_error(tmp_path):
    from dalle_fast.checkpoint import restore_rng, rng_tensors

    good = rng_tensors()
    for key, value in (("rng.cpu", good["rng.cpu"][:100]), ("rng.cpu", good["rng.cpu"].float())):
        with pytest.raises(ValueError, match="damaged file"):
            restore_rng({**good, key: value})


@requires_file_permissions
def test_an_unreadable_checkpoint_is_not_called_missing(tmp_path):
    path = tmp_path / "c.safetensors"
    _tiny_checkpoint(path)
    path.chmod(0)
    with pytest.raises(PermissionError):
        read_checkpoint(path)
