"""Checkpoints in safetensors, written atomically: training checkpoints hold everything an exact
resume needs; model folders (pipeline.py) hold weights and configs. Shared by training and generation.

A checkpoint is one .safetensors file: model and EMA weights, the optimizer's tensors, and the
RNG states as tensors; step, configuration and the optimizer's hyper-parameters as JSON in the
file's metadata. Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .skeleton import without_random_init

_META_KEY = "dalle_fast"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors(generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """The global CPU and CUDA RNG states, plus any named generators'."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    for name, gen in (generators or {}).items():
        out[f"rng.gen.{name}"] = gen.get_state()
    return out


def _rank_rng(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """One process's RNG tensors out of a checkpoint: rank 0's are stored as 'rng.*' (as a single
    process's), rank r's as 'rng.rank{r}.*'."""
    if rank == 0:
        return {k: v for k, v in tensors.items() if k.startswith("rng.") and not k.startswith("rng.rank")}
    prefix = f"rng.rank{rank}."
    return {"rng." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator] | None = None,
                rank: int = 0) -> None:
    """Restore the RNG states `rank` saved (rng_tensors); a rank the checkpoint has none for (it
    was written by fewer processes), or a generator whose state was saved on another kind of device
    (a GPU run resumed on the CPU), keeps its seeded state, with a warning."""
    tensors = _rank_rng(tensors, rank)
    if "rng.cpu" not in tensors:
        warnings.warn(f"the checkpoint holds no RNG state of rank {rank}: its random draws start from the seed",
                      stacklevel=2)
        return
    for key, value in tensors.items():  # a damaged state: set_state's RuntimeError or TypeError named nothing
        if value.dtype != torch.uint8 or value.dim() != 1:
            raise ValueError(f"the checkpoint's RNG state {key} is not a byte vector ({value.dtype}, "
                             f"{list(value.shape)}): a damaged file?")
    if tensors["rng.cpu"].numel() != torch.get_rng_state().numel():
        raise ValueError(f"the checkpoint's CPU RNG state has {tensors['rng.cpu'].numel()} bytes, not "
                         f"{torch.get_rng_state().numel()}: a damaged file?")
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    for name, gen in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key not in tensors:
            continue
        if tensors[key].numel() != gen.get_state().numel():  # a CUDA generator's state is 16 bytes, a CPU one's 5056
            warnings.warn(f"the checkpoint's state of generator {name!r} was saved on another kind of device than "
                          f"this {gen.device.type} one: its random draws start from the seed", stacklevel=2)
            continue
        gen.set_state(tensors[key])


def save_checkpoint(path: str | Path, **contents) -> Path:
    """Write atomically (temporary file in the same folder, then rename): a crash mid-write
    leaves the previous checkpoint intact. `contents`: checkpoint_writer's."""
    return atomic_write(path, checkpoint_writer(path, **contents))


def checkpoint_writer(path: str | Path, *, modules: dict[str, torch.nn.Module],
                      optimizer: torch.optim.Optimizer | None = None, step: int = 0, meta: dict | None = None,
                      generators: dict[str, torch.Generator] | None = None, rng: bool = True,
                      rank_rng: list[dict[str, torch.Tensor]] | None = None) -> Callable[[str], None]:
    """`write(tmp)` for atomic_write(path, ...): the checkpoint of these objects, taken now. `rng`:
    also store the RNG states, which resuming a training needs; an exported model leaves them out,
    so that the same weights export to the same bytes. `rank_rng`: every process's rng_tensors, by
    rank (a distributed run's); default: this process's, with `generators`. A failed write (a full
    disk) is an OSError naming `path`."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous()
    info: dict[str, Any] = {"step": step, "meta": meta or {}}
    if optimizer is not None:
        opt_tensors, info["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update({k: v.cpu() for k, v in opt_tensors.items()})
    if rng:
        for rank, states in enumerate(rank_rng if rank_rng is not None else [rng_tensors(generators)]):
            name = "rng." if rank == 0 else f"rng.rank{rank}."
            tensors.update({name + k[len("rng."):]: v.cpu() for k, v in states.items()})
    # safetensors refuses tensors that share memory (tied weights): store copies.
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            tensors[k] = v.clone()
        seen.add(ptr)
    metadata = {_META_KEY: json.dumps(info)}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as exc:  # safetensors reports I/O errors (a full disk) as its own kind
            code = re.search(r"os error (\d+)", str(exc))
            if code:
                raise OSError(int(code[1]), f"{os.strerror(int(code[1]))} (writing {path})") from None
            raise OSError(f"could not write {path}: {exc}") from None

    return write


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a checkpoint (on CPU) and its JSON info (step, meta, optimizer). A file
    that is not one (another format, truncated, bad metadata) is a ValueError naming it."""
    return _read(path, lambda keys: keys)


