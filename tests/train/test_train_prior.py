"""The prior's loop end to end on tiny data: token cache, exact resume, torchrun with PowerSGD."""

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.optim.swa_utils import AveragedModel

from dalle_fast.dvae import DVAE, DVAEConfig
from dalle_fast.prior import Prior, PriorConfig
from dalle_fast.tokenizer import TextTokenizer
from dalle_fast.checkpoint import load_model, read_checkpoint, save_checkpoint
from dalle_fast.train.prior import TrainPriorConfig, drop_captions, drop_words, train_prior
from dalle_fast.train.progress import read_metrics
from dalle_fast.train.token_cache import TokenCache, build_token_cache

from .resume import assert_same_run, earlier_run, run_files

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dvae_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny dVAE saved as train-vae saves it (its tokens are arbitrary but fixed)."""
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny"))
    ema = AveragedModel(model, use_buffers=True)
    with torch.no_grad():  # training weights differ from the EMA's: loading must pick the EMA
        for p in model.parameters():
            p.add_(1.0)
    path = tmp_path_factory.mktemp("dvae") / "checkpoint.safetensors"
    save_checkpoint(path, modules={"model": model, "ema": ema},
                    meta={"model_config": dataclasses.asdict(model.config), "kind": "dvae"})
    return path


def tiny(out, dvae, **kw) -> TrainPriorConfig:
    base = dict(dvae=str(dvae), data="shapes", out=str(out), cache=str(Path(out).parent / "cache"), num_images=48,
                preset="tiny", layers=2, d_model=32, heads=2, steps=6, batch_size=4, warmup=2, log_every=1,
                save_every=100, seed=3, device="cpu")
    return TrainPriorConfig(**(base | kw))


def test_load_model_rebuilds_the_ema_weights(dvae_checkpoint):
    model = load_model(dvae_checkpoint, DVAE, DVAEConfig)
    tensors, _ = read_checkpoint(dvae_checkpoint)
    assert not model.training
    assert torch.equal(model.encoder.blocks.input.weight, tensors["ema.module.encoder.blocks.input.weight"])
    assert not torch.equal(model.encoder.blocks.input.weight, tensors["model.encoder.blocks.input.weight"])


def test_token_cache_holds_tokens_and_dropout_variants(tmp_path, dvae_checkpoint):
    dvae = load_model(dvae_checkpoint, DVAE, DVAEConfig)
    kw = dict(dvae=dvae, data="shapes", text_len=16, num_images=40, variants=6, dropout=0.5, batch_size=16)
    cache = build_token_cache(tmp_path / "c", **kw)
    data = TokenCache(cache, seed=1)
    assert len(data) == 40 and data.images.dtype == np.uint16 and data.images.shape == (40, 64)
    captions = json.loads((cache / "captions.json").read_text())
    from dalle_fast.data import ShapesDataset

    shapes = ShapesDataset("train", size=64, seed=0, length=40)
    assert captions[:3] == [shapes[i][1] for i in range(3)]
    images = torch.stack([shapes[i][0] for i in range(4)])
    assert np.array_equal(data.images[:4], dvae.encode(images).flatten(1).numpy())
    tok = TextTokenizer.load(cache / "tokenizer.json")
    for i in range(5):
        assert torch.equal(torch.from_numpy(data.text[i, 0].astype(np.int64)), tok.encode(captions[i], 16))
        assert all(tok.decode(data.text[i, v].tolist()) == captions[i] for v in range(6))
    assert any(not np.array_equal(data.text[i, 0], data.text[i, v]) for i in range(40) for v in range(1, 6))
    # an access is a pure function of (seed, epoch, index); epochs draw other variants
    text, image = data[7]
    assert torch.equal(data[7][0], text) and image.dtype == torch.int64
    picks = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        picks.add(tuple(data[7][0].tolist()))
    assert len(picks) > 1
    # reuse when the inputs match (no rewrite), refuse when they do not
    stamp = (cache / "images.npy").stat().st_mtime_ns
    assert build_token_cache(tmp_path / "c", **kw) == cache
    assert (cache / "images.npy").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other inputs"):
        build_token_cache(tmp_path / "c", **(kw | dict(num_images=30)))
    # another dVAE (retrained at the same path) or another tokenizer is refused, whatever the paths say
    other = DVAE(dvae.config)
    with pytest.raises(ValueError, match="differ in: dvae_weights"):
        build_token_cache(tmp_path / "c", **(kw | dict(dvae=other)))
    with pytest.raises(ValueError, match="differ in: tokenizer"):
        build_token_cache(tmp_path / "c", **(kw | dict(text_vocab=999)))
    with pytest.raises(ValueError, match="differ in: tokenizer"):
        build_token_cache(tmp_path / "c", **(kw | dict(tokenizer=TextTokenizer.train(["a b c"] * 5, vocab_size=260))))
    # given the tokenizer it trained, it is reused, also when its meta holds the fingerprint of before
    trained = TextTokenizer.load(cache / "tokenizer.json")
    assert build_token_cache(tmp_path / "c", **(kw | dict(tokenizer=trained))) == cache
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(meta | {"tokenizer_sha256": trained.fingerprints()[1]}))
    assert build_token_cache(tmp_path / "c", **(kw | dict(tokenizer=trained))) == cache
    (cache / "meta.json").write_text(json.dumps(meta))
    # a cache from before every caption line, the dVAE's weights and the tokenizer were recorded is
    # reused, with a warning for each
    meta = json.loads((cache / "meta.json").read_text())
    old = ("captions", "dvae_weights", "tokenizer", "data_files")
    (cache / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in old}))
    with pytest.warns(UserWarning) as caught:
        assert build_token_cache(tmp_path / "c", **kw) == cache
    said = " ".join(str(w.message) for w in caught)
    assert "one line per image" in said and "dVAE's weights" in said and "recorded the tokenizer" in said
    assert "data's files" not in said  # synthetic shapes have none
    assert 0.0 < data.unigram_entropy() <= np.log(256)


def test_the_token_cache_counts_the_captions_it_cuts(tmp_path, dvae_checkpoint):
    # one warning named the first cut caption and pointed at the tokenizer's .truncated; the count
    # was only in meta.json
    dvae = load_model(dvae_checkpoint, DVAE, DVAEConfig)
    with pytest.warns(UserWarning, match=r"(\d+) of 12 caption lines are longer than the 3 text tokens") as caught:
        cache = build_token_cache(tmp_path / "c", dvae=dvae, data="shapes", text_len=4, num_images=12, variants=1)
    said = [str(w.message) for w in caught]
    assert not any("caption truncated" in m for m in said)
    count = int(re.search(r"(\d+) of 12 caption lines", " ".join(said)).group(1))
    assert 0 < count == json.loads((cache / "meta.json").read_text())["truncated"]


def test_token_cache_keeps_every_caption_line_of_a_folder(tmp_path, dvae_checkpoint):
    from PIL import Image

    folder = tmp_path / "pairs"
    folder.mkdir()
    lines = {"a": ["a red circle", "a round red thing", "red disc"], "b": ["a blue square"]}
    for name, caps in lines.items():
        Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("\n".join(caps) + "\n\n")
    dvae = load_model(dvae_checkpoint, DVAE, DVAEConfig)
    with pytest.warns(UserWarning, match="1 images have more caption lines than the 2 text variants"):
        build_token_cache(tmp_path / "c2", dvae=dvae, data=str(folder), text_len=16, num_images=None,
                          variants=2, dropout=0.5, text_vocab=300)  # "red disc" would never be trained on
    cache = build_token_cache(tmp_path / "c", dvae=dvae, data=str(folder), text_len=16, num_images=None,
                              variants=5, dropout=0.5, text_vocab=300)
    data = TokenCache(cache)
    tok = TextTokenizer.load(cache / "tokenizer.json")
    assert json.loads((cache / "captions.json").read_text()) == ["\n".join(lines["a"]), lines["b"][0]]
    decoded_a = [tok.decode(data.text[0, v].tolist()) for v in range(5)]
    assert decoded_a == lines["a"] + lines["a"][:2]  # every line, then dropout variants of the first ones
    for v in range(3):
        assert torch.equal(torch.from_numpy(data.text[0, v].astype(np.int64)), tok.encode(lines["a"][v], 16))
    assert all(tok.decode(data.text[1, v].tolist()) == lines["b"][0] for v in range(5))
    # the folder changed in place (same path, same settings): the cache is refused, not reused
    kw = dict(dvae=dvae, data=str(folder), text_len=16, num_images=None, variants=5, dropout=0.5, text_vocab=300)
    assert build_token_cache(tmp_path / "c", **kw) == cache
    Image.new("RGB", (64, 64), (10, 10, 200)).save(folder / "c.png")
    (folder / "c.txt").write_text("a blue circle")
    with pytest.raises(ValueError, match="differ in: data_files"):
        build_token_cache(tmp_path / "c", **kw)
    (folder / "c.png").unlink()
    (folder / "c.txt").unlink()
    assert build_token_cache(tmp_path / "c", **kw) == cache
    (folder / "b.txt").write_text("a blue disc")  # a caption fixed
    with pytest.raises(ValueError, match="differ in: data_files"):
        build_token_cache(tmp_path / "c", **kw)
    meta = json.loads((cache / "meta.json").read_text())  # a cache from before the files were recorded
    (cache / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "data_files"}))
    with pytest.warns(UserWarning, match="recorded the data's files"):
        assert build_token_cache(tmp_path / "c", **kw) == cache
    # the data deleted once cached (or on another machine): the cache is still used, with a warning
    (cache / "meta.json").write_text(json.dumps(meta))
    folder.rename(tmp_path / "moved")
    with pytest.warns(UserWarning, match="cannot be read here") as caught:
        assert build_token_cache(tmp_path / "c", **kw) == cache
    assert len(caught) == 1
    with pytest.raises(ValueError, match="no such directory"):  # with no cache to fall back on, an error
        build_token_cache(tmp_path / "fresh", **kw)


def test_a_dvae_with_more_codes_than_uint16_holds_is_refused(tmp_path):
    from dalle_fast.data import ShapesDataset
    from dalle_fast.train.token_cache import encode_images

    dvae = DVAE(DVAEConfig.preset("tiny", vocab=2**16 + 1))
    with pytest.raises(ValueError, match="65537 codes does not fit"):
        encode_images(dvae, ShapesDataset("train", size=32, length=2), limit=None, progress=False)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, dvae_checkpoint):
    # with caption and word dropout on: their generator is checkpointed and resumed too
    drop = dict(null_caption=0.3, word_dropout=0.3)
    train_prior(tiny(tmp_path / "straight", dvae_checkpoint, **drop))
    train_prior(tiny(tmp_path / "split", dvae_checkpoint, run_steps=4, **drop))
    assert read_metrics(tmp_path / "split" / "metrics.jsonl")[-1]["step"] == 4
    train_prior(tiny(tmp_path / "split", dvae_checkpoint, resume=True, **drop))
    straight, _ = assert_same_run(tmp_path / "straight", tmp_path / "split",
                                  ("loss", "text_loss", "image_loss", "lr"), steps=6)
    assert straight[-1]["loss"] < straight[0]["loss"]
    assert (tmp_path / "straight" / "tokenizer.json").is_file()


def test_drop_captions_replaces_whole_rows():
    text = torch.arange(60).view(20, 3)
    null = torch.tensor([-1, -2, -3])
    gen = torch.Generator().manual_seed(0)
    out = drop_captions(text, null, 0.5, gen)
    dropped = (out == null).all(1)
    assert 0 < int(dropped.sum()) < 20
    assert torch.equal(out[~dropped], text[~dropped])
    assert torch.equal(drop_captions(text, null, 0.0, gen), text)


@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_drop_words_deletes_one_token_and_repads(lengths, seed):
    vocab, t = 50, 7  # BOS = 0, words 1..49, pad(p) = 50 + p
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(1, vocab, (n,), generator=gen).tolist()
        rows.append([0] + words + [vocab + p for p in range(1 + n, t)])
    text = torch.tensor(rows)
    out = drop_words(text, vocab, 1.0, gen)
    for before, after, n in zip(text.tolist(), out.tolist(), lengths):
        assert after[0] == 0
        assert after[1 + max(n - 1, 0):] == [vocab + p for p in range(1 + max(n - 1, 0), t)]
        kept = after[1:1 + max(n - 1, 0)]
        if n == 0:
            assert after == before
        else:  # the words in order with exactly one of them missing
            assert any(kept == before[1:1 + n][:i] + before[1:1 + n][i + 1:] for i in range(n))
    assert torch.equal(drop_words(text, vocab, 0.0, gen), text)


def test_init_starts_from_a_checkpoint_and_checks_the_architecture(tmp_path, dvae_checkpoint, monkeypatch):
    first = train_prior(tiny(tmp_path / "first", dvae_checkpoint, steps=3))
    tuned = train_prior(tiny(tmp_path / "tuned", dvae_checkpoint, steps=1, lr=1e-12, warmup=0,
                             init=str(tmp_path / "first"), null_caption=0.5))
    a = load_model(first, Prior, PriorConfig).state_dict()
    b = load_model(tuned, Prior, PriorConfig).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # one step at lr 1e-12 from the same weights
    with pytest.raises(ValueError, match="architecture"):
        train_prior(tiny(tmp_path / "wide", dvae_checkpoint, d_model=64, init=str(tmp_path / "first")))
    # the tuned run took the init's tokenizer; another tokenizer of the same size is refused
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (tmp_path / "first" / "tokenizer.json").read_text()
    other = TextTokenizer.load(tmp_path / "first" / "tokenizer.json")
    spec = json.loads(other.tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = [k for k in vocab if vocab[k] > 100][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, other words
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="another tokenizer"):
        train_prior(tiny(tmp_path / "swapped", dvae_checkpoint, init=str(tmp_path / "first"),
                         tokenizer=str(tmp_path / "swapped.json"), cache=str(tmp_path / "swapped_cache")))
    with pytest.raises(FileNotFoundError, match="--init"):
        train_prior(tiny(tmp_path / "none", dvae_checkpoint, init=str(tmp_path / "missing")))
    # --init is ignored on --resume, as its help says: the resumed checkpoint's weights replace it anyway
    import dalle_fast.train.prior as prior_module

    def no_init(*args):
        raise AssertionError("--init loaded on --resume")

    monkeypatch.setattr(prior_module, "_load_init", no_init)
    train_prior(tiny(tmp_path / "tuned", dvae_checkpoint, steps=2, lr=1e-12, warmup=0,
                     init=str(tmp_path / "first"), null_caption=0.5, resume=True))
    with pytest.raises(ValueError, match="--null-caption"):
        train_prior(tiny(tmp_path / "bad", dvae_checkpoint, null_caption=1.0))


def test_factored_dvae_codes_train_a_factored_prior_that_generates(tmp_path):
    from dalle_fast.pipeline import export_model_folder, generate, load_models

    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig.preset("tiny", colour_codes=4))
    path = save_checkpoint(tmp_path / "dvae.safetensors", modules={"model": dvae, "ema": AveragedModel(dvae)},
                           meta={"model_config": dataclasses.asdict(dvae.config), "kind": "dvae"})
    ckpt = train_prior(tiny(tmp_path / "prior", path, steps=2, warmup=1))
    prior = load_model(ckpt, Prior, PriorConfig)
    assert prior.config.colour_codes == 4 and prior.config.image_vocab == 256
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["colour_codes"] == 4
    folder = export_model_folder(tmp_path / "model", dvae=path, prior=ckpt, tokenizer=tmp_path / "prior" / "tokenizer.json")
    result = generate(load_models(folder), "a red circle", num=2, keep=1, seed=0)
    assert result.images.shape == (1, 3, 64, 64)
    # a plain dVAE with a factored prior is refused: by the export, and in a folder put together by hand
    with pytest.raises(ValueError, match="colour factors"):
        export_model_folder(tmp_path / "plain_src", dvae=_plain_dvae(tmp_path), prior=ckpt,
                            tokenizer=tmp_path / "prior" / "tokenizer.json")
    assert not (tmp_path / "plain_src").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("prior.safetensors", "tokenizer.json"):
        (plain / name).write_bytes((folder / name).read_bytes())
    dvae_plain = DVAE(DVAEConfig.preset("tiny"))
    save_checkpoint(plain / "dvae.safetensors", modules={"model": dvae_plain},
                    meta={"model_config": dataclasses.asdict(dvae_plain.config), "kind": "dvae"}, rng=False)
    with pytest.raises(ValueError, match="colour factors"):
        load_models(plain)


def _plain_dvae(tmp_path) -> Path:
    dvae = DVAE(DVAEConfig.preset("tiny"))
    return save_checkpoint(tmp_path / "plain_dvae.safetensors", modules={"model": dvae},
                           meta={"model_config": dataclasses.asdict(dvae.config), "kind": "dvae"})


@pytest.mark.filterwarnings("ignore:.*caption lines are longer")
def test_a_batch_larger_than_the_cache_leaves_an_earlier_run_alone(tmp_path, dvae_checkpoint):
    # batches() raised at the first batch, after TrainingRun had set OUT up as a fresh run.
    earlier = earlier_run(tmp_path / "run")
    with pytest.raises(ValueError, match="batch size 4 is larger than the 3 items"):
        train_prior(tiny(tmp_path / "run", dvae_checkpoint, num_images=3))
    assert run_files(tmp_path / "run") == earlier


def test_missing_dvae_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-vae"):
        train_prior(tiny(tmp_path / "run", tmp_path / "nothing.safetensors", cache=""))
    assert not (tmp_path / "run").exists()


def test_an_existing_cache_trains_without_its_dvae(tmp_path, dvae_checkpoint):
    # train_prior let a run with a built --cache and no dVAE checkpoint (a cache copied to another
    # machine) through its checks, but prepare_cache then loaded the dVAE anyway: FileNotFoundError.
    cfg = tiny(tmp_path / "run", dvae_checkpoint, steps=3, warmup=1)
    train_prior(cfg)
    meta = json.loads((Path(cfg.cache) / "meta.json").read_text())
    away = tiny(tmp_path / "again", tmp_path / "moved" / "checkpoint.safetensors", steps=3, warmup=1)
    with pytest.warns(UserWarning, match="dVAE that built this cache is not here"):
        checkpoint = train_prior(away)
    assert read_checkpoint(checkpoint)[1]["step"] == 3
    assert json.loads((Path(cfg.cache) / "meta.json").read_text()) == meta
    # its other inputs are still checked; with no cache at all, the dVAE is needed
    with pytest.raises(ValueError, match="differ in: num_images"), pytest.warns(UserWarning, match="not here"):
        train_prior(dataclasses.replace(away, num_images=40, out=str(tmp_path / "third")))
    with pytest.raises(FileNotFoundError, match="no token cache in .* and no dVAE"):
        build_token_cache(tmp_path / "empty", dvae=None, data="shapes", text_len=16, num_images=8)


@pytest.mark.parametrize("options, message", [
    (dict(d_model=30, heads=4), "d_model 30 must be divisible by heads 4"),
    (dict(num_images=-1), "--num-images must be >= 0"),
    (dict(heads=-2), "--heads must be >= 0"),
    (dict(text_variants=0), "--text-variants must be positive"),
    # the flag's name, not the config field's
    (dict(steps=0), "--steps must be positive"), (dict(batch_size=0), "--batch-size must be positive"),
    (dict(bpe_dropout=1.0), r"--bpe-dropout must be in \[0, 1\)"),
    (dict(word_dropout=-0.1), r"--word-dropout must be in \[0, 1\)"),
    # before the images are encoded: it had failed after them, or aborted the process in the BPE trainer
    (dict(text_vocab=100), r"--text-vocab: vocab_size must be an int in \[257, "),
    (dict(text_vocab=65530, text_len=16), r"--text-vocab: .* in \[257, 65520\]"),
    # a warm-up as long as the run never reaches the peak's cosine decay
    (dict(warmup=6), "--warmup 6 must be less than --steps 6"),
])
def test_bad_architecture_options_fail_before_the_cache_is_built(tmp_path, dvae_checkpoint, options, message):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=message):
        train_prior(tiny(tmp_path / "run", dvae_checkpoint, cache=str(cache), **options))
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_resuming_with_another_architecture_is_a_clear_error(tmp_path, dvae_checkpoint):
    out = tmp_path / "run"
    train_prior(tiny(out, dvae_checkpoint, steps=1, warmup=0))
    with pytest.raises(ValueError, match="checkpoint.safetensors: its 'model' weights do not fit"):
        train_prior(tiny(out, dvae_checkpoint, steps=2, warmup=0, d_model=64, resume=True))
    # another dVAE of the same shape, through a cache of its own: the same architecture, other image tokens
    other = tmp_path / "other_dvae.safetensors"
    model = DVAE(DVAEConfig.preset("tiny"))
    save_checkpoint(other, modules={"model": model, "ema": AveragedModel(model, use_buffers=True)},
                    meta={"model_config": dataclasses.asdict(model.config), "kind": "dvae"})
    with pytest.raises(ValueError, match="trained with another dVAE than this run's"):
        train_prior(tiny(out, other, steps=2, warmup=0, cache=str(tmp_path / "other_cache"), resume=True))


def test_torchrun_two_processes_gloo_with_powersgd(tmp_path, dvae_checkpoint):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle_fast.cli", "train-prior", "--dvae", str(dvae_checkpoint), "--preset", "tiny",
           "--layers", "2", "--d-model", "32", "--heads", "2", "--num-images", "32", "--steps", "4",
           "--warmup", "1", "--batch-size", "2", "--log-every", "1", "--powersgd-rank", "1", "--device", "cpu",
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [p.name for p in out.glob("*.safetensors")] == ["checkpoint.safetensors"]
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 4


def test_the_token_cache_reads_every_ranks_shards_and_refuses_a_stream_that_runs_dry(tmp_path, dvae_checkpoint,
                                                                                      monkeypatch):
    from ..data.test_shards import write_shards

    (tmp_path / "shards").mkdir()
    expected = write_shards(tmp_path / "shards", shards=5, per_shard=8)
    monkeypatch.setenv("RANK", "1")  # rank 1 of 4 under torchrun builds it as rank 0 would: the whole stream
    monkeypatch.setenv("WORLD_SIZE", "4")
    dvae = load_model(dvae_checkpoint, DVAE, DVAEConfig)
    kw = dict(dvae=dvae, data=str(tmp_path / "shards" / "*.tar"), text_len=8, text_vocab=300, variants=1)
    cache = build_token_cache(tmp_path / "c", num_images=40, **kw)
    assert sorted(json.loads((cache / "captions.json").read_text())) == sorted(expected)
    assert json.loads((cache / "meta.json").read_text())["count"] == 40
    with pytest.raises(ValueError, match="ran out after 40 of the 41 images"):
        build_token_cache(tmp_path / "short", num_images=41, **kw)
    assert not (tmp_path / "short" / "meta.json").exists()  # nothing a later run could reuse


def test_token_cache_maps_its_files_and_indexes_like_a_sequence(tmp_path, dvae_checkpoint, monkeypatch):
    import dalle_fast.train.token_cache as token_cache

    dvae = load_model(dvae_checkpoint, DVAE, DVAEConfig)
    cache = build_token_cache(tmp_path / "c", dvae=dvae, data="shapes", text_len=32, num_images=12, variants=3,
                              text_vocab=300)
    data = TokenCache(cache, seed=2)
    assert isinstance(data.images, np.memmap) and isinstance(data.text, np.memmap)  # not a copy per rank
    assert np.array_equal(data.images, np.load(cache / "images.npy"))  # the file format is unchanged
    data.set_epoch(4)
    shipped = pickle.dumps(data)  # as to a spawned DataLoader worker: the paths, not the data
    assert len(shipped) < 2000 < data.images.nbytes + data.text.nbytes
    again = pickle.loads(shipped)
    assert isinstance(again.images, np.memmap) and again.epoch == 4
    assert all(torch.equal(a, b) for a, b in zip(again[5], data[5]))
    text, image = data[-1]
    assert all(torch.equal(a, b) for a, b in zip((text, image), data[11]))
    image += 1  # the rows are copies, not views of the read-only mapping
    assert torch.equal(data[11][1], image - 1)
    assert torch.equal(data[np.int64(3)][1], data[3][1])
    for bad in (12, -13):
        with pytest.raises(IndexError, match="out of range for a token cache of 12"):
            data[bad]
    entropy = data.unigram_entropy()
    monkeypatch.setattr(token_cache, "_COUNT_CHUNK", 100)  # several chunks count as one
    assert data.unigram_entropy() == pytest.approx(entropy, abs=1e-12)


def test_encode_images_fills_one_uint16_array(monkeypatch):
    import tracemalloc
    from types import SimpleNamespace

    from dalle_fast.train.token_cache import encode_images

    class Codes(torch.nn.Module):  # a stand-in dVAE: 4096 codes per image, all equal to the image's value
        config = SimpleNamespace(vocab=300)

        def encode(self, images):
            return images[:, 0, :1, :1].long().expand(-1, 64, 64)

    n = 256
    dataset = [(torch.full((3, 8, 8), float(i % 300)), f"caption {i}") for i in range(n)]
    tracemalloc.start()
    try:
        tokens, captions = encode_images(Codes(), dataset, limit=None, batch_size=32, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens.dtype == np.uint16 and tokens.shape == (n, 4096) and len(captions) == n
    assert np.array_equal(tokens, np.repeat(np.arange(n, dtype=np.uint16)[:, None] % 300, 4096, axis=1))
    assert peak < 1.5 * tokens.nbytes  # the tokens once, not int32 batches, their concatenation and a cast


def test_the_other_ranks_wait_for_a_cache_build_longer_than_the_process_groups_timeout(tmp_path, dvae_checkpoint):
    (tmp_path / "sync").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "train" / "slow_cache_worker.py"), str(dvae_checkpoint), str(tmp_path / "run"),
           str(tmp_path / "sync"), "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    waited = {int(m[0]): float(m[1]) for m in re.findall(r"rank (\d): waited ([\d.]+) s for a cache of 8 images",
                                                         result.stdout)}
    assert waited.keys() == {0, 1} and waited[1] > 8 > 2 * 3  # well past the group's 3 s timeout
