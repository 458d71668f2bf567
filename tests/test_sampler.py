"""Incremental decoding against the full forward pass, sampling filters, seeds and priming."""

import copy

import pytest
import torch

from dalle_fast import ops, sampler
from dalle_fast.ops import decode, linear
from dalle_fast.prior import Prior, PriorConfig
from dalle_fast.sampler import (GuidedPrior, IncrementalPrior, SamplingConfig, filter_logits, key_offsets,
                                sample_image_tokens, sample_logits)
from tests.conftest import DEVICES, assert_close, assert_within_reference_error, requires_cuda


def make_prior(kinds, grid=5, text_len=4, seed=0, dtype=torch.float64, device="cpu", colour_codes=0,
               image_vocab=None) -> Prior:
    image_vocab = image_vocab or (12 if colour_codes else 13)
    cfg = PriorConfig(text_len=text_len, grid=grid, text_vocab=19, image_vocab=image_vocab,
                      d_model=32, heads=2, layers=len(kinds), kernel=3, kinds=tuple(kinds), colour_codes=colour_codes)
    torch.manual_seed(seed)
    return Prior(cfg).to(device=device, dtype=dtype).eval()


def tokens_for(cfg, batch=2, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.text_vocab_total, (batch, cfg.text_len), generator=g).to(device)
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_len), generator=g).to(device)
    return text, image


@pytest.mark.parametrize("kind", ops.KINDS)
def test_key_offsets_are_the_mask(kind):
    t, s, k = 3, 5, 3
    mask = ops.attention_mask(kind, t, s, k)
    offsets = key_offsets(kind, s, k)
    for g in range(s * s):
        allowed = {t + g - int(d) for d in offsets if g - int(d) >= 0}
        assert allowed == set((mask[t + g, t:].nonzero().ravel() + t).tolist()), (kind, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kinds, colour_codes", [(["row"], 0), (["column"], 0), (["conv"], 0), (["causal"], 0),
                                                 (["row", "column", "row", "conv"], 0),
                                                 (["row", "column", "row", "conv"], 3)])
