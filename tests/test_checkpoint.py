"""Checkpoint files: a damaged, foreign or mismatched file is a ValueError naming it, found before the
model it describes is allocated."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from dalle_fast.checkpoint import load_checkpoint, load_model, read_checkpoint, save_checkpoint
from dalle_fast.prior import Prior, PriorConfig

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
    for info, message in (("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                          ({"meta": "text"}, "not a JSON object")):
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
