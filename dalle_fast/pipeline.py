"""Text to images: prompt -> tokenizer -> sampler (prior) -> dVAE decoder -> reranker -> images.

A model folder holds everything generation needs, weights only:
    dvae.safetensors, prior.safetensors, tokenizer.json, and optionally reranker.safetensors
(`export_model_folder` writes one from training runs). `load_models(None)` opens the model
bundled with the package. An exported prior records the digest of the dVAE whose codes it was
trained on and the fingerprint of its tokenizer (a reranker, the tokenizer's; the dVAE, its own
digest), so that a folder whose files come from different exports is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .data.transforms import UnreadableImage, center_crop_resize, load_rgb_transparency, one_line, to_tensor
from .dvae import DVAE, DVAEConfig
from .prior import Prior, PriorConfig
from .rerank import Reranker, RerankerConfig
from .sampler import SamplingConfig, sample_image_tokens
from .tokenizer import TextTokenizer
from .atomic import atomic_write_all
from .checkpoint import checkpoint_file, checkpoint_writer, load_model, read_info, weights_digest

BUNDLED = Path(__file__).resolve().parent / "assets" / "model"
FILES = {"dvae": "dvae.safetensors", "prior": "prior.safetensors", "reranker": "reranker.safetensors",
         "tokenizer": "tokenizer.json"}
# The keys under which a model records the dVAE and the tokenizer it goes with (a train-prior run's
# config.json records the dVAE's under "cache" too)
DVAE_DIGEST, TOKENIZER_DIGEST = "dvae_weights", "tokenizer_sha256"


@dataclass
class Models:
    dvae: DVAE
    prior: Prior
    tokenizer: TextTokenizer
    reranker: Optional[Reranker]
    folder: Path

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device


def load_models(folder: Optional[str | Path] = None, device: str | torch.device = "cpu") -> Models:
    """Open a model folder (None: the bundled model) on `device`."""
    if folder is None:
        folder = BUNDLED
        if not (folder / FILES["prior"]).is_file():
            raise FileNotFoundError("this installation has no bundled model; pass a model folder "
                                    "(`dalle-fast export-model` makes one from training runs)")
    folder = Path(folder)
    required = [name for key, name in FILES.items() if key != "reranker"]
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a model folder (a folder of {', '.join(required)}, "
                                 "as `dalle-fast export-model` writes)")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {', '.join(missing)}")
    paths = {key: folder / name for key, name in FILES.items() if (folder / name).is_file()}
    dvae = load_model(paths["dvae"], DVAE, DVAEConfig, kind="dvae")
    prior = load_model(paths["prior"], Prior, PriorConfig, kind="prior")
    reranker = load_model(paths["reranker"], Reranker, RerankerConfig, kind="reranker") if "reranker" in paths else None
    tokenizer = TextTokenizer.load(paths["tokenizer"])
    check_compatible(folder, dvae, prior, tokenizer, reranker)
    digests = functools.cache(lambda: dvae_digests(paths["dvae"], dvae, as_loaded=False))  # hashed only if asked
    check_parts(folder, paths, digests, tokenizer.fingerprints())
    return Models(dvae.to(device), prior.to(device), tokenizer, None if reranker is None else reranker.to(device),
                  folder)


def check_compatible(where, dvae: DVAE, prior: Prior, tokenizer: TextTokenizer, reranker: Optional[Reranker]) -> None:
    """A ValueError (naming `where`) unless the models and the tokenizer work together."""
    if tokenizer.text_vocab_size(prior.config.text_len) != prior.config.text_vocab_total:
        raise ValueError(f"{where}: the tokenizer's {tokenizer.bpe_vocab_size} ids do not match the prior's "
                         f"text vocabulary of {prior.config.text_vocab}")
    if reranker is not None and tokenizer.text_vocab_size(reranker.config.text_len) != reranker.config.text_vocab:
        raise ValueError(f"{where}: the tokenizer's {tokenizer.bpe_vocab_size} ids do not match the reranker's "
                         f"text vocabulary of {reranker.config.text_vocab} (was it trained with another tokenizer?)")
    if dvae.config.colour_codes != prior.config.colour_codes:
        raise ValueError(f"{where}: the dVAE's codes have {dvae.config.colour_codes or 'no'} colour factors but the "
                         f"prior expects {prior.config.colour_codes or 'none'}")
    if (dvae.config.grid, dvae.config.vocab) != (prior.config.grid, prior.config.image_vocab):
        raise ValueError(f"{where}: the dVAE makes {dvae.config.grid}x{dvae.config.grid} grids of "
                         f"{dvae.config.vocab} codes but the prior models {prior.config.grid}x{prior.config.grid} "
                         f"grids of {prior.config.image_vocab}")


def dvae_digests(path: str | Path, dvae: DVAE, as_loaded: bool = True) -> tuple[str, ...]:
    """Which dVAE this is: the digest an exported dVAE file records (of its weights as trained,
    before the export's cast; first: the one an export records), and with `as_loaded` (or when the
    file records none) that of the weights as loaded: a training checkpoint's, or an exported
    file's, which a train-prior run given that file records."""
    recorded = read_info(checkpoint_file(path)).get("meta", {}).get(DVAE_DIGEST)
    if not isinstance(recorded, str):
        return (weights_digest(dvae),)
    return (recorded, weights_digest(dvae)) if as_loaded else (recorded,)


