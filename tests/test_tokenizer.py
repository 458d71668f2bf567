"""TextTokenizer: stream layout, normalization, truncation, persistence, dropout."""

import itertools
import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_fast.tokenizer import TextTokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
LONG = "a purple hexagon to the right of a yellow triangle above a green star"


def _corpus():
    for c1, s1, side, c2, s2 in itertools.product(COLOURS, SHAPES, ["left", "right"], COLOURS[:3], SHAPES[:3]):
        yield f"a {c1} {s1} to the {side} of a {c2} {s2}"
    for c, s in itertools.product(COLOURS, SHAPES):
        yield f"A {c.upper()} {s.capitalize()} On The Table"


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(_corpus(), vocab_size=16384)


@pytest.fixture
def fresh(tok):
    """A separate instance (own counters and warn-once flag) over the same trained model."""
    return TextTokenizer(tok.tokenizer)


def test_small_corpus_stops_early_and_bos_is_special(tok):
    assert 256 + 1 < tok.bpe_vocab_size < 16384
    assert tok.bos_id == 0
    assert tok.tokenizer.get_vocab_size() == tok.bpe_vocab_size
    # Lowercasing happens before training, so no merged token spells an upper-case letter (the
    # vocabulary's own strings are byte-level symbols such as 'Ġ', hence decoding them first).
    merged = [i for t, i in tok.tokenizer.get_vocab().items() if len(t) > 1 and t != TextTokenizer.BOS]
    assert len(merged) > 50
    assert not any(re.search("[A-Z]", tok.decode([i])) for i in merged)


def test_layout(tok):
    T = 24
    caption = "a red circle to the left of a blue square"
    bpe = tok.tokenizer.encode(caption, add_special_tokens=False).ids
    assert 0 < len(bpe) < T - 1
    ids = tok.encode(caption, T)
    assert ids.shape == (T,) and ids.dtype == torch.int64
    assert ids[0].item() == tok.bos_id
    assert ids[1 : 1 + len(bpe)].tolist() == bpe
    assert all(0 < i < tok.bpe_vocab_size for i in bpe)
    pads = ids[1 + len(bpe) :].tolist()
    assert pads == [tok.bpe_vocab_size + p for p in range(1 + len(bpe), T)]
    assert pads == [tok.pad_id(p, T) for p in range(1 + len(bpe), T)]
    assert ids.max().item() < tok.text_vocab_size(T) == tok.bpe_vocab_size + T


def test_round_trip_and_lowercasing(tok):
    caption = "A RED Circle to the Left of a blue SQUARE"
    assert tok.decode(tok.encode(caption, 32)) == caption.lower()
    assert torch.equal(tok.encode("A RED Circle", 16), tok.encode("a red circle", 16))
    assert tok.decode(tok.encode("a red circle", 16).tolist()) == "a red circle"


def test_nfkc_is_applied(tok):
    assert tok.decode(tok.encode("ＲＥＤ ﬁsh", 16)) == "red fish"


def test_empty_caption(tok):
    ids = tok.encode("", 5)
    assert ids.tolist() == [tok.bos_id] + [tok.bpe_vocab_size + p for p in range(1, 5)]
    assert tok.decode(ids) == ""


def test_null_text_is_the_empty_caption(tok):
    for n in (1, 5, 32):
        assert torch.equal(tok.null_text(n), tok.encode("", n))
    with pytest.raises(ValueError):
        tok.null_text(0)


@pytest.mark.filterwarnings("ignore:caption truncated")
def test_text_len_one_is_bos_only(fresh):
    assert fresh.encode("a red circle", 1).tolist() == [fresh.bos_id]
    assert fresh.truncated == 1


def test_truncation_keeps_prefix_counts_and_warns_once(fresh):
    full = fresh.tokenizer.encode(LONG, add_special_tokens=False).ids
    T = 6
    assert len(full) > T - 1
    with pytest.warns(UserWarning, match=rf"{len(full)} BPE tokens, keeping the first {T - 1}") as record:
        ids = fresh.encode(LONG, T)
    assert record[0].filename == __file__  # blames the caller, not the tokenizer module
    assert ids.tolist() == [fresh.bos_id] + full[: T - 1]
    assert (fresh.truncated, fresh.encoded) == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.encode(LONG, T)
        fresh.encode("a red star", T)
    assert (fresh.truncated, fresh.encoded) == (2, 3)
    # Exactly T-1 tokens fit without truncation.
    fresh.encode(LONG, len(full) + 1)
    assert fresh.truncated == 2


def test_non_ascii_and_emoji(tok):
    for caption in ["un cercle rouge à gauche d'un carré", "красный круг", "赤い丸 🔴🟦", "a 👩‍🚀 on a 🐉"]:
        ids = tok.encode(caption, 64)
        assert (ids[1:] < tok.bpe_vocab_size).any()
        assert tok.decode(ids) == caption.lower()


