"""The prior: configuration, parameter counts, what each position may see, backends agree."""

import math

import pytest
import torch

from dalle_fast import ops
from dalle_fast.prior import Prior, PriorConfig
from tests.conftest import assert_close, requires_kernels


def small_config(**kw) -> PriorConfig:
    base = dict(text_len=5, grid=4, text_vocab=23, image_vocab=17, d_model=32, heads=2, layers=3, kernel=3)
    return PriorConfig(**(base | kw))


def random_tokens(cfg: PriorConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab_total, (batch, cfg.text_len), generator=g)
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_len), generator=g)
    return text, image


def test_schedule_and_explicit_kinds():
    assert PriorConfig.preset("small").layer_kinds() == ops.layer_kinds(8)
    assert small_config(layers=6).layer_kinds() == ["row", "column", "row", "row", "row", "conv"]
    cfg = small_config(layers=2, kinds=["causal", "conv"])
    assert cfg.layer_kinds() == ["causal", "conv"]
    assert [b.attn.kind for b in Prior(cfg).blocks] == ["causal", "conv"]


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=30, heads=4), "divisible"), (dict(kernel=4), "odd"), (dict(layers=0), "positive"),
    (dict(kinds=("row",)), "entries"), (dict(layers=1, kinds=("diagonal",)), "unknown kind"),
    (dict(image_loss_weight=-1.0), "image_loss_weight"), (dict(colour_codes=4), "multiple"),
    (dict(colour_codes=17), "multiple"), (dict(colour_codes=-1), "colour_codes"),
    (dict(text_len=1), "text_len must be >= 2"), (dict(image_loss_weight=float("nan")), "image_loss_weight"),
    (dict(image_loss_weight=float("inf")), "image_loss_weight"), (dict(image_loss_weight="7"), "image_loss_weight"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        small_config(**bad)
    with pytest.raises(ValueError, match="unknown prior preset"):
        PriorConfig.preset("huge")


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_num_params_matches_the_built_model(name):
    cfg = PriorConfig.preset(name)
    assert cfg.num_params() == sum(p.numel() for p in Prior(cfg).parameters())


def test_paper_preset_is_the_12b_model_and_is_counted_without_allocating():
    cfg = PriorConfig.preset("paper")
    assert (cfg.layers, cfg.d_model, cfg.heads, cfg.head_dim, cfg.seq_len) == (64, 3968, 62, 64, 1280)
    n = cfg.num_params()
    # 64 blocks of 12 d^2 (+ biases and norms) = 12.09B, plus embeddings and both heads = 0.20B
    blocks = 64 * (12 * 3968**2 + 13 * 3968)
    assert n == pytest.approx(12.29e9, rel=2e-3) and n > blocks > 12.0e9


def test_loss_at_initialisation_is_near_uniform():
    cfg = small_config()
    torch.manual_seed(0)
    out = Prior(cfg).loss(*random_tokens(cfg, batch=4))
    assert out["text_loss"].item() == pytest.approx(math.log(cfg.text_vocab_total), rel=0.05)
    assert out["image_loss"].item() == pytest.approx(math.log(cfg.image_vocab), rel=0.05)
    assert out["loss"].item() == pytest.approx((out["text_loss"] + 7 * out["image_loss"]).item() / 8, rel=1e-6)


def test_a_float64_model_has_a_float64_loss():
    # .float() lowered a float64 model's logits: its loss in float32, whose finite differences at
    # eps 1e-6 were 0 against an analytic gradient of 0.0095.
    cfg = small_config(layers=1)
    torch.manual_seed(3)
    model = Prior(cfg).double()
    text, image = random_tokens(cfg, batch=2)
    with ops.backend("reference"):
        out = model.loss(text, image)
        assert all(value.dtype == torch.float64 for value in out.values())
        text_logits, image_logits = model(text, image)
        expected = torch.nn.functional.cross_entropy(image_logits.flatten(0, 1), image.flatten())
        assert out["image_loss"].item() == expected.item()


def test_factored_codes_embed_and_predict_colour_and_shape_apart():
    # image_vocab 18 = 3 colour codes x 6 shape codes, id = c * 6 + g
    cfg = small_config(image_vocab=18, colour_codes=3)
    torch.manual_seed(0)
    prior = Prior(cfg)
    assert cfg.num_params() == sum(p.numel() for p in prior.parameters())
    ids = torch.arange(18)
    emb = prior.image_emb
    torch.testing.assert_close(emb(ids), emb.colour(ids // 6) + emb.shape(ids % 6))
    text, image = random_tokens(cfg, batch=3)
    _, logits = prior(text, image)  # [B, S*S, 18]
    grid = logits.unflatten(-1, (3, 6))  # [B, n, c, g]
    # logit(c, g) = colour(c) + shape(g): every colour row is the same shape row plus a constant
    rows = grid - grid[..., :1]
    torch.testing.assert_close(rows, rows[..., :1, :].expand_as(rows))
    # the code's cross-entropy is the sum of its colour's and its shape's, each over its own factor
    colour = grid.logsumexp(-1).log_softmax(-1)  # log p(c)
    shape = grid.logsumexp(-2).log_softmax(-1)  # log p(g)
    expected = -(colour.gather(-1, (image // 6)[..., None]) + shape.gather(-1, (image % 6)[..., None])).mean()
    torch.testing.assert_close(prior.loss(text, image)["image_loss"], expected)


def test_shapes_and_input_errors():
    cfg = small_config()
    model = Prior(cfg)
    text, image = random_tokens(cfg)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (2, cfg.text_len - 1, cfg.text_vocab_total)
    assert image_logits.shape == (2, cfg.image_len, cfg.image_vocab)
    with pytest.raises(TypeError, match="int64"):
        model(text.float(), image)
    with pytest.raises(ValueError, match="text must be"):
        model(text[:, :-1], image)
    with pytest.raises(ValueError, match="image must be"):
        model(text, image[:1])


@pytest.mark.parametrize("kind", ops.KINDS)
def test_one_layer_sees_exactly_its_mask(kind):
    """With one layer, the output at position p depends on the input at position j iff the mask
    lets p see j: changing image token g changes exactly the outputs whose mask row allows T + g."""
    cfg = small_config(layers=1, kinds=(kind,), grid=5)
    torch.manual_seed(1)
    model = Prior(cfg).double()
    text, image = random_tokens(cfg, batch=1)
    mask = ops.attention_mask(kind, cfg.text_len, cfg.grid, cfg.kernel)
    t = cfg.text_len
    with torch.no_grad(), ops.backend("reference"):
        _, base = model(text, image)
        for g in range(cfg.image_len - 1):
            changed = image.clone()
            changed[0, g] = (changed[0, g] + 1) % cfg.image_vocab
            _, out = model(text, changed)
            # image logit i comes from position T - 1 + i
            differs = (out - base).abs().amax(-1)[0] > 1e-12
            expected = mask[t - 1 : -1, t + g]
            assert torch.equal(differs, expected), (kind, g, differs.nonzero().ravel(), expected.nonzero().ravel())


def test_deep_model_never_looks_ahead():
    cfg = small_config(layers=4)
    torch.manual_seed(2)
    model = Prior(cfg).double()
    text, image = random_tokens(cfg, batch=1)
    with torch.no_grad(), ops.backend("reference"):
        text_base, image_base = model(text, image)
        for g in (0, 5, cfg.image_len - 1):
            changed = image.clone()
            changed[0, g] = (changed[0, g] + 1) % cfg.image_vocab
            text_out, image_out = model(text, changed)
            assert torch.equal(text_out, text_base)
            assert torch.equal(image_out[:, : g + 1], image_base[:, : g + 1])
        changed = text.clone()
        changed[0, 2] = (changed[0, 2] + 1) % cfg.text_vocab_total
        text_out, _ = model(changed, image)
        assert torch.equal(text_out[:, :2], text_base[:, :2])  # logits from positions 0, 1


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_give_the_reference_logits_and_gradients(dtype):
    """The same weights through our CPU kernels and through the dense reference."""
    cfg = small_config(layers=4, grid=6)
    torch.manual_seed(3)
    model = Prior(cfg).to(dtype)
    text, image = random_tokens(cfg, batch=3)
    results = {}
    for name in ("reference", "cpu"):
        model.zero_grad()
        with ops.backend(name):
            out = model.loss(text, image)
            logits = model(text, image)
        out["loss"].backward()
        results[name] = (logits, [p.grad.clone() for p in model.parameters()])
    (ref_logits, ref_grads), (cpu_logits, cpu_grads) = results["reference"], results["cpu"]
    for a, b in zip(cpu_logits, ref_logits):
        assert_close(a, b, "logits")
    for a, b in zip(cpu_grads, ref_grads):
        assert_close(a, b, "gradient")


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    torch.manual_seed(4)
    plain = Prior(cfg)
    ckpt = Prior(small_config(checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    text, image = random_tokens(cfg)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.loss(text, image)["loss"].backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