def test_incremental_logits_equal_the_full_forward(kinds, colour_codes, device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    prior = make_prior(kinds, device=device, dtype=dtype, colour_codes=colour_codes)
    cfg = prior.config
    text, image = tokens_for(cfg, device=device)
    with torch.no_grad(), ops.backend("reference"):
        _, full = prior(text, image)  # (B, S*S, V): full[:, g] predicts image token g
    inc = IncrementalPrior(prior, batch=2)
    assert_close(inc.prefill(text), full[:, 0], "prefill")
    for g in range(cfg.image_len - 1):
        logits = inc.step(image[:, g], torch.tensor(g, device=device))
        assert_close(logits, full[:, g + 1], f"step {g}")
    # priming: prefill over the first rows gives the logits of the next token directly
    inc = IncrementalPrior(prior, batch=2)
    n0 = 2 * cfg.grid
    assert_close(inc.prefill(text, image[:, :n0]), full[:, n0], "primed prefill")
    assert_close(inc.step(image[:, n0], torch.tensor(n0, device=device)), full[:, n0 + 1], "step after priming")


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False, False]]
    probs = logits.softmax(-1)[0]  # 0.63, 0.086, 0.23, 0.03, 0.01
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=float(probs[0] + probs[2] + probs[1]) + 1e-3)).sum() == 4
    assert torch.equal(filter_logits(logits), logits)
    for bad in (dict(top_p=0.0), dict(top_p=float("nan")), dict(top_k=-3), dict(top_k=2.0)):
        with pytest.raises(ValueError):
            filter_logits(logits, **bad)
    # bfloat16 logits: the nucleus of their float32 softmax (a bfloat16 cumulative sum kept 0.95 of the tokens)
    wide = (torch.randn(64, 8192, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    for p in (0.5, 0.9):
        assert torch.equal(filter_logits(wide, top_p=p).isfinite(), filter_logits(wide.float(), top_p=p).isfinite()), p


def test_top_k_keeps_exactly_k_tokens_when_the_kth_ties():
    # bf16 logits tie often: top_k=1 must leave one token (greedy), not a draw among the tied ones
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    for k in (1, 2, 4):
        kept = torch.isfinite(filter_logits(logits, top_k=k))
        assert kept.sum(-1).tolist() == [k, k], k
    kept = filter_logits(logits, top_k=2)
    assert set(kept[0].isfinite().nonzero().ravel().tolist()) <= {1, 2, 4}  # among the 5.0s
    assert torch.equal(kept[kept.isfinite()], torch.tensor([5.0, 5.0, 0.0, 0.0], dtype=torch.bfloat16))
    greedy = SamplingConfig(top_k=1)
    draws = {int(sample_logits(logits[:1], greedy, torch.Generator().manual_seed(seed))[0]) for seed in range(20)}
    assert len(draws) == 1


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(60000, 4)
    draws = sample_logits(logits, SamplingConfig(), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.01, rtol=0)
    again = sample_logits(logits, SamplingConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    cold = sample_logits(logits, SamplingConfig(temperature=0.05), torch.Generator().manual_seed(0))
    assert (cold == 0).float().mean() > 0.99


def test_seeded_generation_repeats_and_priming_keeps_the_rows():
    prior = make_prior(["row", "column", "conv"], dtype=torch.float32)
    cfg = prior.config
    text, image = tokens_for(cfg, batch=3)
    run = lambda seed, **kw: sample_image_tokens(prior, text, generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(5), run(5), run(6)
    assert a.shape == (3, cfg.image_len) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < cfg.image_vocab
    n0 = 2 * cfg.grid
    primed = run(5, prime=image[:, :n0])
    assert torch.equal(primed[:, :n0], image[:, :n0])
    assert torch.equal(run(5, prime=image), image)  # nothing left to sample
    with pytest.raises(ValueError, match="prime must be"):
        run(5, prime=torch.cat([image, image[:, :1]], dim=1))  # longer than the grid


def test_sampling_config_rejects_bad_values():
    for bad in (dict(temperature=0.0), dict(temperature=1e-39), dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0),
                dict(top_p=1.5), dict(cond_scale=0.5), dict(cond_scale=float("inf")),
                # 1 / 1e31 is below gumbel_argmax's scale range: it failed at the first token, after prefill
                dict(temperature=1e31), dict(temperature=2e6),
                dict(cond_scale=1e30), dict(top_k=True), dict(temperature="1")):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(TypeError):
        SamplingConfig(cuda_graph="no")
    SamplingConfig(temperature=1e6, cond_scale=1e3)  # the bounds themselves are fine
    # checked once, when made: so it cannot be changed afterwards (top_p = 0 drew token 0 everywhere)
    config = SamplingConfig(top_p=0.9)
    with pytest.raises(AttributeError):
        config.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        __import__("dataclasses").replace(config, top_p=0.0)


def test_sample_image_tokens_checks_its_inputs():
    prior = make_prior(["row", "conv"], dtype=torch.float32)
    cfg = prior.config
    text, image = tokens_for(cfg, batch=2)
    gen = torch.Generator().manual_seed(0)
    for bad_prime, match in ((image[:, :5] + cfg.image_vocab, "prime tokens must be in"),
                             (image[:, :5] - image[:, :5] - 1, "prime tokens must be in"),
                             (image[:1, :5], "prime must be"),
                             (image[:, :5].int(), "int64")):
        with pytest.raises(ValueError, match=match):
            sample_image_tokens(prior, text, prime=bad_prime, generator=gen)
    with pytest.raises(ValueError, match="B >= 1"):
        sample_image_tokens(prior, text[:0], generator=gen)
    with pytest.raises(TypeError, match="SamplingConfig"):
        sample_image_tokens(prior, text, config={"top_k": 3}, generator=gen)
    with pytest.raises(ValueError, match="on meta but the prior"):
        sample_image_tokens(prior, text.to("meta"), generator=gen)
    # text ids beyond the text vocabulary (and its pads) failed in the embedding (on CUDA: a device assert)
    for bad_text in (text + cfg.text_vocab_total, text - text - 1):
        with pytest.raises(ValueError, match=r"text ids must be in \[0, %d\)" % cfg.text_vocab_total):
            sample_image_tokens(prior, bad_text, generator=gen)
    with pytest.raises(ValueError, match="int64"):
        sample_image_tokens(prior, text.int(), generator=gen)
    guided = SamplingConfig(cond_scale=2.0)
    with pytest.raises(ValueError, match="null_text ids must be in"):
        sample_image_tokens(prior, text, config=guided, generator=gen, null_text=null_text_for(cfg) + 100)
    for kw, match in ((dict(prime=image[:, :5].tolist()), "prime must be a tensor"),
                      (dict(config=guided, null_text=null_text_for(cfg).tolist()), "null_text must be a tensor"),
                      (dict(generator=7), "generator must be a torch.Generator")):
        with pytest.raises(TypeError, match=match):
            sample_image_tokens(prior, text, **({"generator": gen} | kw))


def test_nan_logits_are_an_error_not_token_zero_and_each_modules_mode_is_kept():
    prior = make_prior(["row", "conv"], dtype=torch.float32)
    text, _ = tokens_for(prior.config, batch=2)
    prior.train()
    prior.blocks[0].eval()
    modes = [m.training for m in prior.modules()]
    sample_image_tokens(prior, text, generator=torch.Generator().manual_seed(0))
    assert [m.training for m in prior.modules()] == modes  # not every module set to the top one's mode
    with torch.no_grad():
        prior.blocks[1].mlp[2].bias[0] = float("nan")  # a diverged weight: every logit is NaN
    with pytest.raises(FloatingPointError, match="logits were NaN"):
        sample_image_tokens(prior, text, generator=torch.Generator().manual_seed(0))
    assert [m.training for m in prior.modules()] == modes
    with torch.no_grad():
        prior.blocks[1].mlp[2].bias[0] = 0.0
    step = IncrementalPrior.step

    def nan_at_one_step(self, token, g):  # a NaN in one step's logits, mid-image (an overflow, say)
        logits = step(self, token, g)
        return logits.masked_fill((g == 3) & (torch.arange(logits.shape[0]) == 1)[:, None], float("nan"))

    IncrementalPrior.step = nan_at_one_step
    try:
        with pytest.raises(FloatingPointError, match="logits were NaN"):
            sample_image_tokens(prior, text, generator=torch.Generator().manual_seed(0))
    finally:
        IncrementalPrior.step = step
    with pytest.raises(ValueError, match="batch is empty"):  # its mean cross-entropy would be NaN
        prior.loss(text[:0], torch.zeros(0, prior.config.image_len, dtype=torch.long))


def null_text_for(cfg):
    return torch.arange(cfg.text_len) + cfg.text_vocab  # BOS stand-in at 0 is not needed here


def test_guided_logits_mix_the_caption_and_the_null_caption():
    prior = make_prior(["row", "column", "conv", "causal"])
    cfg = prior.config
    text, image = tokens_for(cfg, batch=2)
    null = null_text_for(cfg)
    scale = 2.5
    guided = GuidedPrior(prior, 2, null, scale)
    cond, free = IncrementalPrior(prior, 2), IncrementalPrior(prior, 2)
    prime = image[:, :3]
    mix = lambda c, f: f + scale * (c - f)
    assert_close(guided.prefill(text, prime), mix(cond.prefill(text, prime), free.prefill(null.expand(2, -1), prime)))
    for g in range(3, 7):
        g_t = torch.tensor(g - 1)
        token = image[:, g - 1]
        want = mix(cond.step(token, g_t), free.step(token, g_t))
        assert_close(guided.step(token, g_t), want, f"guided step {g}")


def test_guided_sampling_needs_the_null_caption_and_scale_one_is_unguided():
    prior = make_prior(["row", "conv"], dtype=torch.float32)
    cfg = prior.config
    text, _ = tokens_for(cfg, batch=2)
    run = lambda config, **kw: sample_image_tokens(prior, text, config=config,
                                                   generator=torch.Generator().manual_seed(3), **kw)
    with pytest.raises(ValueError, match="null_text"):
        run(SamplingConfig(cond_scale=3.0))
    with pytest.raises(ValueError, match="shape"):
        run(SamplingConfig(cond_scale=3.0), null_text=null_text_for(cfg)[:-1])
    plain = run(SamplingConfig())
    assert torch.equal(run(SamplingConfig(cond_scale=1.0), null_text=null_text_for(cfg)), plain)
    guided = run(SamplingConfig(cond_scale=3.0), null_text=null_text_for(cfg))
    assert guided.shape == plain.shape and torch.equal(guided, run(SamplingConfig(cond_scale=3.0),
                                                                    null_text=null_text_for(cfg)))


@requires_cuda
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cuda_graph_sampling_equals_the_eager_loop(cond_scale):
    prior = make_prior(["row", "column", "conv", "causal"], dtype=torch.float32, device="cuda")
    cfg = prior.config
    text, image = tokens_for(cfg, batch=3, device="cuda")
    null = null_text_for(cfg).cuda()
    run = lambda graph: sample_image_tokens(
        prior, text, prime=image[:, :2], config=SamplingConfig(cuda_graph=graph, cond_scale=cond_scale),
        generator=torch.Generator(device="cuda").manual_seed(11), null_text=null)
    assert torch.equal(run(True), run(False))


@requires_cuda
def test_cuda_graph_batches_in_a_row_draw_fresh_noise_as_the_eager_loop():
    # generate --batch samples batch after batch from one generator: a replayed graph must read the
    # generator's advanced offset, not the one it was captured with
    prior = make_prior(["row", "column", "conv", "causal"], dtype=torch.float32, device="cuda")
    text, _ = tokens_for(prior.config, batch=2, device="cuda")

    def two_batches(graph):
        generator = torch.Generator(device="cuda").manual_seed(5)
        config = SamplingConfig(cuda_graph=graph)
        return [sample_image_tokens(prior, text, config=config, generator=generator) for _ in range(2)]

    graph, eager = two_batches(True), two_batches(False)
    assert not torch.equal(graph[0], graph[1])
    assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_gives_the_eager_logits(device):
    torch._dynamo.reset()
    prior = make_prior(["row", "column", "conv"], dtype=torch.float32, device=device)
    cfg = prior.config
    text, image = tokens_for(cfg, device=device)
    eager, compiled = IncrementalPrior(prior, batch=2), IncrementalPrior(prior, batch=2, compile_step=True)
    assert_close(compiled.prefill(text), eager.prefill(text), "prefill")
    for g in range(4):  # one compilation: g is a device tensor, the step's shapes never change
        position = torch.tensor(g, device=device)
        torch.testing.assert_close(compiled.step(image[:, g], position), eager.step(image[:, g], position),
                                   atol=1e-5, rtol=1e-5, msg=lambda m: f"step {g}: {m}")
    for got, want in zip(compiled.cache, eager.cache):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@requires_cuda
def test_compiled_step_replays_in_the_cuda_graph():
    torch._dynamo.reset()
    prior = make_prior(["row", "column", "conv", "causal"], dtype=torch.float32, device="cuda")
    cfg = prior.config
    text, _ = tokens_for(cfg, batch=3, device="cuda")
    run = lambda compile_step, graph: sample_image_tokens(
        prior, text, config=SamplingConfig(cuda_graph=graph, compile_step=compile_step),
        generator=torch.Generator(device="cuda").manual_seed(11))
    tokens = run(True, True)
    assert tokens.shape == (3, cfg.image_len) and 0 <= tokens.min() and tokens.max() < cfg.image_vocab
    # the same draws as the eager loop, but for near-ties that fused rounding may flip
    assert (tokens == run(False, True)).float().mean() > 0.9


def test_compiled_guided_sampling_draws_the_eager_tokens():
    torch._dynamo.reset()
    prior = make_prior(["row", "conv"])  # float64: no near-tie can flip between the two
    cfg = prior.config
    text, image = tokens_for(cfg, batch=2)
    null = null_text_for(cfg)
    run = lambda compile_step: sample_image_tokens(
        prior, text, prime=image[:, :3], config=SamplingConfig(cond_scale=3.0, compile_step=compile_step),
        generator=torch.Generator().manual_seed(5), null_text=null)
    assert torch.equal(run(True), run(False))


def randomise_parameters(prior, seed=0):
    """GPT-2's initialisation zeroes every bias, makes the layer norms the identity and keeps the
    GELU's inputs near 0: a step that dropped a bias or a norm's affine part gave the same logits,
    one without the GELU nearly so. Here the linear layers' outputs are of unit scale (weights
    N(0, 0.25 / fan_in)), biases and the norms' offsets N(0, 0.04), the norms' scales 1 + N(0, 0.04)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda t, std: std * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for module in prior.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(randn(module.weight, 0.5 / module.weight.shape[1] ** 0.5))
                if module.bias is not None:
                    module.bias.copy_(randn(module.bias, 0.2))
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + randn(module.weight, 0.2))
                module.bias.copy_(randn(module.bias, 0.2))
    return prior


def step_logits(prior, text, image, steps=6):
    """The logits of IncrementalPrior's first `steps` image steps after the text, [steps, B, V]."""
    inc = IncrementalPrior(prior, batch=text.shape[0])
    inc.prefill(text)
    return torch.stack([inc.step(image[:, g], torch.tensor(g, device=text.device)) for g in range(steps)])


def assert_skinny_steps_within_reference_error(prior, text, image, what=""):
    """The steps of a float16 / bfloat16 prior with skinny_linear's kernel (CUDA) against float64 by
    the flash-attention rule: within twice the error of the same steps with F.linear and the
    epilogue in PyTorch (cuBLAS) in the prior's dtype, plus a floor."""
    with linear.skinny_linear_kernel(True):
        ours = step_logits(prior, text, image)
    with linear.skinny_linear_kernel(False):
        low = step_logits(prior, text, image)
        exact = step_logits(copy.deepcopy(prior).to("cpu", torch.float64), text.cpu(), image.cpu())
    assert_within_reference_error(ours, low, exact, what)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_step_with_skinny_linear_matches_the_cublas_step(dtype):
    # d_model 32 and 16 image codes: every linear layer of the step, the head included, is one the
    # skinny_linear kernel takes. (The compiled step is checked against the eager one by
    # bench_sampling's ours_compiled.)
    prior = randomise_parameters(
        make_prior(["row", "column", "conv", "causal"], dtype=dtype, device="cuda", image_vocab=16))
    cfg = prior.config
    text, image = tokens_for(cfg, batch=3, device="cuda")
    block = prior.blocks[0]
    x = torch.zeros(3, 1, cfg.d_model, device="cuda", dtype=dtype)
    assert linear._kernel_takes(x.view(3, -1), block.attn.qkv.weight, block.attn.qkv.bias, None)
    assert linear._kernel_takes(torch.zeros(3, 4 * cfg.d_model, device="cuda", dtype=dtype), block.mlp[2].weight,
                                block.mlp[2].bias, x.view(3, -1))
    assert linear._kernel_takes(x[:, 0], prior.image_head.weight, prior.image_head.bias, None, prior.ln_f)
    # The kernel rounds once per layer output, F.linear / GELU / add each round: its error against
    # float64 is at most the cuBLAS step's (twice it, plus a floor, allowed).
    assert_skinny_steps_within_reference_error(prior, text, image, f"{dtype}")


def _drop_bias(x, weight, bias=None, residual=None, activation=None, norm=None):
    return _skinny_linear(x, weight, None, residual, activation, norm)


def _drop_gelu(x, weight, bias=None, residual=None, activation=None, norm=None):
    return _skinny_linear(x, weight, bias, residual, None, norm)


def _drop_norm_affine(x, weight, bias=None, residual=None, activation=None, norm=None):
    plain = None if norm is None else torch.nn.LayerNorm(norm.normalized_shape, norm.eps, elementwise_affine=False)
    return _skinny_linear(x, weight, bias, residual, activation, plain)


_skinny_linear = linear.skinny_linear
_sparse_decode = decode.sparse_decode


@pytest.mark.filterwarnings("ignore:.*falls back to the dense PyTorch reference")
@pytest.mark.parametrize("broken", [_drop_bias, _drop_gelu, _drop_norm_affine])
def test_skinny_step_check_rejects_a_step_that_drops_part_of_a_layer(broken, monkeypatch):
    """The CUDA test's check, on the CPU in bfloat16 with a broken skinny_linear standing in for the
    kernel (where the kernel is enabled): a step without the biases, the GELU or the norms' affine
    part fails it (the zero-bias model and atol = 0.1 passed all three); the intact one passes."""
    prior = randomise_parameters(
        make_prior(["row", "column", "conv", "causal"], dtype=torch.bfloat16, image_vocab=16))
    text, image = tokens_for(prior.config, batch=3)
    assert_skinny_steps_within_reference_error(prior, text, image, "intact")
    # the step's per-call path (the CPU kernel takes no bfloat16)
    monkeypatch.setattr(linear, "skinny_linear",
                        lambda *args, **kwargs: (broken if linear.kernel_enabled() else _skinny_linear)(*args, **kwargs))
    with pytest.raises(AssertionError, match="> bound"):
        assert_skinny_steps_within_reference_error(prior, text, image, broken.__name__)


def test_cpu_step_calls_the_kernel_itself_and_reads_the_switches_at_every_step(monkeypatch):
    """The step decides once whether its linear layers take the kernel (their arguments were
    checked when the cache was made): then it runs the op itself, without ops.skinny_linear's
    per-call checks, for the same bits. The switch and the backend are read at every step."""
    prior = randomise_parameters(make_prior(["row", "column", "conv"], dtype=torch.float32, image_vocab=16))
    text, image = tokens_for(prior.config, batch=3)
    calls = []
    monkeypatch.setattr(linear, "skinny_linear", lambda *a, **k: calls.append(1) or _skinny_linear(*a, **k))
    inc = IncrementalPrior(prior, batch=3)
    inc.prefill(text)
    layers = len(inc.step_linears)
    assert layers == 4 * 3 + 1 and all(layer.fits for layer in inc.step_linears)
    token, g = image[:, 0], torch.tensor(0)  # a step again at the same g and token writes the same cache row
    direct = inc.step(token, g)
    assert calls == []
    with linear.skinny_linear_kernel(False):  # ops.skinny_linear at each call, which runs the reference
        off = inc.step(token, g)
    assert len(calls) == layers
    torch.testing.assert_close(off, direct, rtol=1e-5, atol=1e-5)
    calls.clear()
    with ops.backend("reference"):
        inc.step(token, g)
    assert len(calls) == layers
    calls.clear()
    monkeypatch.setattr(linear, "step_takes_kernel", lambda x, layers: False)
    assert torch.equal(inc.step(token, g), direct) and len(calls) == layers  # the kernel per call: the same bits


@pytest.mark.filterwarnings("ignore:.*falls back to the dense PyTorch reference")
def test_cpu_step_attends_with_the_kernel_itself_and_reads_the_switches_at_every_step(monkeypatch):
    """As for the linear layers: the step decides once whether its attention calls run the fused
    decode kernel directly (each layer's caches were checked when they were made), for the bits
    ops.sparse_decode gives; the switch, the backend and autograd are read at every step."""
    prior = randomise_parameters(make_prior(["row", "column", "conv"], dtype=torch.float32, image_vocab=16))
    text, image = tokens_for(prior.config, batch=3)
    calls = []
    # the step's calls, which write the cache (not sparse_decode's own call after index_copy_)
    monkeypatch.setattr(decode, "sparse_decode",
                        lambda *a, **k: (k.get("k_new") is not None and calls.append(1)) or _sparse_decode(*a, **k))
    inc = IncrementalPrior(prior, batch=3)
    inc.prefill(text)
    layers = len(prior.blocks)
    assert len(inc.decoders) == layers and all(layer.fits for layer in inc.decoders)
    token, g = image[:, 0], torch.tensor(0)  # a step again at the same g and token writes the same cache row
    direct = inc.step(token, g)
    assert calls == []
    for off in (decode.fused_cache_write(False), ops.backend("reference")):
        with off:  # ops.sparse_decode at each call: index_copy_, then the kernel, or the reference
            torch.testing.assert_close(inc.step(token, g), direct, rtol=1e-5, atol=1e-5)
        assert len(calls) == layers
        calls.clear()
    weight, x = prior.blocks[1].attn.qkv.weight, inc.cache[0][0]
    assert any(t is weight for t in inc.step_tensors)
    prior.requires_grad_(False)
    with torch.enable_grad():  # keys computed from a parameter that requires grad: no direct kernel
        assert decode.step_takes_kernel(x, inc.decoders, inc.step_tensors)
        weight.requires_grad_(True)
        assert not decode.step_takes_kernel(x, inc.decoders, inc.step_tensors)
    monkeypatch.setattr(decode, "step_takes_kernel", lambda x, layers, sources: False)
    assert torch.equal(inc.step(token, g), direct) and len(calls) == layers  # the kernel per call: the same bits