def test_a_lone_surrogate_is_a_clear_error(tok):
    bad = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")  # how Latin-1 bytes arrive via os APIs
    with pytest.raises(ValueError, match="not valid Unicode text"):
        tok.encode(bad, 16)
    with pytest.raises(ValueError, match="not valid Unicode text"):
        tok.encode_batch(["fine", bad], 16)


def test_literal_bos_text_is_not_the_bos_token(tok):
    ids = tok.encode("x <|bos|> y", 32)
    assert (ids == tok.bos_id).sum().item() == 1
    assert tok.decode(ids) == "x <|bos|> y"


@pytest.mark.filterwarnings("ignore:caption truncated")
def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tok.json")
    assert path == tmp_path / "sub" / "tok.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tok.json"]  # no temp file left
    spec = json.loads(path.read_text())
    assert spec["model"]["type"] == "BPE"
    assert [t["content"] for t in spec["added_tokens"]] == [TextTokenizer.BOS]
    assert "Lowercase" in json.dumps(spec["normalizer"])
    loaded = TextTokenizer.load(path)
    assert loaded.bpe_vocab_size == tok.bpe_vocab_size
    captions = ["a red circle to the left of a blue square", "Émoji 🐉 TEXT", LONG, ""]
    assert torch.equal(loaded.encode_batch(captions, 12), tok.encode_batch(captions, 12))


def test_the_fingerprint_is_what_encodes_not_how_a_release_writes_it(tok, tmp_path):
    spec = json.loads(tok.tokenizer.to_str())
    # the same tokenizer as a tokenizers release before 0.20 wrote it (merges as "a b" strings): read
    # from such a file, and as such a release would serialise it (the JSON the fingerprint reads)
    old = dict(spec, model=dict(spec["model"], merges=[" ".join(m) for m in spec["model"]["merges"]]))
    (tmp_path / "old.json").write_text(json.dumps(old))
    again = TextTokenizer.load(tmp_path / "old.json")
    again._spec = json.loads(json.dumps(old))
    assert again.fingerprint() == tok.fingerprint() and len(tok.fingerprint()) == 64
    assert tok.fingerprints()[1] == __import__("hashlib").sha256(tok.tokenizer.to_str().encode()).hexdigest()
    # what changes the ids changes it: a normalizer without lowercasing, two swapped ids
    cased = dict(spec, normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}]})
    (tmp_path / "cased.json").write_text(json.dumps(cased))
    vocab = dict(spec["model"]["vocab"])
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(dict(spec, model=dict(spec["model"], vocab=vocab))))
    prints = {TextTokenizer.load(tmp_path / f"{name}.json").fingerprint() for name in ("cased", "swapped")}
    assert len(prints | {tok.fingerprint()}) == 3


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        TextTokenizer.load(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not json {")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        TextTokenizer.load(garbage)


def test_wrapping_a_tokenizer_without_bos_fails():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="no '<|bos|>' token"):
        TextTokenizer(Tokenizer(models.BPE()))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda t: t.encode(b"bytes", 8), TypeError, "bytes"),
        (lambda t: t.encode(None, 8), TypeError, "NoneType"),
        (lambda t: t.encode_batch(["ok", 3], 8), TypeError, "int"),
        (lambda t: t.encode_batch("one caption", 8), TypeError, "single str"),  # not 11 one-letter captions
        (lambda t: t.encode_batch(b"one caption", 8), TypeError, "single bytes"),
        (lambda t: t.encode("a", 0), ValueError, "text_len"),
        (lambda t: t.encode("a", 8.0), ValueError, "text_len"),
        (lambda t: t.encode("a", True), ValueError, "text_len"),
        (lambda t: t.encode("a", 8, dropout=1.0), ValueError, "dropout"),
        (lambda t: t.encode("a", 8, dropout=-0.1), ValueError, "dropout"),
        (lambda t: t.encode("a", 8, dropout=float("nan")), ValueError, "dropout"),
        (lambda t: t.pad_id(8, 8), ValueError, "position"),
        (lambda t: t.pad_id(-1, 8), ValueError, "position"),
        (lambda t: t.text_vocab_size(0), ValueError, "text_len"),
        (lambda t: t.decode([-1]), ValueError, ">= 0"),
    ],
)
def test_bad_inputs(tok, call, error, match):
    with pytest.raises(error, match=match):
        call(tok)


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(["a b c"], vocab_size=256)
    with pytest.raises(ValueError, match="min_frequency"):
        TextTokenizer.train(["a b c"], vocab_size=300, min_frequency=0)
    with pytest.raises(TypeError, match="int"):
        TextTokenizer.train(["a b c", 3], vocab_size=300)
    with pytest.raises(TypeError, match="single str"):
        TextTokenizer.train("a b c", vocab_size=300)