def read_info(path: str | Path) -> dict:
    """A checkpoint's JSON info alone (read_checkpoint's; no tensor is read)."""
    return _read(path, lambda keys: ())[1]


def _read(path: str | Path, pick: Callable[[list[str]], Iterable[str]]) -> tuple[dict[str, torch.Tensor], dict]:
    """read_checkpoint, reading only the tensors `pick` chooses from the file's tensor names (the
    others, a training checkpoint's optimizer state and EMA or raw weights, stay on disk)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    open(path, "rb").close()  # an unreadable file's own error (safe_open calls any failure "No such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            if raw is None:
                raise ValueError(f"{path} is not a dalle_fast training checkpoint (no '{_META_KEY}' metadata)")
            try:
                info = json.loads(raw)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"{path}: its '{_META_KEY}' metadata is not valid JSON ({exc})") from None
            if (not isinstance(info, dict) or not isinstance(info.get("meta"), dict)
                    or not isinstance(info.get("step"), int) or isinstance(info.get("step"), bool)
                    or not isinstance(info["meta"].get("inputs", {}), dict)):
                raise ValueError(f"{path}: its '{_META_KEY}' metadata is not a JSON object with an int 'step' and "
                                 "an object 'meta'")
            tensors = {key: f.get_tensor(key) for key in pick(list(f.keys()))}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    return tensors, info


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating tensors that hold a NaN or an infinity."""
    return [name for name, value in tensors.items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


_WHY = "another preset or config, or a damaged file?"


def _check_fits(module: torch.nn.Module, weights: dict[str, torch.Tensor], path, what: str) -> None:
    """A ValueError naming the file unless `weights` has exactly the module's names and shapes, is
    floating where the module is (an integer tensor would load as its truncated values), and finite
    (the module may live on the meta device: nothing is read of it but the shapes and dtypes)."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    for k, v in expected.items():
        if k in weights and weights[k].shape != v.shape:
            problems.append(f"{k} is {list(weights[k].shape)}, the model's {list(v.shape)}")
        elif k in weights and weights[k].is_floating_point() != v.is_floating_point():
            problems.append(f"{k} is {weights[k].dtype}, the model's {v.dtype}")
    problems += [f"{k} is not finite (NaN or inf)" for k in non_finite(weights)]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"{path}: its {what} weights do not fit this model ({_WHY}): "
                         f"{'; '.join(problems[:4])}{more}")


def load_checkpoint(path: str | Path, *, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: dict[str, torch.Generator] | None = None, restore_rng_state: bool = True,
                    rank: int = 0) -> dict:
    """Load what save_checkpoint wrote into the given objects (the RNG states of process `rank`);
    returns the JSON info."""
    tensors, info = read_checkpoint(path)
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not sub:
            raise ValueError(f"{path} holds no '{prefix}' weights")
        _check_fits(module, sub, path, f"'{prefix}'")
        module.load_state_dict(sub)
    if optimizer is not None:
        if "optimizer" not in info:
            raise ValueError(f"{path} holds no optimizer state")
        try:
            _restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")},
                               info["optimizer"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: its optimizer state does not fit this run's optimizer ({exc!r})") from None
    if restore_rng_state:
        restore_rng(tensors, generators, rank)
    return info


def load_weights(path: str | Path, prefix: str = "ema") -> dict[str, torch.Tensor]:
    """Just the weights under `prefix` (e.g. 'ema' or 'model'), for inference. The EMA copy's
    AveragedModel wrapper ('module.' and its 'n_averaged' counter) is stripped."""
    return _weights(_read(path, lambda keys: _under(keys, prefix))[0], prefix, path)


def _default_prefix(keys: Iterable[str]) -> str:
    """A training checkpoint's EMA weights, else an exported model's."""
    return "ema" if _under(keys, "ema") else "model"


def _under(keys: Iterable[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix + ".")]


def _weights(tensors: dict[str, torch.Tensor], prefix: str, path) -> dict[str, torch.Tensor]:
    sub = {k[len(prefix) + 1:]: tensors[k] for k in _under(tensors, prefix)}
    if not sub:
        raise ValueError(f"{path} holds no '{prefix}' weights")
    if "n_averaged" in sub:
        sub = {k[len("module."):]: v for k, v in sub.items() if k.startswith("module.")}
    return sub


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes): whether two models are the
    same weights, wherever they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint's path: `path` itself, or a run folder's checkpoint.safetensors."""
    path = Path(path)
    return path / "checkpoint.safetensors" if path.is_dir() else path


# The config fields that count repeated modules, by config class: the weights' names show how many
# the file holds (the distinct values of the pattern's group).
_COUNTED = {
    "PriorConfig": {"layers": r"blocks\.(\d+)\."},
    "RerankerConfig": {"text_layers": r"text_encoder\.layers\.(\d+)\."},
    "DVAEConfig": {"groups": r"decoder\.blocks\.group_(\d+)\.",
                   "blocks_per_group": r"decoder\.blocks\.group_\d+\.block_(\d+)\."},
}


def _check_counts(config, weights: dict[str, torch.Tensor], path, what: str) -> None:
    """A ValueError naming the file unless each count of repeated modules in `config` is the
    number the weights hold: found from the names alone, before any module is built."""
    for field, pattern in _COUNTED.get(type(config).__name__, {}).items():
        held = {m[1] for m in map(re.compile(pattern).match, weights) if m}
        if getattr(config, field) != len(held):
            raise ValueError(f"{path}: its {what} weights do not fit this model ({_WHY}): its model_config says "
                             f"{field}={getattr(config, field)!r}, the weights hold {len(held)}")


def load_model(path: str | Path, model_cls, config_cls, prefix: Optional[str] = None, kind: Optional[str] = None):
    """Rebuild a model from a checkpoint: its config from the checkpoint's metadata, its weights
    from `prefix` (default: the EMA weights of a training checkpoint, else the 'model' weights of
    an exported one). `path` may be a run folder (its checkpoint.safetensors). `kind` ("dvae",
    "prior", "reranker"): a file whose metadata names another kind is refused as such. Returns the
    model in eval mode."""
    path = checkpoint_file(path)
    # only the weights used are read: a training checkpoint's other weights and optimizer state
    # (three times the model or more) stay on disk
    tensors, info = _read(path, lambda keys: _under(keys, prefix or _default_prefix(keys)))
    prefix = prefix or _default_prefix(tensors)
    theirs = info.get("meta", {}).get("kind")
    if kind is not None and isinstance(theirs, str) and theirs != kind:
        raise ValueError(f"{path} holds a {theirs} model, not a {kind}")
    config = info.get("meta", {}).get("model_config")
    if config is None:
        raise ValueError(f"{path} records no model_config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its model_config is not a JSON object")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(config) - fields
    if unknown:
        raise ValueError(f"{path}: model_config has fields {sorted(unknown)} unknown to {config_cls.__name__}")
    try:
        config = config_cls(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its model_config is not a valid {config_cls.__name__}: {exc}") from None
    weights = _weights(tensors, prefix, path)
    # Names and shapes are checked on a model without storage first, so that a config naming a
    # huge model (a damaged or hostile file) fails before anything is allocated; and the counts of
    # repeated layers before that, since building a model of 200000 layers takes minutes even there.
    _check_counts(config, weights, path, f"'{prefix}'")
    with without_random_init("meta"):
        _check_fits(model_cls(config), weights, path, f"'{prefix}'")
    with without_random_init():  # every value is the file's: strict load_state_dict writes each tensor
        model = model_cls(config)
    model.load_state_dict(weights)
    return model.eval()
