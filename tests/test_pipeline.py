"""Model folders, prompt handling and `dalle-fast generate` end to end on an untrained tiny model, and the
bundled model."""

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel

from dalle_fast.cli import main
from dalle_fast.data import ShapesDataset
from dalle_fast.dvae import DVAE, DVAEConfig
from dalle_fast.pipeline import BUNDLED, export_model_folder, generate, load_models
from dalle_fast.prior import Prior, PriorConfig
from dalle_fast.rerank import Reranker, RerankerConfig
from dalle_fast.tokenizer import TextTokenizer
from dalle_fast.checkpoint import load_model, read_checkpoint, read_info, save_checkpoint, weights_digest


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """Training checkpoints of a tiny dVAE and prior (untrained), exported as generate reads them."""
    root = tmp_path_factory.mktemp("models")
    captions = [ShapesDataset("train", size=64, length=300)[i][1] for i in range(300)]
    tokenizer = TextTokenizer.train(captions, vocab_size=300)
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig.preset("tiny"))
    prior = Prior(PriorConfig.preset("tiny", text_vocab=tokenizer.bpe_vocab_size, layers=2, d_model=32))
    for name, model in (("dvae", dvae), ("prior", prior)):
        save_checkpoint(root / f"{name}.ckpt", modules={"model": model, "ema": AveragedModel(model, use_buffers=True)},
                        meta={"model_config": dataclasses.asdict(model.config), "kind": name})
    return export_model_folder(root / "folder", dvae=root / "dvae.ckpt", prior=root / "prior.ckpt",
                               tokenizer=root / "tokenizer.json", dtype=torch.float16)


def test_generate_returns_kept_candidates_and_repeats_with_a_seed(model_folder):
    models = load_models(model_folder)
    assert models.reranker is None
    first = generate(models, "a red circle above a blue square", num=4, keep=2, seed=3)
    again = generate(models, "a red circle above a blue square", num=4, keep=2, seed=3)
    assert first.images.shape == (2, 3, 64, 64) and first.tokens.shape == (2, 64)
    assert 0.0 <= float(first.images.min()) and float(first.images.max()) <= 1.0
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, generate(models, "a red circle", num=4, keep=2, seed=4).tokens)


def test_prompts_empty_long_and_non_ascii(model_folder):
    models = load_models(model_folder)
    for empty in ("", "   \n"):
        with pytest.raises(ValueError, match="prompt is empty"):
            generate(models, empty, num=1, keep=1)
    for invisible in ("\u200b", "\x01", "\ufeff \x00"):
        with pytest.raises(ValueError, match="has no visible character"):
            generate(models, invisible, num=1, keep=1)
    # captions are single lines, words one space apart: a prompt's line breaks and runs of spaces are read so too
    from dalle_fast.pipeline import encode_prompt

    plain = encode_prompt(models.tokenizer, "a red circle above a blue square", 16)
    for spaced in ("a\nred\ncircle\nabove\na\nblue\nsquare", "  a  red circle\tabove a blue\r\nsquare \n"):
        assert torch.equal(encode_prompt(models.tokenizer, spaced, 16), plain), spaced
    for _ in range(2):  # every over-long prompt, not the first one per tokenizer
        with pytest.warns(UserWarning, match="only its beginning is used"):
            generate(models, "a red circle " * 20, num=1, keep=1)
    # one warning with a prior and a reranker to encode for, pointing at generate's caller
    with pytest.warns(UserWarning, match="only its beginning is used") as record:
        generate(load_models(None), "a red circle " * 20, num=1, keep=1)
    cut = [w for w in record if "only its beginning" in str(w.message)]
    assert len(cut) == 1 and cut[0].filename == __file__, [(w.filename, str(w.message)) for w in cut]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(models, "rötlich ✓", num=1, keep=1)  # byte-level BPE: any text encodes (11 bytes: not cut)
    with pytest.raises(ValueError, match="keep"):
        generate(models, "a red circle", num=2, keep=3)
    # torch's CPU generator keeps 32 bits of a seed: larger ones would repeat smaller ones' images
    with pytest.raises(ValueError, match="seed must be an int in"):
        generate(models, "a red circle", num=1, keep=1, seed=7 + 2**32)
    with pytest.raises(ValueError, match="batch must be"):
        generate(models, "a red circle", num=2, keep=1, batch=0)
    with pytest.raises(ValueError, match="needs prime_image"):  # was silently sampled unprimed
        generate(models, "a red circle", num=1, keep=1, prime_rows=2)


