"""The reranker's loop end to end on tiny data: CLI, exact resume, hard negatives, learning."""

import numpy as np
import pytest
import torch

from dalle_fast.cli import main
from dalle_fast.data import make_dataset
from dalle_fast.rerank import Reranker, RerankerConfig
from dalle_fast.tokenizer import TextTokenizer
from dalle_fast.checkpoint import load_model
from dalle_fast.train.progress import read_metrics
from dalle_fast.train.negatives import WordPairs, scene, swap_relation
from dalle_fast.train.reranker import TrainRerankerConfig, collect_word_pairs, encode, train_reranker

from .resume import assert_same_run, earlier_run, run_files, three_pairs


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    shapes = make_dataset("shapes", 16)
    captions = [shapes.scene(i).caption for i in range(500)]
    return TextTokenizer.train(captions, vocab_size=300).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def tiny(out, tokenizer, **kw) -> TrainRerankerConfig:
    base = dict(data="shapes", out=str(out), tokenizer=str(tokenizer), text_len=24, image_size=16, embed_dim=16,
                width=32, text_layers=1, heads=2, image_width=8, steps=6, batch_size=8, warmup=2, log_every=1,
                save_every=100, seed=3, device="cpu", word_negatives=True)
    return TrainRerankerConfig(**(base | kw))


@pytest.mark.parametrize("caption, swapped", [
    ("a red circle to the left of a blue square", "a blue square to the left of a red circle"),
    ("a green triangle to the right of a red circle", "a red circle to the right of a green triangle"),
    ("a cyan square above a yellow triangle", "a yellow triangle above a cyan square"),
    ("a magenta circle below a magenta square", "a magenta square below a magenta circle"),
    ("A big dog to the left of an old cat ", "an old cat to the left of A big dog"),
    # closing punctuation stays at the end: it had moved into the middle ("a dog. above A cat"),
    # a cue that tells every swap from a real caption
    ("A cat above a dog.", "a dog above A cat."), ("a man to the right of a woman!", "a woman to the right of a man!"),
])
def test_swap_relation_reverses_the_two_objects(caption, swapped):
    assert swap_relation(caption) == swapped
    assert swap_relation(swapped).lower() == caption.strip().lower()


@pytest.mark.parametrize("caption", [
    "a red circle", "", "two dogs playing in the snow", "above a red circle", "a red circle above",
    "a red circle above a red circle", "a red circle above a blue square to the left of a green triangle",
    "the red circle is above the blue square", "a dog to the left of a dog.",
])
def test_swap_relation_is_none_for_captions_it_does_not_understand(caption):
    assert swap_relation(caption) is None


def test_encode_adds_a_negative_for_each_relation_caption(tokenizer_path):
    tok = TextTokenizer.load(tokenizer_path)
    captions = ["a red square", "a red circle above a blue square", "a green circle below a red triangle"]
    text, negatives, owners, swaps, true_of = encode(tok, captions, 24, hard_negatives=True)
    assert torch.equal(text, tok.encode_batch(captions, 24)) and owners == [1, 2] and swaps == 2
    assert [tok.decode(n) for n in negatives] == ["a blue square above a red circle",
                                                  "a red triangle below a green circle"]
    assert true_of.shape == (3, 5) and not true_of.any()
    assert encode(tok, captions, 24, hard_negatives=False)[1:4] == (None, [], 0)
    assert encode(tok, captions[:1], 24, hard_negatives=True)[1:4] == (None, [], 0)
    # word negatives come after the relation swaps, one per caption that has any
    pairs = WordPairs(captions + ["a green square", "a blue circle"])
    _, negatives, owners, swaps, _ = encode(tok, captions, 24, True, pairs, np.random.default_rng(0))
    assert swaps == 2 and owners[:2] == [1, 2] and owners[2:] == [0, 1, 2]
    for owner, ids in zip(owners[2:], negatives[2:]):
        assert tok.decode(ids) in pairs.edits(captions[owner])


