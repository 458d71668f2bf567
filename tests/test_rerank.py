"""The reranker model: embeddings, the contrastive loss, scoring and ranking, input checks."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dalle_fast.checkpoint import load_model, save_checkpoint
from dalle_fast.rerank import COLOUR_GRID, IMAGE_ENCODERS, Reranker, RerankerConfig


def small_config(**kw) -> RerankerConfig:
    base = dict(image_size=16, text_len=8, text_vocab=40, embed_dim=16, width=32, text_layers=1, heads=2,
                image_width=8)
    return RerankerConfig(**(base | kw))


def inputs(cfg: RerankerConfig, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab, (batch, cfg.text_len), generator=g)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return text, images


@pytest.fixture(params=IMAGE_ENCODERS)
def model(request) -> Reranker:
    torch.manual_seed(0)
    return Reranker(small_config(image_encoder=request.param)).eval()


@pytest.mark.parametrize("bad, match", [
    (dict(image_size=24), "power of two"), (dict(image_size=4), "power of two"), (dict(width=30, heads=4), "divisible"),
    (dict(text_layers=0), "positive"), (dict(embed_dim=True), "positive"), (dict(text_vocab=8), "exceed text_len"),
    (dict(image_encoder="rgb"), "image_encoder"), (dict(colour_width=0), "positive"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        small_config(**bad)


@pytest.mark.parametrize("encoder", IMAGE_ENCODERS)
@pytest.mark.parametrize("size", [8, 16, 64])
def test_embeddings_are_unit_vectors_and_num_params_counts_the_model(size, encoder):
    cfg = small_config(image_size=size, image_encoder=encoder)
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


@pytest.mark.parametrize("encoder", IMAGE_ENCODERS)
def test_loss_at_init_is_near_log_batch_and_every_parameter_learns(encoder):
    torch.manual_seed(0)
    model = Reranker(small_config(embed_dim=128, image_encoder=encoder))
    text, images = inputs(model.config, batch=16)
    result = model.loss(text, images)
    assert result["logits"].shape == (16, 16)
    # Random embeddings still have cosines of about 1/sqrt(E), which the logit scale 1/0.07 turns
    # into logits of spread ~1: the loss sits a little above the uniform log(B).
    assert math.log(16) - 0.1 < result["loss"].item() < math.log(16) + 0.6
    assert 0.0 <= result["accuracy"].item() <= 1.0
    result["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _disc(size: int, centre: tuple[float, float], radius: float, rgb: tuple[float, float, float]) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inside = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius ** 2).float()
    return torch.tensor(rgb)[:, None, None] * inside


def test_split_encoder_sees_shape_apart_from_colour():
    torch.manual_seed(0)
    model = Reranker(small_config(image_size=32, image_encoder="split")).eval()
    encoder = model.image_encoder
    red, green = _disc(32, (12, 12), 6, (1, 0, 0)), _disc(32, (12, 12), 6, (0, 1, 0))
    square = torch.zeros(3, 32, 32)
    square[0, 6:18, 6:18] = 1.0
    images = torch.stack([red, green, square]) * 2 - 1
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (3, encoder.size)
    shape, colour = features[:, :encoder.shape_size], features[:, encoder.shape_size:]
    # The shape stream reads brightness only: a red and a green disc are the same to it, a
    # square is not.
    torch.testing.assert_close(shape[0], shape[1])
    assert not torch.allclose(shape[0], shape[2])
    # The colour stream has no spatial filter: within a cell, where a pixel lies does not matter,
    # so a disc and a square of the same colour and area per cell read alike; colours do not.
    cell = 32 // COLOUR_GRID
    shuffled = images.clone()
    perm = torch.randperm(cell * cell)
    blocks = shuffled.unfold(2, cell, cell).unfold(3, cell, cell)  # [B, 3, G, G, cell, cell]
    blocks = blocks.reshape(*blocks.shape[:4], -1)[..., perm].reshape(*blocks.shape[:4], cell, cell)
    shuffled = blocks.permute(0, 1, 2, 4, 3, 5).reshape(images.shape)
    with torch.no_grad():
        torch.testing.assert_close(encoder(shuffled)[:, encoder.shape_size:], colour)
    assert not torch.allclose(colour[0], colour[1])


def test_checkpoints_from_before_the_split_encoder_load_as_joint(tmp_path):
    torch.manual_seed(0)
    old = Reranker(small_config())
    meta = dataclasses.asdict(old.config)
    del meta["image_encoder"], meta["colour_width"]  # what a checkpoint written before them records
    path = save_checkpoint(tmp_path / "old.safetensors", modules={"model": old},
                           meta={"model_config": meta, "kind": "reranker"})
    loaded = load_model(path, Reranker, RerankerConfig)
    assert loaded.config.image_encoder == "joint"
    text, images = inputs(old.config, batch=2)
    torch.testing.assert_close(loaded.score(text[:1], images), old.eval().score(text[:1], images))


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


def test_loss_is_the_symmetric_infonce_of_its_logits(model):
    """loss = (CE over each image's row of B + K texts + CE over each caption's column of the B
    images) / 2, masked entries excluded, the logits the scaled cosines of the embeddings."""
    text, images = inputs(model.config, batch=4)
    text[2] = text[0]
    negatives = torch.stack([text[1].flip(0), text[3]])
    result = model.loss(text, images, negatives)
    t = model.encode_text(torch.cat([text, negatives])).double()
    i = model.encode_image(images).double()
    cosines = float(model.scale().detach()) * i @ t.T
    masked = torch.isinf(result["logits"])
    torch.testing.assert_close(result["logits"][~masked].double(), cosines[~masked], rtol=1e-4, atol=1e-4)
    logits = cosines.masked_fill(masked, float("-inf"))
    rows = [torch.logsumexp(logits[b], 0) - logits[b, b] for b in range(4)]
    cols = [torch.logsumexp(logits[:, b], 0) - logits[b, b] for b in range(4)]
    expected = (sum(rows) / 4 + sum(cols) / 4) / 2
    torch.testing.assert_close(result["loss"].double(), expected, rtol=1e-4, atol=1e-4)


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
    model.clamp_logit_scale_()  # training caps the parameter after each step, as CLIP
    assert model.scale().item() == pytest.approx(100.0)


@pytest.mark.parametrize("offset", [-1e-3, 0.0, 1e-3])
def test_the_logit_scale_has_a_gradient_at_its_cap(model, offset):
    # A clamp in the forward pass would zero it above the cap (where Adam's momentum can carry
    # the parameter) and leave it stuck there.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0) + offset)
    model.loss(*inputs(model.config))["loss"].backward()
    assert model.logit_scale.grad.abs().item() > 0


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
    # the loss checks each input before comparing counts: these read as "need as many texts as
    # images, got 8 and 2" (a 1-D text) or "got 2 and 3" (a 3-D image), or failed inside torch.cat
    with pytest.raises(ValueError, match=r"text_ids must have shape \[B, 8\]"):
        model.loss(text[0], images)
    with pytest.raises(ValueError, match=r"images must have shape"):
        model.loss(text, images[0])
    with pytest.raises(ValueError, match=r"negatives must have shape \[B, 8\]"):
        model.loss(text, images, negatives=text[:, :5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [16, 32])
def test_images_of_any_float_dtype_are_scored(model, dtype, size):
    # float64 met the float32 weights with a bare RuntimeError; half at another size failed in interpolate
    text, images = inputs(model.config, batch=3)
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")
    expected = model.score(text[:1], images)
    torch.testing.assert_close(model.score(text[:1], images.to(dtype)), expected, atol=0.3, rtol=0.05)


def test_contrastive_logits_are_float32_under_autocast(model):
    # bf16 logits near the scale's cap of 100 are only good to 0.25-0.5: captions tied their negatives
    text, images = inputs(model.config, batch=4)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    plain = model.loss(text, images)["logits"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = model.loss(text, images)
        scores = model.score(text[:1], images)
    assert result["logits"].dtype == torch.float32 and result["loss"].dtype == torch.float32
    assert scores.dtype == torch.float32
    torch.testing.assert_close(result["logits"], plain, atol=1.5, rtol=0.05)  # bf16 features, float32 products
