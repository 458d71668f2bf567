"""Byte-level BPE text tokenizer for the DALL-E prior.

Text stream layout, for a prior with ``text_len`` = T text positions::

    position:  0        1 .. n                 n+1 .. T-1
    id:        BOS      caption BPE tokens     pad(p) = bpe_vocab_size + p

* BOS ("<|bos|>") is a special token inside the BPE vocabulary (id 0 when trained here).
* A caption keeps at most T-1 BPE tokens; longer ones are truncated (counted in ``truncated``,
  with one warning per tokenizer).
* Each unused position p gets its own pad id, ``bpe_vocab_size + p``. The pads are not part of
  the BPE vocabulary, so the prior's text embedding has ``text_vocab_size(T) = bpe_vocab_size + T``
  rows. A position-specific pad lets the prior tell "no text here" apart per position instead
  of sharing one embedding that every empty slot would have to agree on.

Captions are NFKC-normalized and lowercased by the tokenizer's normalizer, so the behaviour is
stored in the saved JSON rather than depending on callers. The byte-level pre-tokenizer means
every unicode string (non-ASCII, emoji) encodes without unknown tokens and decodes losslessly
back to its normalized form.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .atomic import atomic_write

_N_BYTES = 256
_MAX_TEXT_IDS = 2**16  # the token cache's uint16
# Texts whose ids show what the normalizer and the pre-tokenizer do (case, Unicode forms, spaces,
# punctuation, digits, bytes): part of a tokenizer's fingerprint.
_PROBES = ("A Red Circle above a blue square.", " two  spaces\tand\nlines ", "\ufb01ne \u00bd caf\u00e9 cafe\u0301",
           "x-y, z; (w) 'q' \"r\" 12345 3.14", "\u00dcBER \u0130stanbul \u03a3\u03c3\u03c2 \u4e2d\u6587 \U0001f600")


def _check_text_len(text_len) -> None:
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
        raise ValueError(f"text_len must be an int >= 1, got {text_len!r}")


def _check_captions(captions, what: str = "captions") -> Iterable:
    """Many captions, not one: a str is an iterable of characters, each of which would pass as a caption."""
    if isinstance(captions, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of str, got a single {type(captions).__name__}: each "
                        "character would be a caption (wrap a single caption in a list)")
    return captions


def _check_caption(caption) -> str:
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    if not caption.isascii():
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a file decoded with surrogateescape
            raise ValueError(f"caption {caption[:40]!r} is not valid Unicode text ({exc.reason} at "
                             f"position {exc.start})") from None
    return caption


class TextTokenizer:
    BOS: str = "<|bos|>"

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        spec = json.loads(tokenizer.to_str())
        if spec["model"].get("type") != "BPE":
            raise ValueError(f"expected a BPE model, got {spec['model'].get('type')!r}")
        if tokenizer.token_to_id(self.BOS) is None:
            raise ValueError(f"tokenizer has no {self.BOS!r} token")
        # Work on a private copy with dropout off, so dropout=0 stays deterministic whatever the
        # caller's object was configured with, and so we never mutate the caller's tokenizer.
        spec["model"]["dropout"] = None
        self._spec = spec
        self._tokenizers: dict[float, Tokenizer] = {}
        self.tokenizer = self._with_dropout(0.0)
        self._bpe_vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._bos_id = self.tokenizer.token_to_id(self.BOS)
        self.truncated = 0
        self.encoded = 0
        self._warned = False

    def _with_dropout(self, dropout: float) -> Tokenizer:
        if dropout not in self._tokenizers:
            spec = dict(self._spec, model=dict(self._spec["model"], dropout=dropout or None))
            tok = Tokenizer.from_str(json.dumps(spec))
            # A caption containing the literal text "<|bos|>" must stay text, not become BOS.
            # This flag is not stored in the JSON, so it is set on every instance.
            tok.encode_special_tokens = True
            # Layout (BOS, truncation, pads) is ours; a loaded file's own settings would fight it.
            tok.no_truncation()
            tok.no_padding()
            # Old tokenizers releases served cached words even with dropout set, silently making
            # it a no-op; 0.23 skips the cache when dropout is on (test_dropout guards this).
            self._tokenizers[dropout] = tok
        return self._tokenizers[dropout]

    @staticmethod
    def check_vocab_size(vocab_size: int, text_len: int = 0) -> None:
        """A ValueError unless vocab_size is an int from 257 (256 byte symbols + BOS) to
        65536 - text_len: the token cache stores text ids as uint16, with text_len position pads
        above the BPE ids (a larger vocabulary also made the BPE trainer abort the process)."""
        top = _MAX_TEXT_IDS - text_len
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not _N_BYTES + 1 <= vocab_size <= top:
            pads = f" with {text_len} pads" if text_len else ""
            raise ValueError(f"vocab_size must be an int in [{_N_BYTES + 1}, {top}] (256 byte symbols + BOS, up to "
                             f"{_MAX_TEXT_IDS} text ids{pads}), got {vocab_size!r}")

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 16384, min_frequency: int = 2) -> "TextTokenizer":
        cls.check_vocab_size(vocab_size)
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        # No prefix space: decode(encode(s)) must give back s itself, not " " + s.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[cls.BOS],
            # Seed all 256 byte symbols so that bytes unseen in the corpus still encode.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((_check_caption(c) for c in _check_captions(captions)), trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} is not a valid tokenizers JSON file: {e}") from e
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer's JSON atomically (a crash never leaves half a file)."""
        return atomic_write(path, self.tokenizer.save)

    def fingerprint(self) -> str:
        """SHA-256 of what decides the encoding, in a form of our own: the vocabulary, the merges, the
        added tokens, and the ids of probe texts (which the normalizer and the pre-tokenizer decide).
        Equal for tokenizers that encode alike, wherever loaded from and whichever tokenizers release
        reads them: its JSON is no such form (0.20 changed how merges are written)."""
        model = self._spec["model"]
        canonical = {
            "vocab": sorted(model.get("vocab", {}).items(), key=lambda item: item[1]),
            "merges": [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])],
            "added": sorted((t["id"], t["content"], bool(t.get("special")))
                            for t in self._spec.get("added_tokens", [])),
            "probes": [e.ids for e in self.tokenizer.encode_batch(list(_PROBES), add_special_tokens=False)],
        }
        return hashlib.sha256(json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    def fingerprints(self) -> tuple[str, str]:
        """fingerprint(), and what records made before it hold: SHA-256 of this tokenizers release's
        JSON of the tokenizer (equal only under the release that wrote them). A record matches
        this tokenizer if it holds either."""
        return self.fingerprint(), hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def bpe_vocab_size(self) -> int:
        return self._bpe_vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    def pad_id(self, position: int, text_len: int) -> int:
        _check_text_len(text_len)
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < text_len:
            raise ValueError(f"position must be an int in [0, {text_len}), got {position!r}")
        return self._bpe_vocab_size + position

    def null_text(self, text_len: int) -> torch.LongTensor:
        """The empty caption: BOS then pads, [text_len] (the unconditional input of guided sampling)."""
        _check_text_len(text_len)
        out = torch.arange(text_len, dtype=torch.long) + self._bpe_vocab_size
        out[0] = self._bos_id
        return out

    def text_vocab_size(self, text_len: int) -> int:
        _check_text_len(text_len)
        return self._bpe_vocab_size + text_len

    def encode(self, caption: str, text_len: int, dropout: float = 0.0) -> torch.LongTensor:
        return self._encode([_check_caption(caption)], text_len, dropout, stacklevel=3)[0]

    def encode_batch(self, captions: Sequence[str], text_len: int, dropout: float = 0.0) -> torch.LongTensor:
        return self._encode(_check_captions(captions), text_len, dropout, stacklevel=3)

    def _encode(self, captions: Sequence[str], text_len: int, dropout: float, stacklevel: int) -> torch.LongTensor:
        _check_text_len(text_len)
        if not 0.0 <= dropout < 1.0:  # also rejects NaN
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        captions = [_check_caption(c) for c in captions]
        # Pads everywhere first; BOS and tokens overwrite the used prefix of each row.
        out = (torch.arange(text_len, dtype=torch.long) + self._bpe_vocab_size).repeat(len(captions), 1)
        if not captions:
            return out
        out[:, 0] = self._bos_id
        keep = text_len - 1
        encodings = self._with_dropout(float(dropout)).encode_batch(captions, add_special_tokens=False)
        for row, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > keep:
                self.truncated += 1
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"caption truncated: {len(ids)} BPE tokens, keeping the first {keep} "
                        f"(text_len={text_len}); later truncations are only counted in .truncated",
                        stacklevel=stacklevel,  # point at the caller's line
                    )
                ids = ids[:keep]
            out[row, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.encoded += len(captions)
        return out

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        # Anything >= bpe_vocab_size is a position pad; text_len is not needed to recognise it.
        kept = [i for i in ids if i != self._bos_id and i < self._bpe_vocab_size]
        return self.tokenizer.decode(kept, skip_special_tokens=False)