def _records(path: Path, tokenizer: Path) -> list[tuple[str, str, Path]]:
    """What the model at `path` records about the dVAE and the tokenizer it was trained with, and
    where: (DVAE_DIGEST or TOKENIZER_DIGEST, the digest, the file that says so). An exported model
    records them in its metadata; a training run in its run folder (`path`, or the checkpoint's
    folder): config.json (the train-prior token cache's dVAE digest) and tokenizer.json (other
    than `tokenizer` itself)."""
    file = checkpoint_file(path)
    meta = read_info(file).get("meta", {})
    found = [(key, meta[key], file) for key in (DVAE_DIGEST, TOKENIZER_DIGEST) if isinstance(meta.get(key), str)]
    config = file.parent / "config.json"
    if config.is_file():
        try:
            record = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config}, the record of the run of {path}, is not valid JSON ({exc})") from None
        cache = record.get("cache") if isinstance(record, dict) else None
        if isinstance(cache, dict) and isinstance(cache.get(DVAE_DIGEST), str):
            found.append((DVAE_DIGEST, cache[DVAE_DIGEST], config))
    theirs = file.parent / FILES["tokenizer"]
    if theirs.is_file() and not theirs.samefile(tokenizer):
        found.append((TOKENIZER_DIGEST, TextTokenizer.load(theirs).fingerprint(), theirs))
    return found


def check_parts(where, paths: dict[str, Path], dvae: Callable[[], tuple[str, ...]], tokenizer: tuple[str, ...]) -> None:
    """A ValueError (naming `where` and the files) unless the prior (and the reranker) at `paths`
    were trained with the dVAE of one of the digests `dvae()` (called only when a record names
    one) and the tokenizer of one of the fingerprints `tokenizer` (TextTokenizer.fingerprints),
    wherever they record it (see _records)."""
    for key in ("prior", "reranker"):
        if key not in paths:
            continue
        for what, digest, source in _records(paths[key], paths["tokenizer"]):
            if what == TOKENIZER_DIGEST and digest not in tokenizer:
                raise ValueError(f"{where}: {paths[key]} was trained with another tokenizer than {paths['tokenizer']} "
                                 f"(by {source}): it would read other words")
            if what == DVAE_DIGEST and digest not in dvae():
                raise ValueError(f"{where}: {paths[key]} was trained on the codes of another dVAE than {paths['dvae']} "
                                 f"({source} records dVAE weights {digest[:12]}, {paths['dvae']}'s are "
                                 f"{' or '.join(d[:12] for d in dvae())})")