def test_other_wordings_of_an_images_scene_are_no_negatives_for_it(tokenizer_path):
    assert scene("A green triangle  below a cyan circle") == scene("a cyan circle above a green triangle")
    assert scene("a red circle to the right of a blue square") == "a blue square to the left of a red circle"
    assert scene("a red circle above a blue square") != scene("a blue square above a red circle")
    assert scene("a red circle below a blue square.") == scene("a blue square above a red circle")
    tok = TextTokenizer.load(tokenizer_path)
    captions = ["a green triangle above a cyan circle", "a green triangle below a cyan circle",
                "a cyan circle above a green triangle", "a red square"]
    _, _, owners, swaps, true_of = encode(tok, captions, 24, hard_negatives=True)
    # texts: the 4 captions, then the swaps of captions 0, 1, 2
    assert owners == [0, 1, 2] and swaps == 3
    assert true_of[1].tolist() == [False, False, True, False, True, False, False]  # caption 2, swap of 0
    assert true_of[2].tolist() == [False, True, False, False, True, False, False]  # caption 1, swap of 0
    assert true_of[0].tolist() == [False, False, False, False, False, True, True]  # the swaps of 1 and 2
    assert not true_of[3].any()


def test_loss_masks_the_texts_true_of_an_image():
    from dalle_fast.rerank import Reranker, RerankerConfig

    torch.manual_seed(0)
    model = Reranker(RerankerConfig(image_size=16, text_len=8, text_vocab=40, embed_dim=8, width=8, text_layers=1,
                                    heads=2, image_width=4))
    text, images = torch.randint(0, 40, (3, 8)), torch.rand(3, 3, 16, 16)
    true_of = torch.zeros(3, 3, dtype=torch.bool)
    true_of[0, 1] = True
    logits = model.loss(text, images, true_of=true_of)["logits"]
    assert logits[0, 1] == float("-inf") and torch.isfinite(logits[1]).all() and torch.isfinite(logits[0, 0])
    with pytest.raises(ValueError, match="true_of"):
        model.loss(text, images, true_of=true_of[:, :2])


def test_word_negatives_are_one_edit_away_and_use_only_seen_word_pairs():
    corpus = ["a red circle", "a red square", "a blue square", "a blue circle above a red square",
              "a red circle below a blue circle", "a green square"]
    pairs = WordPairs(corpus)
    edits = pairs.edits("a red circle above a blue square")
    assert "a red circle below a blue square" in edits       # a word replaced
    assert "a blue circle above a red square" in edits       # two words swapped
    assert "a red circle above a blue square" not in edits   # never the caption itself
    for edit in edits:
        words = ["<s>"] + edit.split() + ["</s>"]
        assert all(pair in pairs.pairs for pair in zip(words, words[1:]))
        differ = sum(a != b for a, b in zip(edit.split(), "a red circle above a blue square".split()))
        assert len(edit.split()) == 7 and differ in (1, 2)
    assert "a green circle" not in pairs.edits("a red circle")  # "green circle" never seen
    assert "a green square" in pairs.edits("a red square") and "a green circle" not in pairs.edits("a blue circle")
    assert pairs.edits("unknown words here") == []
    rng = np.random.default_rng(5)
    assert pairs.negative("a red circle", rng) in pairs.edits("a red circle")
    assert pairs.negative("zzz", rng) is None


def test_collect_word_pairs_reads_the_first_captions(tokenizer_path):
    data = make_dataset("shapes", 16)
    pairs = collect_word_pairs(data, 50)
    expected = WordPairs(data[i][1] for i in range(50))
    assert pairs.pairs == expected.pairs


