"""The dVAE: sizes of the presets, shapes and ranges, the likelihood, the loss and its gradients,
and the errors on bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from dalle_fast.dvae import (
    DVAE,
    PRESETS,
    DVAEConfig,
    codebook_perplexity,
    convert_openai_state_dict,
    kmeans,
    logit_laplace_nll,
    map_pixels,
    num_params,
    psnr,
    unmap_pixels,
)
from dalle_fast.ops import gumbel_softmax_kl


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DVAE(DVAEConfig.preset("tiny")).eval()


def images(cfg, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


# -- configs and sizes ------------------------------------------------------------


def test_paper_preset_matches_openai_parameter_counts():
    cfg = DVAEConfig.preset("paper")
    assert (cfg.image_size, cfg.grid, cfg.vocab, cfg.n_hid) == (256, 32, 8192, 256)
    with torch.device("meta"):  # counts without allocating 100M floats
        model = DVAE(cfg)
    assert num_params(model.encoder) == pytest.approx(53.8e6, rel=0.01)
    assert num_params(model.decoder) == pytest.approx(43.8e6, rel=0.01)
    assert num_params(model) == num_params(model.encoder) + num_params(model.decoder)


@pytest.mark.parametrize("name, grid", [("paper", 32), ("small", 16), ("fine", 24), ("tiny", 8)])
def test_preset_grids(name, grid):
    cfg = DVAEConfig.preset(name)
    assert cfg.grid == grid == cfg.image_size // 2 ** (cfg.groups - 1)


def test_all_presets_are_tested():
    assert set(PRESETS) == {"paper", "small", "fine", "tiny"}


def test_preset_overrides_and_copies():
    cfg = DVAEConfig.preset("tiny", image_size=32)
    assert cfg.grid == 4 and PRESETS["tiny"].image_size == 64


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="paper.*small.*tiny"):
        DVAEConfig.preset("huge")


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=100), "divisible by 2\\*\\*\\(groups-1\\) = 8"),
    (dict(n_hid=0), "n_hid must be a positive int"),
    (dict(vocab=-3), "vocab must be a positive int"),
    (dict(groups=2.0), "groups must be a positive int"),
    (dict(n_hid=30), "multiple of 4"),
    (dict(logit_laplace_eps=0.5), "logit_laplace_eps"),
    (dict(logit_laplace_eps=0.0), "logit_laplace_eps"),
    (dict(colour_codes=-1), "colour_codes"), (dict(vocab=256, colour_codes=3), "multiple"),
    (dict(vocab=8, colour_codes=8), "multiple"), (dict(colour_codes=True), "colour_codes"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DVAEConfig(**kwargs)


def test_submodule_names_follow_openai():
    with torch.device("meta"):
        model = DVAE(DVAEConfig.preset("paper"))
    keys = set(model.state_dict())
    for key in ["encoder.blocks.input.weight", "encoder.blocks.group_1.block_1.res_path.conv_1.weight",
                "encoder.blocks.group_2.block_1.id_path.weight", "encoder.blocks.output.conv.bias",
                "decoder.blocks.input.weight", "decoder.blocks.group_4.block_2.res_path.conv_4.bias",
                "decoder.blocks.output.conv.weight"]:
        assert key in keys, key
    assert "encoder.blocks.group_1.block_1.id_path.weight" not in keys  # identity when widths agree
    assert convert_openai_state_dict({"blocks.input.w": 1, "blocks.input.b": 2}) == {
        "blocks.input.weight": 1, "blocks.input.bias": 2}


# -- inference --------------------------------------------------------------------


def test_encode_decode_shapes_dtypes_and_range(tiny):
    cfg = tiny.config
    x = images(cfg, batch=3)
    tokens = tiny.encode(x)
    assert tokens.shape == (3, cfg.grid, cfg.grid) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < cfg.vocab
    logits = tiny.encoder(map_pixels(x))
    assert logits.shape == (3, cfg.vocab, cfg.grid, cfg.grid)
    assert torch.equal(tokens, logits.argmax(1))
    with torch.no_grad():
        out = tiny.decode(tokens)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert tiny.reconstruct(x).shape == x.shape


def test_decode_tokens_equals_decoder_on_one_hot(tiny):
    cfg = tiny.config
    tokens = torch.randint(0, cfg.vocab, (2, cfg.grid, cfg.grid), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(tokens, cfg.vocab).permute(0, 3, 1, 2).float()  # (B, vocab, S, S)
    with torch.no_grad():
        expected = tiny.decoder(one_hot)
        got = tiny.decoder.forward_tokens(tokens)
    assert expected.shape == (2, 6, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_map_unmap_round_trip():
    x = torch.rand(2, 3, 8, 8)
    y = map_pixels(x)
    assert 0.1 - 1e-7 <= y.min() and y.max() <= 0.9 + 1e-7
    torch.testing.assert_close(unmap_pixels(y), x)
    torch.testing.assert_close(map_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(unmap_pixels(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 0.5, 1.0]))


# -- the likelihood -------------------------------------------------------------------


def test_logit_laplace_nll_matches_formula():
    xs, mus, log_bs = [0.1, 0.37, 0.9], [0.0, -1.5, 2.0], [0.0, -2.0, 0.7]
    x = torch.tensor(xs).view(1, 3, 1, 1)
    out = torch.tensor(mus + log_bs).view(1, 6, 1, 1)
    expected = 0.0
    for xi, mu, log_b in zip(xs, mus, log_bs):
        b = math.exp(log_b)
        density = math.exp(-abs(math.log(xi / (1 - xi)) - mu) / b) / (2 * b * xi * (1 - xi))
        expected -= math.log(density)
    got = logit_laplace_nll(x, out)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_logit_laplace_is_a_density():
    x = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    for mu, log_b in [(0.0, 0.0), (1.0, -1.0), (-2.0, 0.5)]:
        out = torch.tensor([mu, log_b], dtype=torch.float64).view(1, 2, 1, 1).expand(x.numel(), 2, 1, 1)
        nll = logit_laplace_nll(x.view(-1, 1, 1, 1).float(), out.float()).double()
        assert torch.trapezoid(torch.exp(-nll), x).item() == pytest.approx(1.0, abs=2e-3)


def test_logit_laplace_nll_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = map_pixels(torch.rand(2, 3, 2, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    out = torch.randn(2, 6, 2, 2, generator=gen, dtype=torch.float64).requires_grad_()
    assert logit_laplace_nll(x, out).dtype == torch.float64
    assert torch.autograd.gradcheck(logit_laplace_nll, (x, out))


def test_logit_laplace_nll_shape_errors():
    with pytest.raises(ValueError, match="decoder_out must have shape"):
        logit_laplace_nll(torch.rand(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))


# -- the loss -------------------------------------------------------------------------


def test_loss_is_finite_and_gradients_reach_encoder_and_decoder():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny"))
    x = images(model.config, batch=2)
    out = model.loss(x, tau=0.5, beta=2.0, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].detach(), out["nll"] + 2.0 * out["kl"])
    assert out["kl"] >= 0
    assert out["recon"].shape == x.shape and not out["recon"].requires_grad
    assert 0 <= out["recon"].min() and out["recon"].max() <= 1
    S, V = model.config.grid, model.config.vocab
    assert out["logits"].shape == (2, V, S, S) and out["tokens"].shape == (2, S, S)
    out["loss"].backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert model.encoder.blocks.input.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("colour_codes", [0, 4])
def test_autocast_leaves_the_logits_and_the_likelihoods_parameters_in_float32(colour_codes):
    """Under bf16 autocast (--amp) the encoder's logits and the decoder's mu and ln b are float32, each
    the float32 conv of its (bf16) input: rounded to bf16, mu fell on a grid 2**-6 apart at |mu| ~ 2."""
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny", colour_codes=colour_codes))
    x = images(model.config, batch=2)
    seen = {}
    for name in ("encoder", "decoder"):
        part = getattr(model, name)
        conv = part.blocks.output.conv if name == "decoder" else part.output_convs()[0]
        conv.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(x, tau=0.5, beta=2.0, generator=torch.Generator().manual_seed(0))
    for name, (features, out) in seen.items():
        conv = model.decoder.blocks.output.conv if name == "decoder" else getattr(model, name).output_convs()[0]
        assert features.dtype == torch.bfloat16 and out.dtype == torch.float32, name  # bf16 in, float32 out
        torch.testing.assert_close(out, F.conv2d(features.float(), conv.weight, conv.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("colour_codes", [0, 4])
def test_loss_terms_are_the_logit_laplace_nll_and_the_kl_summed_over_the_grid(colour_codes):
    """nll and kl against the formulas of SPEC section 3, written out here: per image, the
    logit-Laplace NLL summed over every subpixel and KL(softmax(logits) || uniform) summed over
    grid positions (factored codes: the colour and shape KLs, which the joint softmax's KL sums),
    each divided by 3 * H * W."""
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny", dequantize=False, colour_codes=colour_codes))
    x = images(model.config, batch=2)
    out = model.loss(x, tau=0.5, beta=2.0, generator=torch.Generator().manual_seed(0))
    pixels = 3 * model.config.image_size ** 2
    logp = torch.log_softmax(out["logits"].double(), dim=1)
    kl = ((logp.exp() * logp).sum(1) + math.log(model.config.vocab)).sum(dim=(1, 2)) / pixels
    torch.testing.assert_close(out["kl"].double(), kl.mean(), rtol=1e-4, atol=1e-9)
    if colour_codes == 0:  # the decoder's output for the same relaxed sample (same generator state)
        xm = map_pixels(x, model.config.logit_laplace_eps).double()
        z, _ = gumbel_softmax_kl(out["logits"], 0.5, dim=1, generator=torch.Generator().manual_seed(0))
        mu, log_b = model.decoder(z).detach().double().chunk(2, dim=1)
        b = log_b.exp()
        nll = (torch.abs(torch.log(xm / (1 - xm)) - mu) / b + torch.log(2 * b * xm * (1 - xm))).sum(dim=(1, 2, 3))
        torch.testing.assert_close(out["nll"].double(), (nll / pixels).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), out["nll"] + 2.0 * out["kl"])


# -- factored codes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def factored():
    torch.manual_seed(0)
    return DVAE(DVAEConfig.preset("tiny", colour_codes=4)).eval()  # 256 codes = 4 colours x 64 shapes


def _square(cfg, rgb, top=16, side=24):
    x = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    x[0, :, top:top + side, top:top + side] = torch.tensor(rgb)[:, None, None]
    return x


def test_factored_logits_are_colour_plus_shape_and_shape_ignores_hue(factored):
    cfg = factored.config
    assert cfg.shape_codes == 64
    red, green = _square(cfg, (1.0, 0.0, 0.0)), _square(cfg, (0.0, 1.0, 0.0))
    with torch.no_grad():
        logits = factored.encoder(map_pixels(torch.cat([red, green])))  # (2, 256, S, S)
    grid = logits.unflatten(1, (4, 64))  # (2, c, g, S, S)
    rows = grid - grid[:, :, :1]
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows))  # logit(c, g) = colour(c) + shape(g)
    shape = grid[:, 0] - grid[:, 0, :1]  # shape(g) - shape(0)
    torch.testing.assert_close(shape[0], shape[1])  # a red and a green square: the same shape logits
    colour = grid[:, :, 0] - grid[:, :1, 0]
    assert not torch.allclose(colour[0], colour[1])  # but not the same colour logits
    tokens = factored.encode(torch.cat([red, green]))
    assert torch.equal(tokens % 64, logits.unflatten(1, (4, 64))[:, 0].argmax(1))
    assert torch.equal(tokens[0] % 64, tokens[1] % 64)


def test_kmeans_gives_a_rare_distinct_cluster_its_own_centre_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    corners = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    counts = torch.tensor([900, 60, 30, 10])  # a cluster with 1% of the points still gets a centre
    points = corners.repeat_interleave(counts, 0) + 0.02 * torch.randn(1000, 3, generator=gen)
    centres = kmeans(points, 4)
    assert torch.equal(centres, kmeans(points, 4))
    nearest = torch.cdist(corners, centres).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(centres[nearest], corners, atol=0.01, rtol=0)
    # more centres than distinct points: the spare ones sit on points, nothing is NaN
    spare = kmeans(corners, 6)
    assert torch.isfinite(spare).all() and (torch.cdist(spare, corners).min(1).values < 1e-6).all()
    for bad in (torch.zeros(0, 3), torch.zeros(3)):
        with pytest.raises(ValueError, match="kmeans"):
            kmeans(bad, 2)


def test_fit_palette_gives_each_colour_its_own_code_and_nearest_hue_logits():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny", colour_codes=4))
    cfg = model.config
    colours = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)]  # green lies between red and yellow's codes
    x = map_pixels(torch.cat([_square(cfg, rgb) for rgb in colours]))
    palette = model.encoder.fit_palette(x, scale=10.0)
    assert palette.shape == (4, 3)
    with torch.no_grad():
        colour, _ = model.encoder.factors(x)  # (3, 4, S, S)
        hues = model.encoder.hues(x)
    # logit k = -10 |hue - palette_k|^2 up to a term equal for every k
    distance = -10 * (hues[:, None] - palette[None, :, :, None, None]).pow(2).sum(2)
    torch.testing.assert_close(colour - colour[:, :1], distance - distance[:, :1], atol=1e-4, rtol=1e-4)
    centre = cfg.image_size // cfg.downsample // 2  # a cell inside each square
    codes = colour[:, :, centre, centre].argmax(1)
    background = colour[:, :, 0, 0].argmax(1)
    assert len(set(codes.tolist())) == 3 and (background == background[0]).all() and background[0] not in codes
    with pytest.raises(ValueError, match="scale"):
        model.encoder.fit_palette(x, scale=0.0)


def test_factored_usage_counts_the_shape_codes_only(factored):
    x = images(factored.config)
    out = factored.loss(x, tau=1.0, beta=0.0, generator=torch.Generator().manual_seed(0), usage=1.0)
    with torch.no_grad():
        _, shape = factored.encoder.factors(map_pixels(x))
    mean = shape.softmax(1).mean(dim=(0, 2, 3))
    torch.testing.assert_close(out["usage_kl"], math.log(64) + (mean * mean.log()).sum())


def test_factored_codebook_adds_the_colour_and_shape_embeddings(factored):
    cfg = factored.config
    codebook = factored.decoder.blocks.input
    ids = torch.arange(cfg.vocab)
    torch.testing.assert_close(codebook.weight[:, ids, 0, 0],
                               codebook.colour.weight[:, ids // 64, 0, 0] + codebook.shape.weight[:, ids % 64, 0, 0])
    tokens = torch.randint(0, cfg.vocab, (2, cfg.grid, cfg.grid), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(tokens, cfg.vocab).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(factored.decoder.forward_tokens(tokens), factored.decoder(one_hot),
                                   atol=1e-5, rtol=1e-5)


def test_factored_loss_trains_both_encoders_and_the_codebook():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny", colour_codes=4))
    out = model.loss(images(model.config), tau=0.5, beta=1.0, generator=torch.Generator().manual_seed(0), usage=0.1)
    assert torch.isfinite(out["loss"]) and out["logits"].shape[1] == 256
    out["loss"].backward()
    for part in (model.encoder.shape, model.encoder.colour, model.decoder.blocks.input.colour,
                 model.decoder.blocks.input.shape):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.dim() > 1)
    assert len(model.encoder.output_convs()) == 2


def test_loss_is_reproducible_with_a_generator_and_forward_is_loss(tiny):
    x = images(tiny.config)
    a = tiny.loss(x, 1.0, 1.0, generator=torch.Generator().manual_seed(3))["loss"]
    b = tiny(x, 1.0, 1.0, generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(a, b)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.preset("tiny", image_size=32))
    # Flat 8x8 patches of random colours: structure a 4x4 grid can learn (pure noise barely moves).
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 4, 4, generator=gen).repeat_interleave(8, 2).repeat_interleave(8, 3)  # (4, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model.loss(x, tau=1.0, beta=0.1, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.05, losses


# -- bad inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: torch.rand(2, 1, 64, 64), r"shape \(B, 3, 64, 64\)"),
    (lambda: torch.rand(2, 3, 32, 32), r"shape \(B, 3, 64, 64\)"),
    (lambda: torch.rand(3, 64, 64), r"shape \(B, 3, 64, 64\)"),
    (lambda: torch.rand(2, 3, 64, 64) * 2, r"values in \[0, 1\]"),
    (lambda: torch.rand(2, 3, 64, 64) - 0.5, r"values in \[0, 1\]"),
    (lambda: torch.full((1, 3, 64, 64), float("nan")), r"values in \[0, 1\]"),
    (lambda: torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating"),
])
def test_bad_images_raise(tiny, make, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(make())
    with pytest.raises(ValueError, match=match):
        tiny.loss(make(), 1.0, 1.0)


@pytest.mark.parametrize("make, match", [
    (lambda: torch.full((1, 8, 8), 256), r"in \[0, 256\)"),
    (lambda: torch.full((1, 8, 8), -1), r"in \[0, 256\)"),
    (lambda: torch.zeros(1, 4, 4, dtype=torch.long), r"shape \(B, 8, 8\)"),
    (lambda: torch.zeros(8, 8, dtype=torch.long), r"shape \(B, 8, 8\)"),
    (lambda: torch.zeros(1, 8, 8), "integer"),
])
def test_bad_tokens_raise(tiny, make, match):
    with pytest.raises(ValueError, match=match):
        tiny.decode(make())


@pytest.mark.parametrize("tau, beta", [(0.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0), (1.0, -0.1)])
def test_bad_tau_beta_raise(tiny, tau, beta):
    with pytest.raises(ValueError, match="tau|beta"):
        tiny.loss(images(tiny.config), tau, beta)


def test_bad_module_inputs_raise(tiny):
    with pytest.raises(ValueError, match=r"encoder input must be \(B, 3, H, W\)"):
        tiny.encoder(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"decoder input must be \(B, 256, S, S\)"):
        tiny.decoder(torch.rand(1, 255, 8, 8))


# -- metrics --------------------------------------------------------------------------


def test_psnr_known_values():
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, rel=1e-5)
    assert psnr(a, a + 0.01).item() == pytest.approx(40.0, rel=1e-5)
    assert psnr(a, a).item() == pytest.approx(100.0)  # capped: an exact reconstruction is no divergence
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])


def test_codebook_perplexity_known_values():
    assert codebook_perplexity(torch.arange(16).view(1, 4, 4), 64).item() == pytest.approx(16.0)
    assert codebook_perplexity(torch.full((2, 4, 4), 7), 64).item() == pytest.approx(1.0)
    p = torch.tensor([0.75, 0.25])
    expected = math.exp(-(p * p.log()).sum().item())
    assert codebook_perplexity(torch.tensor([0, 0, 0, 1]), 2).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        codebook_perplexity(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="integer"):
        codebook_perplexity(torch.tensor([0.0]), 2)


def test_usage_term_is_the_kl_of_the_mean_code_distribution(tiny):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seed = lambda: torch.Generator().manual_seed(1)
    plain = tiny.loss(images, 1.0, 0.5, seed())
    with_usage = tiny.loss(images, 1.0, 0.5, seed(), usage=2.0)
    mean = plain["logits"].softmax(1).mean(dim=(0, 2, 3))
    expected = (mean * (mean * tiny.config.vocab).log()).sum()
    assert plain["usage_kl"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert with_usage["loss"].item() == pytest.approx((plain["loss"] + 2.0 * plain["usage_kl"]).item(), rel=1e-5)
    # collapse onto one code costs log(vocab); the gradient of the term spreads the codes
    with torch.no_grad():
        tiny.encoder.blocks.output.conv.bias[0] += 50.0
    try:
        collapsed = tiny.loss(images, 1.0, 0.0, seed(), usage=1.0)
        assert collapsed["usage_kl"].item() == pytest.approx(math.log(tiny.config.vocab), rel=1e-3)
    finally:
        with torch.no_grad():
            tiny.encoder.blocks.output.conv.bias[0] -= 50.0
    with pytest.raises(ValueError, match="usage"):
        tiny.loss(images, 1.0, 0.5, usage=-1.0)


def test_mse_term_is_the_squared_error_of_the_decoder_mean_in_pixels(tiny):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seed = lambda: torch.Generator().manual_seed(1)
    plain = tiny.loss(images, 1.0, 0.5, seed())
    with_mse = tiny.loss(images, 1.0, 0.5, seed(), mse=3.0)
    assert with_mse["loss"].item() == pytest.approx((plain["loss"] + 3.0 * plain["mse"]).item(), rel=1e-5)
    # the decoder mean unmapped but not clamped: equal to the clamped reconstruction's error
    # wherever the mean lies inside the mapped range
    eps = tiny.config.logit_laplace_eps
    z, _ = gumbel_softmax_kl(tiny.encoder(map_pixels(images, eps)), 1.0, dim=1, generator=seed())
    mean = torch.sigmoid(tiny.decoder(z)[:, :3])
    expected = ((mean - map_pixels(images, eps)) / (1 - 2 * eps)).pow(2).mean()
    assert plain["mse"].item() == pytest.approx(expected.item(), rel=1e-5)
    # a saturated wrong colour still has a gradient (the clamped reconstruction has none)
    with torch.no_grad():
        tiny.decoder.blocks.output.conv.bias[:3] -= 4.0  # the mean under eps: clamped to black
    try:
        tiny.zero_grad()
        tiny.loss(torch.ones(1, 3, 64, 64), 1.0, 0.0, seed(), mse=1.0)["loss"].backward()
        without = tiny.decoder.blocks.output.conv.bias.grad[:3].clone()
        tiny.zero_grad()
        tiny.loss(torch.ones(1, 3, 64, 64), 1.0, 0.0, seed(), mse=0.0)["loss"].backward()
        assert (without - tiny.decoder.blocks.output.conv.bias.grad[:3]).abs().max() > 0
    finally:
        tiny.zero_grad()
        with torch.no_grad():
            tiny.decoder.blocks.output.conv.bias[:3] += 4.0
    with pytest.raises(ValueError, match="mse"):
        tiny.loss(images, 1.0, 0.5, mse=-1.0)
