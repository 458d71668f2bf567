"""The prior's training data: a dataset encoded once by a trained dVAE and kept on disk.

A cache folder holds
- `images.npy`: uint16 [n, S*S], the dVAE's argmax tokens of every image (raster order);
- `text.npy`: uint16 [n, V, T], V tokenizations of each image's captions: an image whose caption
  file holds L lines (captions) gets variant v from line v mod L, plain the first time a line
  comes up and with BPE dropout after that (the tokenizers library draws its dropout from an
  unseeded RNG, so the draws are made once here and training picks one per access from a
  seeded generator: seeded runs and resumes repeat exactly). Use V >= L to keep every line;
- `captions.json`: each image's captions as read (lines joined by newlines);
  `tokenizer.json`: the BPE that made `text.npy`;
- `meta.json`: what was cached and from what (checked before a cache is reused).
"""

from __future__ import annotations

import json
import operator
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from ..atomic import atomic_write
from ..checkpoint import weights_digest
from ..data import make_dataset
from ..dvae import DVAE
from ..tokenizer import TextTokenizer

_STREAM = 0x70C5  # separates this module's random streams from other users of the same seed
_COUNT_CHUNK = 1 << 22  # image codes counted at a time by unigram_entropy (32 MiB of int64)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def _save_json(path: Path, value) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