def cli_flags(cfg: TrainRerankerConfig) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" if not isinstance(v, bool) else f"--{'' if v else 'no-'}{k.replace('_', '-')}"
            for k, v in vars(cfg).items()]


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, tokenizer_path):
    assert main(["train-reranker", *cli_flags(tiny(tmp_path / "straight", tokenizer_path))]) == 0  # the same call
    train_reranker(tiny(tmp_path / "split", tokenizer_path, run_steps=3))
    assert read_metrics(tmp_path / "split" / "metrics.jsonl")[-1]["step"] == 3
    train_reranker(tiny(tmp_path / "split", tokenizer_path, resume=True))
    _, info = assert_same_run(tmp_path / "straight", tmp_path / "split",
                              ("loss", "accuracy", "swap_accuracy", "word_negative_accuracy", "lr", "logit_scale"),
                              steps=6)
    assert info["meta"]["kind"] == "reranker"
    assert (tmp_path / "straight" / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    model = load_model(tmp_path / "straight" / "checkpoint.safetensors", Reranker, RerankerConfig)
    tok = TextTokenizer.load(tmp_path / "straight" / "tokenizer.json")
    assert model.config.text_vocab == tok.text_vocab_size(24) and not model.training


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="prior's"):
        train_reranker(tiny(tmp_path / "run", tmp_path / "nothing.json"))
    assert not (tmp_path / "run").exists()
    assert main(["train-reranker", "--tokenizer", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "run")]) == 2


@pytest.mark.parametrize("options, message", [
    # the flag's name, not the config field's
    (dict(steps=0), "--steps must be positive"), (dict(batch_size=1), "--batch-size must be >= 2"),
    (dict(text_lr_scale=1.5), r"--text-lr-scale must be in \(0, 1\]"),
    # BOS alone: every caption would be the same text
    (dict(text_len=1), "--text-len must be >= 2"),
    # a warm-up as long as the run never reaches the peak's cosine decay
    (dict(warmup=6), "--warmup 6 must be less than --steps 6"), (dict(warmup=7), "--warmup 7 must be less"),
])
def test_bad_options_fail_before_training(tmp_path, tokenizer_path, options, message):
    cfg = tiny(tmp_path / "run", tokenizer_path, **options)
    with pytest.raises(ValueError, match=message):
        train_reranker(cfg)
    assert main(["train-reranker", *cli_flags(cfg)]) == 2
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_leaves_an_earlier_run_alone(tmp_path, tokenizer_path):
    # batches() raised at the first batch, after TrainingRun had set OUT up as a fresh run: an
    # earlier run's metrics were deleted and its checkpoint moved aside, for a run that never started.
    earlier = earlier_run(tmp_path / "run")
    with pytest.raises(ValueError, match="batch size 8 is larger than the 3 items"):
        train_reranker(tiny(tmp_path / "run", tokenizer_path, data=str(three_pairs(tmp_path / "three", 16))))
    assert run_files(tmp_path / "run") == earlier


def test_text_encoder_steps_at_its_fraction_of_the_learning_rate(tmp_path, tokenizer_path):
    from dalle_fast.train.reranker import _optimizer

    model = Reranker(RerankerConfig(image_size=16, text_len=24, text_vocab=324, embed_dim=16, width=32,
                                    text_layers=1, heads=2, image_width=8))
    optimizer = _optimizer(model, tiny(tmp_path, tokenizer_path, text_lr_scale=0.25, lr=0.1))
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    scales = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert scales[id(model.token_embed.weight)] == scales[id(model.text_proj.weight)] == 0.25
    assert scales[id(model.image_proj.weight)] == scales[id(model.logit_scale)] == 1.0
    before = model.text_proj.weight.detach().clone(), model.image_proj.weight.detach().clone()
    model.loss(*[torch.randint(0, 300, (4, 24)), torch.rand(4, 3, 16, 16)])["loss"].backward()
    optimizer.step()
    # Adam's first step moves every weight by about lr * scale (plus decoupled weight decay).
    text_step = (model.text_proj.weight - before[0]).abs().max().item()
    image_step = (model.image_proj.weight - before[1]).abs().max().item()
    assert text_step == pytest.approx(0.025, rel=0.05) and image_step == pytest.approx(0.1, rel=0.05)
    assert all(group["lr"] == 0.1 for group in optimizer.param_groups)


