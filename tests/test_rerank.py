"""The reranker model: embeddings, the contrastive loss, scoring and ranking, input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from dalle_fast.rerank import Reranker, RerankerConfig


def small_config(**kw) -> RerankerConfig:
    base = dict(image_size=16, text_len=8, text_vocab=40, embed_dim=16, width=32, text_layers=1, heads=2,
                image_width=8)
    return RerankerConfig(**(base | kw))


def inputs(cfg: RerankerConfig, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), generator=g)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return text, images


@pytest.fixture
def model() -> Reranker:
    torch.manual_seed(0)
    return Reranker(small_config()).eval()


@pytest.mark.parametrize("bad, match", [
    (dict(image_size=24), "power of two"), (dict(image_size=4), "power of two"), (dict(width=30, heads=4), "divisible"),
    (dict(text_layers=0), "positive"), (dict(embed_dim=True), "positive"), (dict(text_vocab=8), "exceed text_len"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        small_config(**bad)


@pytest.mark.parametrize("size", [8, 16, 64])
def test_embeddings_are_unit_vectors_and_num_params_counts_the_model(size):
    cfg = small_config(image_size=size)
    model = Reranker(cfg)
    text, images = inputs(cfg, batch=3)
    t, i = model.encode_text(text), model.encode_image(images)
    assert t.shape == i.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(3))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_images_of_another_size_are_resized_to_the_configs(model):
    # A dVAE at 48 px with a reranker trained at 64 px: the candidates are resized, not refused.
    _, images = inputs(model.config, batch=2)
    S = model.config.image_size
    for size in (S // 2, S + S // 2):
        other = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        back = F.interpolate(other, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(model.encode_image(other), model.encode_image(back))


def test_image_embedding_keeps_where_things_are(model):
    # Flattened, not pooled: a mirrored image (left <-> right) must embed differently.
    _, images = inputs(model.config, batch=2)
    a, b = model.encode_image(images), model.encode_image(images.flip(-1))
    assert ((a * b).sum(-1) < 0.999).all()


def test_loss_at_init_is_near_log_batch_and_every_parameter_learns():
    torch.manual_seed(0)
    model = Reranker(small_config(embed_dim=128))
    text, images = inputs(model.config, batch=16)
    result = model.loss(text, images)
    assert result["logits"].shape == (16, 16)
    # Random embeddings still have cosines of about 1/sqrt(E), which the logit scale 1/0.07 turns
    # into logits of spread ~1: the loss sits a little above the uniform log(B).
    assert math.log(16) - 0.1 < result["loss"].item() < math.log(16) + 0.6
    assert 0.0 <= result["accuracy"].item() <= 1.0
    result["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_loss_adds_negatives_and_masks_texts_equal_to_the_own_caption(model):
    text, images = inputs(model.config, batch=4)
    text[2] = text[0]  # a caption that occurs twice: neither copy is the other image's negative
    negatives = torch.stack([text[1].flip(0), text[3]])  # the second is image 3's own caption
    logits = model.loss(text, images, negatives)["logits"]
    assert logits.shape == (4, 6)
    masked = torch.isinf(logits)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = expected[3, 5] = True
    assert torch.equal(masked, expected)
    with pytest.raises(ValueError, match="as many texts as images"):
        model.loss(text[:3], images)


def test_score_is_the_scaled_cosine_and_rank_follows_it(model):
    text, images = inputs(model.config, batch=6)
    scores = model.score(text[:1], images)
    expected = model.scale() * model.encode_image(images) @ model.encode_text(text[:1])[0]
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores, model.score(text[:1].expand(6, -1), images))
    # A candidate's score does not depend on the others in the batch (no batch statistics).
    torch.testing.assert_close(scores[2:3], model.score(text[:1], images[2:3]))
    order = model.rank(text[:1], images, keep=4)
    assert order.tolist() == scores.argsort(descending=True)[:4].tolist()
    assert (scores[order].diff() <= 0).all()
    assert torch.equal(model.rank(text[:1], images, keep=6).sort().values, torch.arange(6))


def test_logit_scale_starts_at_one_over_007_and_is_capped_at_100(model):
    assert model.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_bad_inputs_are_clear_errors(model):
    cfg = model.config
    text, images = inputs(cfg, batch=2)
    with pytest.raises(TypeError, match="int64"):
        model.encode_text(text.int())
    with pytest.raises(ValueError, match=r"shape \[B, 8\]"):
        model.encode_text(text[:, :5])
    with pytest.raises(ValueError, match=r"lie in \[0, 40\)"):
        model.encode_text(text + cfg.text_vocab)
    with pytest.raises(TypeError, match="float"):
        model.encode_image((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"shape \[B, 3, 16, 16\]"):
        model.encode_image(images[:, :, :8])
    with pytest.raises(ValueError, match=r"shape \[B, 3, 16, 16\]"):
        model.encode_image(images[:, :2])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        model.encode_image(images * 2 - 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        model.encode_image(images.masked_fill(images > 0.5, float("nan")))
    with pytest.raises(ValueError, match="1 or 2 rows"):
        model.score(torch.cat([text, text]), images)
    for keep in (0, 3, 1.0):
        with pytest.raises(ValueError, match="keep"):
            model.rank(text[:1], images, keep=keep)