@torch.no_grad()
def encode_images(dvae: DVAE, dataset, *, limit: Optional[int], batch_size: int = 64, workers: int = 0,
                  device: torch.device = torch.device("cpu"), progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Tokens uint16 [n, S*S] and captions of the first `limit` items of `dataset` (all if None).

    A streamed dataset that runs dry before `limit` items is an error (nothing is returned): the
    cache would hold fewer images than asked for, and a later run asking for as many would reuse it."""
    total = len(dataset) if not isinstance(dataset, IterableDataset) else None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    if total is None:
        raise ValueError("a streamed dataset (tar shards) needs a number of images to cache")
    if dvae.config.vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"the token cache stores image codes as uint16: a dVAE of {dvae.config.vocab} codes "
                         f"does not fit (at most {np.iinfo(np.uint16).max + 1})")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False)
    tokens: Optional[np.ndarray] = None  # filled as batches arrive: no per-batch copies to concatenate
    captions: list[str] = []
    dvae.eval()
    with tqdm(total=total, desc="encode images", disable=not progress, dynamic_ncols=True) as bar:
        for images, texts in loader:
            need = total - len(captions)
            images, texts = images[:need], list(texts[:need])
            codes = dvae.encode(images.to(device)).flatten(1).cpu().numpy()
            if tokens is None:
                tokens = np.empty((total, codes.shape[1]), dtype=np.uint16)
            tokens[len(captions):len(captions) + len(texts)] = codes
            captions.extend(texts)
            bar.update(len(texts))
            if len(captions) >= total:
                break
    if not captions:
        raise ValueError("the dataset yielded no images")
    if len(captions) < total:
        raise ValueError(f"the data ran out after {len(captions)} of the {total} images asked for (unreadable and "
                         f"incomplete samples are skipped: see the warnings above); ask for at most "
                         f"{len(captions)} (--num-images) to cache what there is")
    return tokens, captions


def tokenize_variants(tokenizer: TextTokenizer, captions: list[str], text_len: int, variants: int,
                      dropout: float) -> tuple[np.ndarray, int]:
    """uint16 [n, variants, text_len] and the number of caption lines truncated to fit.

    `captions[i]` holds image i's captions, one per line. Variant v of image i tokenizes line
    v mod L_i: plainly for v < L_i, with BPE dropout after that. Dropout splits words into more
    tokens; where that would overflow the text positions of a line that fits without it, the
    plain tokenization stands in (dropout never truncates a caption)."""
    if tokenizer.text_vocab_size(text_len) > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"text ids up to {tokenizer.text_vocab_size(text_len)} do not fit uint16")
    lines = [c.split("\n") for c in captions]
    flat = [line for group in lines for line in group]
    first = np.cumsum([0] + [len(group) for group in lines[:-1]])  # image i's lines start at flat[first[i]]
    counts = np.array([len(group) for group in lines])
    if len(counts) and counts.max() > variants:
        warnings.warn(f"{int((counts > variants).sum())} images have more caption lines than the {variants} text "
                      f"variants: their lines past the {variants}th are never trained on (--text-variants "
                      f"{int(counts.max())} keeps them all)", stacklevel=3)
    before = tokenizer.truncated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tokenizer's warning names its first caption only: counted below
        plain = tokenizer.encode_batch(flat, text_len).numpy()
    truncated = tokenizer.truncated - before
    if truncated:
        warnings.warn(f"{truncated} of {len(flat)} caption lines are longer than the {text_len - 1} text tokens: "
                      f"their ends are cut (a larger --text-len keeps them)", stacklevel=3)
    full = plain[:, -1] < tokenizer.bpe_vocab_size  # no pad left: fits exactly or was truncated
    out = np.empty((len(captions), variants, text_len), dtype=np.uint16)
    for v in range(variants):
        row = first + v % counts  # the line of each image this variant uses
        out[:, v] = plain[row]
        again = np.nonzero(v >= counts)[0]  # images whose line comes up again: dropout
        if len(again):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # overflow is handled below, not a user-facing truncation
                ids = tokenizer.encode_batch([flat[r] for r in row[again]], text_len, dropout=dropout).numpy()
            overflow = (ids[:, -1] < tokenizer.bpe_vocab_size) & ~full[row[again]]
            ids[overflow] = plain[row[again]][overflow]
            out[again, v] = ids
    return out, truncated


# Keys of a cache's meta.json that older caches lack, and what such a cache cannot promise.
_LATER_KEYS = {
    "captions": "was built before token caches kept every caption line: it holds one line per image "
                "(the same for one-line captions)",
    "dvae_weights": "was built before token caches recorded the dVAE's weights: a dVAE retrained at the same "
                    "path goes unnoticed",
    "tokenizer": "was built before token caches recorded the tokenizer: its own tokenizer.json is used, "
                 "whatever --tokenizer or --text-vocab say",
    "data_files": "was built before token caches recorded the data's files: images added or captions changed "
                  "since go unnoticed",
}


def build_token_cache(cache: str | Path, *, dvae: Optional[DVAE], data: str, text_len: int, num_images: Optional[int],
                      tokenizer: Optional[TextTokenizer] = None, text_vocab: int = 16384, variants: int = 8,
                      dropout: float = 0.1, seed: int = 0, batch_size: int = 64, workers: int = 0,
                      device: torch.device = torch.device("cpu"), source: str = "") -> Path:
    """Encode `data` with `dvae`, train a BPE on its captions unless `tokenizer` is given, write
    the cache folder and return it. An existing cache built from the same inputs is reused; with
    dvae None (its checkpoint is not here) an existing cache is reused unchecked against the dVAE."""
    cache = Path(cache)
    accepted = tokenizer.fingerprints() if tokenizer is not None else ()  # what a cache built before may record
    given = accepted[0] if accepted else None
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    old = json.loads((cache / "meta.json").read_text()) if (cache / "meta.json").is_file() else None
    if dvae is None:
        if old is None:
            raise FileNotFoundError(f"no token cache in {cache} and no dVAE to build one with")
        warnings.warn(f"{cache}: the dVAE that built this cache is not here; it is used without checking that "
                      "the dVAE is the same", stacklevel=2)
    image_size = dvae.config.image_size if dvae is not None else int(old["image_size"])
    try:  # one process encodes the whole dataset for every rank: a stream must not be split by rank here
        dataset = make_dataset(data, size=image_size, seed=seed, length=num_images, all_captions=True,
                               split_ranks=False)
        files = dataset.fingerprint()
    except (OSError, ValueError) as exc:
        if old is None:
            raise
        # the data is gone (deleted once cached, or on another machine): the cache is reused unchecked against it
        dataset, files = None, None
        warnings.warn(f"{cache}: the data {data!r} cannot be read here ({exc}); the cache is used without "
                      "checking that the data is unchanged", stacklevel=2)
    meta = {"data": data, "data_files": files, "num_images": num_images, "text_len": text_len,
            "variants": variants, "dropout": dropout, "seed": seed, "captions": "all lines",
            "tokenizer": f"trained on the captions, {text_vocab} ids" if tokenizer is None else
            f"given, sha256 {given}"}
    if dvae is not None:
        meta.update(grid=dvae.config.grid, image_vocab=dvae.config.vocab, colour_codes=dvae.config.colour_codes,
                    image_size=dvae.config.image_size, dvae=source,
                    # what the tokens depend on beyond the paths: the dVAE's weights (retrained in place, the
                    # path is the same) and the tokenizer (given, or trained here with text_vocab ids)
                    dvae_weights=weights_digest(dvae))
    if old is not None:
        old.setdefault("colour_codes", 0)  # caches from before factored codes hold plain ones
        if old.get("tokenizer_sha256") in accepted or old.get("tokenizer") in [f"given, sha256 {f}" for f in accepted]:
            old["tokenizer"] = meta["tokenizer"]  # the tokenizer it trained, or was given, is the one given now
        unknown = [k for k in _LATER_KEYS if k not in old and k in meta]  # an older cache's meta lacks them
        if dataset is None:
            unknown.append("data_files")  # nothing to compare with (warned above)
        changed = [k for k in meta if k not in unknown and old.get(k) != meta[k]]
        if changed:
            raise ValueError(f"{cache} holds a token cache built from other inputs (they differ in: "
                             f"{', '.join(changed)}); delete it or pass another cache folder")
        for key in unknown:
            if key not in old and meta[key] is not None:  # not for unreadable data (warned) or synthetic (no files)
                warnings.warn(f"{cache} {_LATER_KEYS[key]}; delete it to rebuild", stacklevel=2)
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    images, captions = encode_images(dvae, dataset, limit=num_images, batch_size=batch_size, workers=workers,
                                     device=device)
    if tokenizer is None:
        tokenizer = TextTokenizer.train([line for c in captions for line in c.split("\n")], vocab_size=text_vocab)
    tokenizer.save(cache / "tokenizer.json")
    text, truncated = tokenize_variants(tokenizer, captions, text_len, variants, dropout)
    _save_npy(cache / "images.npy", images)
    _save_npy(cache / "text.npy", text)
    _save_json(cache / "captions.json", captions)
    meta.update(count=len(captions), truncated=truncated, bpe_vocab=tokenizer.bpe_vocab_size,
                tokenizer_sha256=tokenizer.fingerprint())
    _save_json(cache / "meta.json", meta)  # last: its presence marks a complete cache
    return cache


class TokenCache(Dataset):
    """`(text [T], image [S*S])` int64 pairs from a cache folder; the text is one of the caption's
    cached tokenizations, drawn from a generator seeded with (seed, epoch, index)."""

    def __init__(self, cache: str | Path, seed: int = 0):
        self.root = Path(cache)
        if not (self.root / "meta.json").is_file():
            raise FileNotFoundError(f"no complete token cache in {self.root} (meta.json missing)")
        self.meta = json.loads((self.root / "meta.json").read_text())
        self._map()
        if len(self.images) != len(self.text):
            raise ValueError(f"{self.root}: {len(self.images)} image rows but {len(self.text)} caption rows")
        self.seed, self.epoch = seed, 0

    def _map(self) -> None:
        # mapped, not read: every rank (and DataLoader worker) shares the page cache instead of a copy each
        self.images = np.load(self.root / "images.npy", mmap_mode="r", allow_pickle=False)
        self.text = np.load(self.root / "text.npy", mmap_mode="r", allow_pickle=False)

    def __getstate__(self) -> dict:
        # a pickled memmap carries its data: a spawned DataLoader worker maps the files again instead
        return {k: v for k, v in self.__dict__.items() if k not in ("images", "text")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, index = len(self.images), operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a token cache of {n} images")
        index %= n  # a negative index counts from the end, and draws what its positive twin draws
        variants = self.text.shape[1]
        v = 0 if variants == 1 else int(np.random.default_rng([_STREAM, self.seed, self.epoch, index]).integers(variants))
        text = torch.from_numpy(self.text[index, v].astype(np.int64))  # astype copies out of the mapping
        image = torch.from_numpy(self.images[index].astype(np.int64))
        return text, image

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the image tokens' frequencies: the loss of a model that ignores context."""
        counts = np.zeros(int(self.meta["image_vocab"]), dtype=np.float64)
        rows = max(1, _COUNT_CHUNK // max(1, self.images.shape[1]))  # bincount widens to int64: a chunk at a time
        for start in range(0, len(self.images), rows):
            counts += np.bincount(self.images[start:start + rows].ravel(), minlength=len(counts))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