def test_resume_applies_the_weight_decay_and_text_lr_scale_given_now(tmp_path, tokenizer_path):
    from torch.optim.swa_utils import AveragedModel

    from dalle_fast.train.distributed import DistInfo
    from dalle_fast.train.loop import TrainingRun
    from dalle_fast.train.reranker import _optimizer, model_config

    train_reranker(tiny(tmp_path / "run", tokenizer_path, steps=2, warmup=1, weight_decay=0.01, text_lr_scale=0.2))
    cfg = tiny(tmp_path / "run", tokenizer_path, steps=4, warmup=1, weight_decay=0.3, text_lr_scale=0.5, resume=True)
    model = Reranker(model_config(cfg, TextTokenizer.load(tokenizer_path)))
    optimizer = _optimizer(model, cfg)
    run = TrainingRun(cfg.out, DistInfo(), modules={"model": model, "ema": AveragedModel(model, use_buffers=True)},
                      optimizer=optimizer, generators={}, meta={}, record={}, resume=True, steps=4, run_steps=0,
                      desc="test")
    run.progress.close()
    assert run.step == 2 and len(optimizer.state) == len(list(model.parameters()))  # Adam's moments came back
    text, image = optimizer.param_groups[:2], optimizer.param_groups[2:]
    assert [g["lr_scale"] for g in text] == [0.5, 0.5] and [g["lr_scale"] for g in image] == [1.0, 1.0]
    assert [g["weight_decay"] for g in text] == [g["weight_decay"] for g in image] == [0.3, 0.0]


def test_optimizer_steps_never_take_the_logit_scale_past_ln_100(tmp_path, tokenizer_path):
    import math

    from dalle_fast.train.reranker import _optimizer

    model = Reranker(RerankerConfig(image_size=16, text_len=24, text_vocab=324, embed_dim=16, width=32,
                                    text_layers=1, heads=2, image_width=8))
    optimizer = _optimizer(model, tiny(tmp_path, tokenizer_path, lr=0.1))
    cap = torch.tensor(math.log(100.0)).item()  # ln 100 in float32
    with torch.no_grad():
        model.logit_scale.fill_(cap - 0.15)
    for _ in range(4):
        model.logit_scale.grad = torch.tensor(-1.0)  # pushes it up by about lr a step
        optimizer.step()
        assert model.logit_scale.item() <= cap
    assert model.logit_scale.item() == cap


def test_captions_without_relations_train_without_extra_negatives(tmp_path, tokenizer_path):
    train_reranker(tiny(tmp_path / "run", tokenizer_path, steps=2, warmup=1, hard_negatives=False,
                        word_negatives=False))
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 2 and metrics[-1]["loss"] > 0
    assert "swap_accuracy" not in metrics[-1] and "word_negative_accuracy" not in metrics[-1]


def test_a_short_training_tells_a_relation_from_its_swap(tmp_path, tokenizer_path):
    # 120 steps of 32 pairs at 32 px (~10 s on 2 cores). Over seeds 0-5 the held images' true
    # caption beat its relation swap 85-96% of the time and another image's caption 98-100%.
    ckpt = train_reranker(tiny(tmp_path / "run", tokenizer_path, image_size=32, embed_dim=128, width=128,
                               text_layers=4, heads=4, image_width=32, steps=120, batch_size=32, warmup=20,
                               log_every=1000, seed=0))
    model = load_model(ckpt, Reranker, RerankerConfig)
    tok = TextTokenizer.load(tokenizer_path)
    held = make_dataset("shapes", 32, seed=99)  # other scenes than the training seed's
    images, captions = zip(*(held[i] for i in range(240)))
    images = torch.stack(images)
    rel = [i for i, c in enumerate(captions) if swap_relation(c)]
    true = model.score(tok.encode_batch([captions[i] for i in rel], 24), images[rel])
    swapped = model.score(tok.encode_batch([swap_relation(captions[i]) for i in rel], 24), images[rel])
    assert len(rel) > 120 and (true > swapped).float().mean() > 0.7  # chance: 0.5 +- 0.04
    other = [i for i in range(240) if captions[i] != captions[i - 1]]
    own = model.score(tok.encode_batch([captions[i] for i in other], 24), images[other])
    theirs = model.score(tok.encode_batch([captions[i - 1] for i in other], 24), images[other])
    assert (own > theirs).float().mean() > 0.9