def test_dropout(tok):
    T = 64
    plain = tok.encode(LONG, T)
    assert all(torch.equal(tok.encode(LONG, T), plain) for _ in range(20))
    samples = [tok.encode(LONG, T, dropout=0.1) for _ in range(50)]
    distinct = {tuple(s.tolist()) for s in samples}
    assert len(distinct) >= 2
    assert all(tok.decode(s) == LONG for s in samples)
    # Skipped merges only ever split tokens, so a dropout encoding is never shorter.
    n_plain = (plain < tok.bpe_vocab_size).sum()
    assert all((s < tok.bpe_vocab_size).sum() >= n_plain for s in samples)
    # Using dropout must not leak into later deterministic encodes.
    assert torch.equal(tok.encode(LONG, T), plain)


@pytest.mark.filterwarnings("ignore:caption truncated")
def test_encode_batch_matches_encode(fresh):
    captions = ["a red circle", "", LONG, "Ünï 🐉", "A BLUE STAR to the left of a green square"]
    T = 10
    batch = fresh.encode_batch(captions, T)
    assert batch.shape == (len(captions), T) and batch.dtype == torch.int64
    assert torch.equal(batch, torch.stack([fresh.encode(c, T) for c in captions]))
    too_long = sum(len(fresh.tokenizer.encode(c).ids) > T - 1 for c in captions)
    assert 0 < too_long < len(captions)
    assert (fresh.encoded, fresh.truncated) == (2 * len(captions), 2 * too_long)
    assert fresh.encode_batch([], T).shape == (0, T)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_property(tok, text):
    T = 48
    before = tok.truncated
    ids = tok.encode(text, T)
    if tok.truncated == before:
        # Compared with the tokenizer's own normalizer, not Python's str.lower: Rust lowercases
        # a word-final 'Σ' to 'σ' where Python gives 'ς'.
        assert tok.decode(ids) == tok.tokenizer.normalizer.normalize_str(text)
        n = int((ids < tok.bpe_vocab_size).sum())
        assert ids[n:].tolist() == [tok.bpe_vocab_size + p for p in range(n, T)]


def test_train_tokenizer_command(tmp_path, capsys):
    from dalle_fast.cli import main
    from dalle_fast.data.shapes import ShapesDataset

    out = tmp_path / "sub" / "tokenizer.json"
    assert main(["train-tokenizer", "--data", "shapes", "--num-captions", "300", "--vocab", "400",
                 "--out", str(out)]) == 0
    tok = TextTokenizer.load(out)
    assert 257 < tok.bpe_vocab_size <= 400
    caption = ShapesDataset("train", size=16)[0][1]
    assert tok.decode(tok.encode(caption, 32)) == caption
    assert len(tok.encode(caption, 64)) == 64 and "300 captions" in capsys.readouterr().out
    assert main(["train-tokenizer", "--num-captions", "0", "--out", str(out)]) != 0
    assert "--num-captions must be >= 1" in capsys.readouterr().err
    # a second run sets the first one's file aside (it replaced it without a word)
    first = out.read_bytes()
    assert main(["train-tokenizer", "--data", "shapes", "--num-captions", "50", "--vocab", "300",
                 "--out", str(out)]) == 0
    assert (out.parent / "tokenizer.previous.json").read_bytes() == first and out.read_bytes() != first
    assert "is now" in capsys.readouterr().out


@pytest.mark.parametrize("vocab", ["256", "65537", "4294967297", "100000000000000000000"])
def test_a_vocabulary_past_the_token_ids_is_refused_before_the_captions_are_read(tmp_path, capsys, vocab):
    # 4294967297 made the BPE trainer abort the process (a 283 GB allocation); 10**20 was a traceback
    from dalle_fast.cli import main

    assert main(["train-tokenizer", "--data", str(tmp_path / "nowhere"), "--vocab", vocab,
                 "--out", str(tmp_path / "t.json")]) == 2
    assert "--vocab: vocab_size must be an int in [257, 65536]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"in \[257, 65536\]"):
        TextTokenizer.train(["a b"], vocab_size=int(vocab))
    with pytest.raises(ValueError, match=r"in \[257, 65520\] .* with 16 pads"):
        TextTokenizer.check_vocab_size(65521, text_len=16)
    TextTokenizer.check_vocab_size(65520, text_len=16)


def test_train_tokenizer_reads_every_shard_under_a_launcher(tmp_path, capsys, monkeypatch):
    # RANK / WORLD_SIZE in the environment (torchrun's, a cluster's) must not split the stream.
    from dalle_fast.cli import main
    from tests.data.test_shards import write_shards

    (tmp_path / "shards").mkdir()
    expected = write_shards(tmp_path / "shards", shards=4, per_shard=5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train-tokenizer", "--data", str(tmp_path / "shards" / "*.tar"), "--num-captions", "100",
                 "--vocab", "300", "--out", str(tmp_path / "tok.json")]) == 0
    assert f"from {len(expected)} captions" in capsys.readouterr().out