def test_generate_in_batches_keeps_the_best_of_all_candidates(model_folder):
    models = load_models(model_folder)
    whole = generate(models, "a red circle", num=5, keep=5, seed=2)
    assert torch.equal(generate(models, "a red circle", num=5, keep=5, seed=2, batch=5).tokens, whole.tokens)
    chunked = generate(models, "a red circle", num=5, keep=3, seed=2, batch=2)
    assert chunked.tokens.shape == (3, 64) and chunked.num_sampled == 5
    assert sorted(chunked.order.tolist()) == chunked.order.tolist() == [0, 1, 2]  # no reranker: sampling order
    assert torch.equal(chunked.tokens, generate(models, "a red circle", num=5, keep=3, seed=2, batch=2).tokens)
    # as --batch's help says: the first batch draws what the one batch drew first, the later ones others
    assert torch.equal(chunked.tokens[:2], whole.tokens[:2]) and not torch.equal(chunked.tokens[2], whole.tokens[2])


def test_exporting_the_same_checkpoints_twice_writes_the_same_bytes(tmp_path, model_folder):
    # A model folder holds weights and configs only, not the RNG state of the exporting process.
    root = model_folder.parent
    torch.manual_seed(123)  # another global RNG state than the first export's
    again = export_model_folder(tmp_path / "again", dvae=root / "dvae.ckpt", prior=root / "prior.ckpt",
                                tokenizer=root / "tokenizer.json", dtype=torch.float16)
    for name in ("dvae.safetensors", "prior.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (model_folder / name).read_bytes(), name


def test_export_checks_every_input_before_writing_and_drops_a_stale_reranker(tmp_path, model_folder):
    root = model_folder.parent
    sources = dict(dvae=root / "dvae.ckpt", prior=root / "prior.ckpt", tokenizer=root / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        export_model_folder(tmp_path / "a", **{**sources, "tokenizer": root / "missing.json"})
    with pytest.raises(FileNotFoundError):
        export_model_folder(tmp_path / "a", **{**sources, "reranker": root / "missing.ckpt"})
    assert not (tmp_path / "a").exists()  # nothing written, not even the folder
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "reranker.safetensors").write_bytes((model_folder / "prior.safetensors").read_bytes())
    export_model_folder(folder, **sources)
    assert not (folder / "reranker.safetensors").exists()  # an earlier export's: not this one's models
    # re-exporting a folder with its own tokenizer (source and target are the same file)
    export_model_folder(folder, **{**sources, "tokenizer": folder / "tokenizer.json"})
    assert (folder / "tokenizer.json").read_bytes() == (root / "tokenizer.json").read_bytes()
    assert load_models(folder).prior.config == load_models(model_folder).prior.config


def test_damaged_model_files_end_in_a_message_naming_them(tmp_path, model_folder, capsys):
    folder = tmp_path / "damaged"
    folder.mkdir()
    for name in ("dvae.safetensors", "prior.safetensors", "tokenizer.json"):
        (folder / name).write_bytes((model_folder / name).read_bytes())
    (folder / "prior.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
    with pytest.raises(ValueError, match="prior.safetensors is not a readable safetensors file"):
        load_models(folder)
    assert main(["generate", "a red circle", "--model", str(folder), "--num", "1", "--out", str(tmp_path / "o")]) == 2
    assert "prior.safetensors" in capsys.readouterr().err


def test_model_folder_errors(tmp_path, model_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_models(tmp_path / "nothing")
    swapped = tmp_path / "swapped"
    shutil.copytree(model_folder, swapped)
    shutil.copyfile(model_folder / "dvae.safetensors", swapped / "prior.safetensors")
    with pytest.raises(ValueError, match="prior.safetensors holds a dvae model, not a prior"):
        load_models(swapped)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "tokenizer.json").write_bytes((model_folder / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="lacks dvae.safetensors, prior.safetensors"):
        load_models(tmp_path / "partial")


def test_a_reranker_of_another_tokenizer_is_refused(tmp_path, model_folder):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("dvae.safetensors", "prior.safetensors", "tokenizer.json"):
        (folder / name).write_bytes((model_folder / name).read_bytes())
    tokenizer = TextTokenizer.load(folder / "tokenizer.json")
    for text_vocab, ok in ((tokenizer.text_vocab_size(16), True), (tokenizer.text_vocab_size(16) + 500, False)):
        config = RerankerConfig(image_size=64, text_len=16, text_vocab=text_vocab, embed_dim=16, width=16,
                                text_layers=1, heads=2, image_width=8)
        save_checkpoint(folder / "reranker.safetensors", modules={"model": Reranker(config)},
                        meta={"model_config": dataclasses.asdict(config), "kind": "reranker"}, rng=False)
        if ok:
            assert load_models(folder).reranker is not None
        else:
            with pytest.raises(ValueError, match="reranker's text vocabulary"):
                load_models(folder)


def test_cli_refuses_bad_input_before_sampling(tmp_path, model_folder, capsys):
    """Bad files, devices and options end in one line on stderr and exit code 2, not a traceback, and
    before minutes of sampling."""
    model = ["--model", str(model_folder)]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    cases = [
        (["--prime", str(tmp_path / "missing.png"), "--rows", "2"], "priming image " + str(tmp_path / "missing.png")),
        (["--prime", str(not_an_image), "--rows", "2"], f"priming image {not_an_image} is not an image"),
        (["--out", str(not_an_image)], "is a file, not a folder"),
        (["--out", ""], "--out is empty"),  # an unset shell variable: not the current folder
        (["--device", "tpu"], "--device must be"),
        (["--seed", str(2**32)], "seed must be"),
        (["--temperature", "1e-9"], "temperature must be"),
        (["--keep", "2"], "keep (2) cannot exceed num (1)"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for extra, message in cases:
        capsys.readouterr()
        assert main(["generate", "a red circle", *model, "--num", "1", "--keep", "1",
                     "--out", str(tmp_path / "out"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "dalle-fast generate: error:" in err and message in err and "Traceback" not in err, (extra, err)
    assert not_an_image.read_text() == "not an image"
    capsys.readouterr()
    assert main(["generate", "  ", *model, "--out", str(tmp_path / "never")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # a bad request leaves no folder behind
    # nor does a priming row count the model's grid does not have, or an unreadable priming image
    for extra in (["--rows", "9", "--prime", str(tmp_path / "missing.png")], ["--rows", "2", "--prime", str(not_an_image)],
                  ["--rows", "0", "--prime", str(not_an_image)], ["--batch", "0"], ["--temperature", "1e31"]):
        assert main(["generate", "a red circle", *model, "--out", str(tmp_path / "never"), *extra]) == 2, extra
        assert "Traceback" not in capsys.readouterr().err
        assert not (tmp_path / "never").exists(), extra
    assert not (tmp_path / "out" / "grid.png").exists()
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", *model, "--grid-scale", "0"])


def test_cli_generate_writes_ranked_images_and_primes(tmp_path, model_folder, capsys):
    out = tmp_path / "samples"
    code = main(["generate", "a green square", "--model", str(model_folder), "--num", "3", "--keep", "2",
                 "--out", str(out), "--seed", "1", "--cond-scale", "2"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "rank0.png", "rank1.png"]
    assert Image.open(out / "rank0.png").size == (64, 64)
    assert "per image" in capsys.readouterr().out
    # a second run into the folder replaces the first one's ranks (--keep defaults to min(4, --num))
    (out / "rank7.png").write_bytes(b"an earlier run's")
    (out / "notes.txt").write_text("the user's")
    assert main(["generate", "a green square", "--model", str(model_folder), "--num", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "notes.txt", "rank0.png"]
    # priming with a rendered image keeps its top token rows
    prime = tmp_path / "prime.png"
    image, _ = ShapesDataset("test", size=64, length=5)[0]
    Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(prime)
    models = load_models(model_folder)
    result = generate(models, "a green square", num=2, keep=2, prime_image=prime, prime_rows=3)
    expected = models.dvae.encode(image.unsqueeze(0))[0, :3].reshape(-1)
    assert torch.equal(result.tokens[:, :24], expected.expand(2, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an opaque image primes without a word
        generate(models, "a green square", num=1, keep=1, prime_image=prime, prime_rows=3)
    see_through = tmp_path / "alpha.png"
    Image.open(prime).convert("RGBA").save(see_through)  # an alpha channel, all opaque: no warning either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(models, "a green square", num=1, keep=1, prime_image=see_through, prime_rows=3)
    rgba = Image.open(prime).convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(see_through)
    with pytest.warns(UserWarning, match="transparent pixels: they are primed as white"):
        generate(models, "a green square", num=1, keep=1, prime_image=see_through, prime_rows=3)
    assert main(["generate", "x", "--model", str(model_folder), "--prime", str(prime)]) == 2  # --rows missing
    assert main(["generate", "x", "--model", str(model_folder), "--cond-scale", "0.5"]) == 2
    assert main(["generate", "x", "--model", str(model_folder), "--prime", str(prime), "--rows", "9"]) == 2
    # every row primed: nothing sampled, every candidate the same image
    assert main(["generate", "x", "--model", str(model_folder), "--prime", str(prime), "--rows", "8"]) == 2
    assert "rows must be an int in 1..7" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(model_folder), "--num", "3", "--batch", "2", "--out", str(out)]) == 0
    assert "3 candidates sampled" in capsys.readouterr().out


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 294912000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_cli_generate_out_of_memory_is_one_line(tmp_path, model_folder, capsys, monkeypatch, error):
    import dalle_fast.pipeline as pipeline

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "sample_image_tokens", no_memory)
    assert main(["generate", "x", "--model", str(model_folder), "--num", "64", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "64 candidates at once" in err and "--batch" in err and "Traceback" not in err
    assert main(["eval-shapes", "--model", str(model_folder), "--captions", "1", "--candidates", "64",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "64 candidates at once" in err and "--candidates" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()  # no empty folder left behind


def test_cli_other_runtime_errors_are_not_called_out_of_memory(tmp_path, model_folder, monkeypatch):
    import dalle_fast.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(pipeline, "sample_image_tokens", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        main(["generate", "x", "--model", str(model_folder), "--num", "1", "--out", str(tmp_path / "a" / "b")])
    assert not (tmp_path / "a").exists()  # the folders it made for the images are gone again
    (tmp_path / "kept").mkdir()
    monkeypatch.setattr(pipeline, "sample_image_tokens", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["generate", "x", "--model", str(model_folder), "--num", "1", "--out", str(tmp_path / "kept")]) == 130
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays
    assert main(["generate", "x", "--model", str(model_folder), "--num", "1", "--out", str(tmp_path / "c")]) == 130
    assert not (tmp_path / "c").exists()  # Ctrl-C while sampling: no empty folder either


@pytest.mark.parametrize("command, out, said", [
    (["train-tokenizer", "--data", "nowhere"], ".", "is a folder, not a file"),
    (["train-tokenizer", "--data", "nowhere"], "afile/t.json", "afile is a file, not a folder"),
    (["export-model", "--dvae", "a", "--prior", "b"], "afile", "is a file, not a folder"),
    (["export-model", "--dvae", "a", "--prior", "b"], "afile/model", "afile is a file, not a folder"),
])
def test_cli_refuses_an_out_it_cannot_write_before_any_work(tmp_path, monkeypatch, capsys, command, out, said):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("the user's")
    assert main([*command, "--out", out]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "the user's"


def test_the_bundled_model_loads_fits_and_generates(tmp_path, capsys):
    """The package ships a model (scripts/recipe_shapes.sh): `generate` without --model uses it."""
    files = sorted(p.name for p in BUNDLED.iterdir())
    assert files == ["dvae.safetensors", "prior.safetensors", "reranker.safetensors", "tokenizer.json"]
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 30 * 2**20
    models = load_models(None)
    assert models.reranker is not None and models.dvae.config.grid == models.prior.config.grid
    out = tmp_path / "samples"
    assert main(["generate", "a red circle above a blue square", "--num", "2", "--keep", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "rank0.png"]
    assert str(BUNDLED) in capsys.readouterr().out
    # its files record the dVAE and the tokenizer they go with: a copy with either swapped is refused
    swapped = tmp_path / "swapped"
    shutil.copytree(BUNDLED, swapped)
    _other_tokenizer(BUNDLED / "tokenizer.json", swapped / "tokenizer.json")
    with pytest.raises(ValueError, match="prior.safetensors was trained with another tokenizer"):
        load_models(swapped)
    shutil.copyfile(BUNDLED / "tokenizer.json", swapped / "tokenizer.json")
    dvae = DVAE(models.dvae.config)  # untrained, same shape
    save_checkpoint(swapped / "dvae.safetensors", modules={"model": dvae}, rng=False,
                    meta={"model_config": dataclasses.asdict(dvae.config), "kind": "dvae"})
    with pytest.raises(ValueError, match="prior.safetensors was trained on the codes of another dVAE"):
        load_models(swapped)


def _other_tokenizer(source, target):
    """A tokenizer of the same size as `source` that encodes otherwise (two tokens swap ids)."""
    data = json.loads(source.read_text())
    vocab = data["model"]["vocab"]
    a, b = [token for token, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    target.write_text(json.dumps(data))
    assert TextTokenizer.load(target).fingerprint() != TextTokenizer.load(source).fingerprint()
    return target


def _prior_run(root, folder, dvae_digest):
    """A train-prior run folder: its checkpoint, tokenizer.json and config.json (the token cache's dVAE)."""
    folder.mkdir()
    shutil.copyfile(root / "prior.ckpt", folder / "checkpoint.safetensors")
    shutil.copyfile(root / "tokenizer.json", folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"train": {}, "model": {}, "cache": {"dvae_weights": dvae_digest}}))
    return folder


def test_export_refuses_a_dvae_or_tokenizer_other_than_the_runs_and_writes_nothing(tmp_path, model_folder, capsys):
    """Sizes alone let a dVAE retrained with the same config, or another tokenizer of the same size, through:
    the prior would then read other image codes or other words. The runs record which ones they used."""
    root = model_folder.parent
    trained_on = weights_digest(load_model(root / "dvae.ckpt", DVAE, DVAEConfig))
    run = _prior_run(root, tmp_path / "prior-run", trained_on)
    torch.manual_seed(1)
    other_dvae = DVAE(DVAEConfig.preset("tiny"))
    save_checkpoint(tmp_path / "other-dvae.ckpt", modules={"ema": AveragedModel(other_dvae, use_buffers=True)},
                    meta={"model_config": dataclasses.asdict(other_dvae.config), "kind": "dvae"})
    other_tok = _other_tokenizer(root / "tokenizer.json", tmp_path / "other-tokenizer.json")
    out = tmp_path / "out"
    cases = [(["--dvae", str(tmp_path / "other-dvae.ckpt"), "--prior", str(run)],
              ["another dVAE", "other-dvae.ckpt", "prior-run/config.json"]),
             (["--dvae", str(root / "dvae.ckpt"), "--prior", str(run / "checkpoint.safetensors"),
               "--tokenizer", str(other_tok)], ["another tokenizer", "other-tokenizer.json", "prior-run/tokenizer.json"])]
    for args, names in cases:
        capsys.readouterr()
        assert main(["export-model", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and all(name in err for name in names), err
        assert not out.exists()
    # a reranker run's tokenizer.json is checked the same way
    rerank_run = tmp_path / "reranker-run"
    rerank_run.mkdir()
    tokenizer = TextTokenizer.load(root / "tokenizer.json")
    config = RerankerConfig(image_size=64, text_len=16, text_vocab=tokenizer.text_vocab_size(16), embed_dim=16,
                            width=16, text_layers=1, heads=2, image_width=8)
    save_checkpoint(rerank_run / "checkpoint.safetensors", modules={"model": Reranker(config)},
                    meta={"model_config": dataclasses.asdict(config), "kind": "reranker"}, rng=False)
    _other_tokenizer(root / "tokenizer.json", rerank_run / "tokenizer.json")
    with pytest.raises(ValueError, match="reranker-run.*another tokenizer"):
        export_model_folder(out, dvae=root / "dvae.ckpt", prior=run, tokenizer=run / "tokenizer.json", reranker=rerank_run)
    assert not out.exists()
    shutil.copyfile(root / "tokenizer.json", rerank_run / "tokenizer.json")
    assert load_models(export_model_folder(out, dvae=root / "dvae.ckpt", prior=run, tokenizer=run / "tokenizer.json",
                                           reranker=rerank_run)).reranker is not None


def test_export_takes_a_prior_trained_on_an_exported_dvae_file(tmp_path, model_folder):
    # train-prior --dvae FOLDER/dvae.safetensors records the digest of those (float16) weights as
    # loaded; the file itself records its weights' as trained, before the cast: either is that dVAE.
    root = model_folder.parent
    exported = model_folder / "dvae.safetensors"
    run = _prior_run(root, tmp_path / "prior-run", weights_digest(load_model(exported, DVAE, DVAEConfig)))
    out = export_model_folder(tmp_path / "out", dvae=exported, prior=run, tokenizer=run / "tokenizer.json")
    assert read_info(out / "prior.safetensors")["meta"]["dvae_weights"] == read_info(exported)["meta"]["dvae_weights"]
    assert load_models(out).dvae.config == load_models(model_folder).dvae.config


def test_a_model_folder_of_parts_from_different_exports_is_refused(tmp_path, model_folder):
    root = model_folder.parent
    meta = read_info(model_folder / "prior.safetensors")["meta"]
    assert meta["dvae_weights"] == weights_digest(load_model(root / "dvae.ckpt", DVAE, DVAEConfig))  # before the cast
    assert meta["tokenizer_sha256"] == TextTokenizer.load(root / "tokenizer.json").fingerprint()
    # another dVAE of the same config, exported with the same prior
    torch.manual_seed(1)
    other = DVAE(DVAEConfig.preset("tiny"))
    save_checkpoint(tmp_path / "other-dvae.ckpt", modules={"model": other}, rng=False,
                    meta={"model_config": dataclasses.asdict(other.config), "kind": "dvae"})
    elsewhere = export_model_folder(tmp_path / "elsewhere", dvae=tmp_path / "other-dvae.ckpt",
                                    prior=root / "prior.ckpt", tokenizer=root / "tokenizer.json")
    mixed = tmp_path / "mixed"
    shutil.copytree(model_folder, mixed)
    shutil.copyfile(elsewhere / "dvae.safetensors", mixed / "dvae.safetensors")
    with pytest.raises(ValueError, match="prior.safetensors was trained on the codes of another dVAE"):
        load_models(mixed)
    shutil.copyfile(model_folder / "dvae.safetensors", mixed / "dvae.safetensors")
    _other_tokenizer(root / "tokenizer.json", mixed / "tokenizer.json")
    with pytest.raises(ValueError, match="prior.safetensors was trained with another tokenizer"):
        load_models(mixed)
    # a folder exported before fingerprints were release-independent records this release's JSON hash: still loads
    legacy = tmp_path / "legacy"
    shutil.copytree(model_folder, legacy)
    for name in ("prior", "reranker"):
        if (legacy / f"{name}.safetensors").exists():
            tensors, info = read_checkpoint(legacy / f"{name}.safetensors")
            info["meta"]["tokenizer_sha256"] = TextTokenizer.load(root / "tokenizer.json").fingerprints()[1]
            save_file(tensors, str(legacy / f"{name}.safetensors"), metadata={"dalle_fast": json.dumps(info)})
    assert load_models(legacy).prior.config == load_models(model_folder).prior.config
    # re-exporting a model folder (its dVAE is recorded by digest, not re-hashed after the float16 cast)
    again = export_model_folder(tmp_path / "again", dvae=model_folder / "dvae.safetensors",
                                prior=model_folder / "prior.safetensors", tokenizer=model_folder / "tokenizer.json")
    assert read_info(again / "prior.safetensors")["meta"]["dvae_weights"] == meta["dvae_weights"]
    # folders exported before the records (the bundled model's too) still load
    old = tmp_path / "old"
    shutil.copytree(model_folder, old)
    for name in ("dvae", "prior"):
        tensors, info = read_checkpoint(old / f"{name}.safetensors")
        info["meta"] = {k: v for k, v in info["meta"].items() if k in ("model_config", "kind")}
        save_file(tensors, str(old / f"{name}.safetensors"), metadata={"dalle_fast": json.dumps(info)})
    _other_tokenizer(root / "tokenizer.json", old / "tokenizer.json")  # unchecked: nothing records one
    assert load_models(old).prior.config == load_models(model_folder).prior.config


def test_a_failed_export_leaves_the_previous_folder_as_it_was(tmp_path, model_folder, capsys, monkeypatch):
    """A full disk at the prior's file used to leave the new dVAE beside the old prior, with a SafetensorError
    traceback: the files are written whole first, and the error is one line."""
    import dalle_fast.checkpoint as checkpoint

    root = model_folder.parent
    folder = tmp_path / "folder"
    shutil.copytree(model_folder, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    torch.manual_seed(1)
    other = DVAE(DVAEConfig.preset("tiny"))
    save_checkpoint(tmp_path / "other-dvae.ckpt", modules={"model": other}, rng=False,
                    meta={"model_config": dataclasses.asdict(other.config), "kind": "dvae"})
    write = checkpoint.save_file

    def full_at_the_prior(tensors, filename, metadata=None):
        if "prior" in Path(filename).name:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_the_prior)
    capsys.readouterr()
    assert main(["export-model", "--dvae", str(tmp_path / "other-dvae.ckpt"), "--prior", str(root / "prior.ckpt"),
                 "--tokenizer", str(root / "tokenizer.json"), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "prior.safetensors" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary left either
    assert main(["export-model", "--dvae", str(root / "dvae.ckpt"), "--prior", str(root / "prior.ckpt"),
                 "--tokenizer", str(root / "tokenizer.json"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_a_model_file_given_as_the_model_folder_is_named_as_such(tmp_path, model_folder, capsys):
    assert main(["generate", "x", "--model", str(model_folder / "prior.safetensors"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "prior.safetensors is a file, not a model folder" in err and "does not exist" not in err


def test_generate_replaces_its_images_all_at_once(tmp_path, model_folder, capsys, monkeypatch):
    import dalle_fast.images as images

    out = tmp_path / "samples"
    model = ["--model", str(model_folder), "--out", str(out)]
    assert main(["generate", "a red circle", *model, "--num", "2", "--keep", "2", "--seed", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["grid.png", "rank0.png", "rank1.png"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images, "save_grid", full_disk)  # the last file written
    capsys.readouterr()
    assert main(["generate", "a blue square", *model, "--num", "1", "--seed", "2"]) == 2
    assert "No space left" in capsys.readouterr().err
    # not the new rank0 beside the old rank1 and grid, and no temporary left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert main(["generate", "a blue square", *model, "--num", "1", "--seed", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "rank0.png"]
    assert (out / "rank0.png").read_bytes() != before["rank0.png"]


def test_a_grid_scale_that_only_fills_the_memory_is_refused_before_any_work(tmp_path, model_folder, capsys):
    out = tmp_path / "samples"
    model = ["--model", str(model_folder), "--out", str(out)]
    for scale in ("9", "100000"):
        with pytest.raises(SystemExit):
            main(["generate", "a red circle", *model, "--grid-scale", scale])
        assert "--grid-scale: must be at most 8" in capsys.readouterr().err
    assert not out.exists()
    assert main(["generate", "a red circle", *model, "--num", "1", "--grid-scale", "8"]) == 0
    assert Image.open(out / "grid.png").size == (8 * 68, 8 * 68)  # a 2-pixel border around the 64-pixel image


def test_loading_the_bundled_model_leaves_torch_compile_unimported():
    # torch._dynamo's import alone took 1.5-3 s of a 13 s `dalle-fast generate` run when the
    # load's shape check (a model on the meta device) ran nn.init.normal_ there.
    code = ("import sys; from dalle_fast.pipeline import load_models; load_models(); "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
