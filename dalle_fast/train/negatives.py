"""Hard negative captions for the reranker's contrastive training.

In-batch negatives rarely differ from a caption in one attribute, so a contrastive model can
score captions as bags of words: right words, any binding. Two kinds of extra negative texts
make it bind (after NegCLIP, Yuksekgonul et al. 2023):

- `swap_relation`: "A <relation> B" -> "B <relation> A", the same objects with the relation
  reversed;
- `WordPairs.negative`: the caption with two of its words swapped or one word replaced, kept
  only if every pair of adjacent words in it (with start and end marks) occurs in the training
  captions. The rule keeps negatives fluent without a parser, and it never writes a word pair
  the training captions lack, so a combination held out of the training data (a colour with a
  shape, on the shapes set) never appears even as a negative text.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import numpy as np

_RELATION = re.compile(r"^(an? \S.*?) (to the left of|to the right of|above|below) (an? \S.*)$", re.IGNORECASE)
_TRAILING = re.compile(r"[\s.!?,;:]*$")  # a caption's closing punctuation (and spaces)
_START, _END = "<s>", "</s>"


def _without_tail(text: str) -> tuple[str, str]:
    """("a cat above a dog", ".") for "a cat above a dog. ": the text, and its closing punctuation."""
    tail = _TRAILING.search(text).group()
    return text[: len(text) - len(tail)], tail.strip()


def swap_relation(caption: str) -> Optional[str]:
    """The caption with its two objects swapped, "A <relation> B" -> "B <relation> A" (what the
    image shows, the relation reversed), its closing punctuation kept at the end; None for a
    caption of another form than one relation between two "a ..." phrases."""
    body, tail = _without_tail(caption.strip())
    match = _RELATION.match(body)
    if match is None:
        return None
    a, relation, b = match.groups()
    if a.lower() == b.lower() or _RELATION.match(b):  # no change, or a chain of relations
        return None
    return f"{b} {relation} {a}{tail}"


_MIRROR = {"to the right of": "to the left of", "below": "above"}


def scene(caption: str) -> str:
    """What a caption says, for telling two wordings of one scene apart from other scenes:
    lowercased, without closing punctuation, and "B to the right of A" / "B below A" written as
    "A to the left of B" / "A above B" (the shapes set words every two-object scene both ways)."""
    text, _ = _without_tail(" ".join(caption.lower().split()))
    match = _RELATION.match(text)
    if match is not None:
        a, relation, b = match.groups()
        if relation in _MIRROR and _RELATION.match(b) is None:  # one relation, not a chain
            return f"{b} {_MIRROR[relation]} {a}"
    return text


def _words(caption: str) -> list[str]:
    return caption.lower().split()


class WordPairs:
    """The adjacent word pairs of a caption corpus, and the one-edit negatives they allow."""

    def __init__(self, captions: Iterable[str]):
        self.pairs: set[tuple[str, str]] = set()
        self.after: dict[str, set[str]] = {}  # word -> the words seen right after it
        for caption in captions:
            for line in caption.split("\n"):
                words = [_START] + _words(line) + [_END]
                for left, right in zip(words, words[1:]):
                    self.pairs.add((left, right))
                    self.after.setdefault(left, set()).add(right)

    def fluent(self, words: list[str]) -> bool:
        marked = [_START] + words + [_END]
        return all(pair in self.pairs for pair in zip(marked, marked[1:]))

    def edits(self, caption: str) -> list[str]:
        """Every caption one swap of two different words or one replaced word away, fluent by
        the corpus's word pairs, other than the caption itself (sorted, so draws repeat)."""
        words = _words(caption)
        found: set[str] = set()
        for i in range(len(words)):
            for j in range(i + 1, len(words)):
                if words[i] != words[j]:
                    swapped = list(words)
                    swapped[i], swapped[j] = words[j], words[i]
                    if self.fluent(swapped):
                        found.add(" ".join(swapped))
            left = words[i - 1] if i else _START
            right = words[i + 1] if i + 1 < len(words) else _END
            for word in self.after.get(left, ()):
                if word != words[i] and word != _END and right in self.after.get(word, ()):
                    replaced = words[:i] + [word] + words[i + 1:]
                    if self.fluent(replaced):
                        found.add(" ".join(replaced))
        found.discard(" ".join(words))
        return sorted(found)

    def negative(self, caption: str, rng: np.random.Generator) -> Optional[str]:
        """One of `edits(caption)` drawn with `rng`, or None when there is none."""
        options = self.edits(caption)
        return options[int(rng.integers(len(options)))] if options else None