def export_model_folder(out: str | Path, *, dvae: str | Path, prior: str | Path, tokenizer: str | Path,
                        reranker: Optional[str | Path] = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write a model folder from training checkpoints: their EMA weights (in `dtype`) and configs.
    Every input is read and checked against the others before anything is written: sizes, and the
    dVAE and tokenizer that the prior's and the reranker's runs (or exported files) record. The
    files are written whole before any replaces the folder's, so a failure (a full disk) leaves
    `out` as it was; a reranker file left in `out` by an earlier export is removed when `reranker`
    is None."""
    out = Path(out)
    paths = {"dvae": Path(dvae), "prior": Path(prior), "tokenizer": Path(tokenizer)}
    sources = {"dvae": (DVAE, DVAEConfig), "prior": (Prior, PriorConfig)}
    if reranker is not None:
        paths["reranker"] = Path(reranker)
        sources["reranker"] = (Reranker, RerankerConfig)
    models = {key: load_model(paths[key], *classes, kind=key) for key, classes in sources.items()}
    text = TextTokenizer.load(tokenizer)
    where = f"export to {out}"
    check_compatible(where, models["dvae"], models["prior"], text, models.get("reranker"))
    digests = dvae_digests(paths["dvae"], models["dvae"])
    fingerprints = text.fingerprints()
    records = {DVAE_DIGEST: digests[0], TOKENIZER_DIGEST: fingerprints[0]}
    check_parts(where, paths, lambda: digests, fingerprints)
    recorded_in = {"dvae": (DVAE_DIGEST,), "prior": (DVAE_DIGEST, TOKENIZER_DIGEST), "reranker": (TOKENIZER_DIGEST,)}
    files = {out / FILES[key]: checkpoint_writer(out / FILES[key], modules={"model": model.to(dtype)}, rng=False,
                                                 meta={"model_config": dataclasses.asdict(model.config), "kind": key,
                                                       **{k: records[k] for k in recorded_in[key]}})
             for key, model in models.items()}
    files[out / FILES["tokenizer"]] = lambda tmp: shutil.copyfile(tokenizer, tmp)
    atomic_write_all(files, remove=[] if reranker is not None else [out / FILES["reranker"]])
    return out


@dataclass
class Generation:
    images: torch.Tensor  # [keep, 3, H, W] in [0, 1], best first
    scores: Optional[torch.Tensor]  # [keep] reranker scores (None without a reranker)
    tokens: torch.Tensor  # [keep, S*S] image tokens
    order: torch.Tensor  # [keep] each kept image's index among the num candidates, in sampling order
    seconds: float  # wall time of sampling, decoding and reranking
    num_sampled: int


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"the prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("the prompt is empty: describe the image to generate, e.g. 'a red circle above a blue square'")
    if not any(ch.isprintable() and not ch.isspace() for ch in prompt):
        raise ValueError(f"the prompt {prompt!r} has no visible character (only control or format characters)")


def normalize_prompt(prompt: str) -> str:
    """The prompt as the model reads it: runs of whitespace, line breaks included, become one space
    and the ends are stripped, as the captions the model learnt from (data.transforms.one_line)."""
    return one_line(prompt)


def check_request(prompt: str, num: int, keep: int, seed: int, batch: Optional[int] = None) -> None:
    """What generate() refuses, checked without a model (a CLI checks before it loads one)."""
    _check_prompt(prompt)
    for name, value in (("num", num), ("keep", keep), ("batch", 1 if batch is None else batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if keep > num:
        raise ValueError(f"keep ({keep}) cannot exceed num ({num})")
    # torch's CPU generator keeps 32 bits of a seed: 7 and 7 + 2**32 would draw the same images
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def encode_prompt(tokenizer: TextTokenizer, prompt: str, text_len: int) -> torch.Tensor:
    """[1, text_len] ids of normalize_prompt(prompt); an empty prompt, or one with no visible
    character, is an error, an over-long one is truncated (with a warning)."""
    ids, truncated = _encode_prompt(tokenizer, prompt, text_len)
    if truncated:
        _warn_truncated(text_len, stacklevel=2)
    return ids


def _encode_prompt(tokenizer: TextTokenizer, prompt: str, text_len: int) -> tuple[torch.Tensor, bool]:
    """encode_prompt's ids, and whether the prompt was truncated, without a warning."""
    _check_prompt(prompt)
    truncated = tokenizer.truncated
    with warnings.catch_warnings():  # the tokenizer warns once per instance; our callers, once per prompt
        warnings.simplefilter("ignore")
        ids = tokenizer.encode_batch([normalize_prompt(prompt)], text_len)
    return ids, tokenizer.truncated > truncated


def _warn_truncated(text_len: int, stacklevel: int) -> None:
    """The long-prompt warning; `stacklevel` counts from the caller as warnings.warn's does (1: the caller)."""
    warnings.warn(f"the prompt is longer than the model's {text_len - 1} text tokens; only its beginning is used",
                  stacklevel=stacklevel + 1)


def check_prime(image_path: str | Path, rows: int, grid: int):
    """The priming image (a PIL image) once `rows` is a row count of the grid and the file an image;
    a ValueError (or FileNotFoundError) naming the file otherwise."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows < grid:  # at grid, nothing is sampled
        raise ValueError(f"rows must be an int in 1..{grid - 1} (the model's grid has {grid} token rows, and at "
                         f"least one is sampled), got {rows!r}")
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"priming image {image_path}: no such file")
    try:
        image, transparent = load_rgb_transparency(image_path)
    except (UnreadableImage, OSError) as exc:
        raise ValueError(f"priming image {image_path} is not an image this tool reads ({exc})") from None
    if transparent:  # the dVAE reads what the composite shows: the bundled shapes model's background is black
        warnings.warn(f"priming image {image_path} has transparent pixels: they are primed as white (the "
                      "model's training images may have had another background there)", stacklevel=2)
    return image


def prime_tokens(dvae: DVAE, image_path: str | Path, rows: int) -> torch.Tensor:
    """The first `rows` rows of an image's dVAE tokens: [rows * S]."""
    image = check_prime(image_path, rows, dvae.config.grid)
    image = to_tensor(center_crop_resize(image, dvae.config.image_size))
    device = next(dvae.parameters()).device
    with torch.no_grad():
        tokens = dvae.encode(image.unsqueeze(0).to(device))  # (1, S, S)
    return tokens[0, :rows].reshape(-1)


@torch.no_grad()
def generate(models: Models, prompt: str, *, num: int = 8, keep: int = 4, seed: int = 0,
             sampling: Optional[SamplingConfig] = None, prime_image: Optional[str | Path] = None,
             prime_rows: int = 0, batch: Optional[int] = None) -> Generation:
    """Sample `num` candidates for `prompt`, rerank them and keep the best `keep`. The candidates
    are sampled as one batch, or `batch` at a time (less memory; a seed then draws other images)."""
    check_request(prompt, num, keep, seed, batch)
    if prime_image is None and prime_rows:
        raise ValueError(f"prime_rows={prime_rows!r} needs prime_image, the image whose top rows are kept")
    device = models.device
    rr = models.reranker
    # one warning for a long prompt, with the shorter text length of the prior's and the reranker's
    lengths = [models.prior.config.text_len] + ([] if rr is None else [rr.config.text_len])
    encoded = [_encode_prompt(models.tokenizer, prompt, n) for n in lengths]
    cut = [n for n, (_, truncated) in zip(lengths, encoded) if truncated]
    if cut:
        _warn_truncated(min(cut), stacklevel=3)  # past torch.no_grad's wrapper: generate's caller
    text = encoded[0][0].to(device)
    rtext = encoded[1][0].to(device) if rr is not None else None
    prime = None
    if prime_image is not None:
        prime = prime_tokens(models.dvae, prime_image, prime_rows).to(device).unsqueeze(0)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    guided = sampling is not None and sampling.guided
    null = models.tokenizer.null_text(models.prior.config.text_len).to(device) if guided else None
    grid = models.prior.config.grid
    batch = num if batch is None else batch
    tokens, images, scores = [], [], []
    for first in range(0, num, batch):
        n = min(batch, num - first)
        tokens.append(sample_image_tokens(models.prior, text.expand(n, -1),
                                          prime=None if prime is None else prime.expand(n, -1), config=sampling,
                                          generator=generator, null_text=null))
        images.append(models.dvae.decode(tokens[-1].view(n, grid, grid)).float())
        if rr is not None:
            scores.append(rr.score(rtext, images[-1]))
    tokens, images = torch.cat(tokens), torch.cat(images)
    scores = torch.cat(scores) if scores else None
    order = torch.arange(num, device=device) if scores is None else scores.argsort(descending=True)
    order = order[:keep]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Generation(images=images[order].cpu(), scores=None if scores is None else scores[order].cpu(),
                      tokens=tokens[order].cpu(), order=order.cpu(), seconds=seconds, num_sampled=num)
