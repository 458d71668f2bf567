"""Stage 1 of DALL-E: the discrete VAE (SPEC section 3).

The encoder turns an image into a grid of logits over `vocab` codes; the decoder turns a grid of
one-hot (or relaxed) codes back into the parameters of a logit-Laplace distribution per RGB
channel. Training feeds the decoder a soft Gumbel-softmax sample of the logits (our fused op,
which also returns the KL term); stage 2 uses the argmax tokens.

The layout follows OpenAI's released dVAE (github.com/openai/DALL-E, dall_e/encoder.py and
decoder.py) module for module, with the same submodule names (`blocks.group_1.block_1.res_path.
conv_1`, ...), so the `paper` preset has the same parameter counts and OpenAI's weights load
after `convert_openai_state_dict` (their convs name their parameters `w`/`b`, ours are
nn.Conv2d's `weight`/`bias`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import gumbel_softmax_kl

LOGIT_LAPLACE_EPS = 0.1
_HUE_FLOOR = 0.01  # FactoredEncoder: a black window's hue is 0, one 5% covered keeps 83% of its colour


# -----------------------------------------------------------------------------
# config


@dataclass
class DVAEConfig:
    image_size: int = 256  # H = W of the input images, pixels
    n_hid: int = 256  # width of the first group; group g has n_hid * 2**g channels
    groups: int = 4  # G: 2**(G-1) downsampling between image and grid
    blocks_per_group: int = 2  # B: residual blocks in each group
    vocab: int = 8192  # codebook size
    n_init: int = 128  # decoder width after the codebook conv (the code embedding size)
    in_channels: int = 3  # RGB
    logit_laplace_eps: float = LOGIT_LAPLACE_EPS  # pixels are mapped into (eps, 1 - eps)
    dequantize: bool = True  # likelihood of 8-bit pixels spread over their quantisation step
    # > 0: a code is a pair (colour c, shape g), id = c * (vocab // colour_codes) + g, from two
    # encoders that meet only in the logits (see FactoredEncoder); 0: one code from one encoder.
    colour_codes: int = 0

    def __post_init__(self):
        for name in ("image_size", "n_hid", "groups", "blocks_per_group", "vocab", "n_init", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DVAEConfig.{name} must be a positive int, got {value!r}")
        if self.n_hid % 4:
            raise ValueError(f"DVAEConfig.n_hid must be a multiple of 4 (blocks use n_out / 4 channels), "
                             f"got {self.n_hid}")
        if self.image_size % self.downsample:
            raise ValueError(f"DVAEConfig.image_size {self.image_size} must be divisible by 2**(groups-1) = "
                             f"{self.downsample} (groups={self.groups})")
        if isinstance(self.colour_codes, bool) or not isinstance(self.colour_codes, int) or self.colour_codes < 0:
            raise ValueError(f"DVAEConfig.colour_codes must be an int >= 0, got {self.colour_codes!r}")
        if self.colour_codes and (self.vocab % self.colour_codes or self.vocab == self.colour_codes):
            raise ValueError(f"DVAEConfig.vocab {self.vocab} must be a multiple (> 1x) of colour_codes "
                             f"{self.colour_codes}")
        if not 0.0 < self.logit_laplace_eps < 0.5:  # 0: a pixel of exactly 0 or 1 has no finite likelihood
            raise ValueError(f"DVAEConfig.logit_laplace_eps must be in (0, 0.5), got {self.logit_laplace_eps!r}")

    @property
    def downsample(self) -> int:
        return 2 ** (self.groups - 1)

    @property
    def grid(self) -> int:
        """S: the token grid is S x S."""
        return self.image_size // self.downsample

    @property
    def shape_codes(self) -> int:
        """Codes of the shape factor (all of vocab when the codes are not factored)."""
        return self.vocab // self.colour_codes if self.colour_codes else self.vocab

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of the encoder's groups (the decoder's, reversed)."""
        return tuple(self.n_hid * 2**g for g in range(self.groups))

    @classmethod
    def preset(cls, name: str, **overrides) -> "DVAEConfig":
        """A named configuration; keyword overrides replace its fields (e.g. image_size=32)."""
        if name not in PRESETS:
            raise ValueError(f"unknown dVAE preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, DVAEConfig] = {
    # OpenAI's released dVAE: 256 px -> 32x32 tokens of 8192 codes; encoder 53.8M, decoder 43.8M
    # parameters. Needs GPUs to train.
    "paper": DVAEConfig(image_size=256, n_hid=256, groups=4, blocks_per_group=2, vocab=8192, n_init=128),
    # CPU work on 64 px images (the shapes dataset): 16x16 tokens of 512 codes (G=3: 4x
    # downsampling). Encoder 0.21M, decoder 0.21M parameters; a batch of 32 trains (forward +
    # backward) in about 0.65 s on 2 CPU cores.
    "small": DVAEConfig(image_size=64, n_hid=32, groups=3, blocks_per_group=2, vocab=512, n_init=64),
    # 48 px -> 24x24 tokens of 512 codes (G=2: 2x downsampling). A token covers 2x2 pixels, so a
    # code is little more than a colour and how much of the patch it covers, the same for every
    # shape: on the shapes set its reconstructions keep held-out colour/shape pairs as well as seen
    # ones (detector 0.94 vs 0.95 after 2000 steps; `small`: 0.65 vs 0.95). A prior over its
    # 576-token grids did not generalise better, though (README, Results). Encoder 0.07M, decoder
    # 0.07M parameters.
    "fine": DVAEConfig(image_size=48, n_hid=32, groups=2, blocks_per_group=2, vocab=512, n_init=64),
    # Quick experiments and tests: 64 px -> 8x8 tokens of 256 codes (G=4, one block per group, so
    # a prior over it has 64 image tokens). Encoder 0.10M, decoder 0.10M parameters; a batch of
    # 32 trains in about 0.2 s on 2 CPU cores.
    "tiny": DVAEConfig(image_size=64, n_hid=16, groups=4, blocks_per_group=1, vocab=256, n_init=32),
}


# -----------------------------------------------------------------------------
# model


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)


class _FullPrecisionConv(nn.Conv2d):
    """A 1x1 conv that autocast leaves in its weights' precision (float32 in mixed-precision
    training): the encoder's logits and the decoder's mu and ln b. In bf16 the likelihood's
    parameters came out on a grid 2**-6 apart at |mu| ~ 2, against a scale b ~ 0.01: under CPU bf16
    autocast the bundled dVAE's NLL per subpixel was -4.442 against float32's -4.578, and is -4.508
    with these convs in float32 (32 test images; the rest of the gap is the bf16 features)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2  # keeps the residual stream's scale at init
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _conv(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _conv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _conv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _conv(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _conv(n_in, n_hid, 1)),
            ("relu_2", nn.ReLU()), ("conv_2", _conv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _conv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _conv(n_hid, n_out, 3)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """Mapped pixels (B, C, H, W) -> logits (B, vocab, S, S)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        G, B, widths = config.groups, config.blocks_per_group, config.widths
        layers = [("input", _conv(config.in_channels, widths[0], 7))]
        n_in = widths[0]
        for g, width in enumerate(widths):
            group = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else width, width, G * B)) for i in range(B)]
            if g < G - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            n_in = width
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _FullPrecisionConv(widths[-1], config.vocab))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"encoder input must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"encoder input must be a floating tensor, got {x.dtype}")
        return self.blocks(x)  # (B, vocab, H / 2**(G-1), W / 2**(G-1))

    def output_convs(self) -> list[nn.Conv2d]:
        """The convs that produce the logits (training scales them at initialisation)."""
        return [self.blocks.output.conv]


class FactoredEncoder(nn.Module):
    """Mapped pixels (B, 3, H, W) -> logits (B, vocab, S, S) of factored codes (colour c, shape g):
    logit(c, g) = colour_logit(c) + shape_logit(g), so the two are independent given the image.

    - shape: the conv encoder over the brightness max(r, g, b) alone, so a shape code cannot
      tell a red edge from a green one;
    - colour: a palette over the hue around each grid cell (the mean colour over the mean
      brightness of the cell and its 8 neighbours), which shows neither the shape nor how much
      of the cell is covered. Colour logit k is -scale * |hue - palette_k|^2 up to a term that
      is the same for every k, which is a 1x1 conv over the hue; `fit_palette` starts it at the
      k-means of the data's hues, so that every colour has its own code from the first step.
      (An MLP head learned from random init left green between the yellow and the cyan code on
      shapes: nothing pulls a colour onto a code of its own once a neighbour's code reads it.)

    The decoder's codebook is factored the same way (FactoredCodebook): a code's embedding is
    its colour's plus its shape's. A prior over such codes can then draw a colour never seen with
    a shape in training with codes it has seen, each factor with another partner."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.shape = Encoder(dataclasses.replace(config, in_channels=1, vocab=config.shape_codes, colour_codes=0))
        # Over the cell and its 8 neighbours: the colour code tells which colour is near, not
        # which cells are covered (a coverage map of the cells would be a coarse shape), so the
        # geometry is the shape codes' alone.
        d = config.downsample
        self.pool = nn.AvgPool2d(3 * d, stride=d, padding=d, count_include_pad=False)
        self.colour = _FullPrecisionConv(config.in_channels, config.colour_codes)

    def hues(self, x: torch.Tensor) -> torch.Tensor:
        """Mapped pixels (B, C, H, W) -> the hue around each grid cell (B, C, S, S): the mean
        colour over the mean brightness, whatever share of the window is covered."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"encoder input must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        eps = c.logit_laplace_eps
        rgb = ((x - eps) / (1 - 2 * eps)).clamp(0, 1)
        return self.pool(rgb) / (self.pool(rgb.amax(1, keepdim=True)) + _HUE_FLOOR)

    @torch.no_grad()
    def fit_palette(self, x: torch.Tensor, scale: float, iters: int = 20) -> torch.Tensor:
        """Start the colour codes at the k-means palette of the hues of mapped pixels x, colour
        logit k = -scale * |hue - palette_k|^2 (+ a term equal for every k); returns the palette
        (Kc, C)."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        hues = self.hues(x.float()).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        palette = kmeans(hues, self.config.colour_codes, iters)
        weight = self.colour.weight
        weight.copy_((2 * scale * palette).reshape(weight.shape).to(weight.dtype))
        self.colour.bias.copy_((-scale * palette.pow(2).sum(1)).to(weight.dtype))
        return palette

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mapped pixels -> (colour logits (B, Kc, S, S), shape logits (B, Kg, S, S))."""
        colour = self.colour(self.hues(x))  # (B, Kc, S, S); checks x
        return colour, self.shape(x.amax(1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour, shape = self.factors(x)
        return joint_codes(colour, shape)

    def output_convs(self) -> list[nn.Conv2d]:
        return self.shape.output_convs() + [self.colour]


def kmeans(points: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means of points (N, D) -> centres (k, D), deterministic: the first centre is the
    point nearest the coordinate-wise median, each next one the point farthest from those chosen
    (so rare but distinct points, a colour that covers 1% of the cells, get a centre of their
    own), then `iters` Lloyd steps; a centre left without points stays where it is."""
    if points.dim() != 2 or points.shape[0] < 1 or k < 1:
        raise ValueError(f"kmeans needs points (N >= 1, D) and k >= 1, got {tuple(points.shape)} and k={k}")
    points = points.float()
    first = (points - points.median(0).values).pow(2).sum(1).argmin()
    centres = [points[first]]
    dist = (points - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        centres.append(points[dist.argmax()])
        dist = torch.minimum(dist, (points - centres[-1]).pow(2).sum(1))
    centres = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres


def joint_codes(colour: torch.Tensor, shape: torch.Tensor, product: bool = False) -> torch.Tensor:
    """(B, Kc, S, S) and (B, Kg, S, S) -> (B, Kc * Kg, S, S), code c * Kg + g: their sum (logits)
    or with `product` their product (probabilities, relaxed one-hots)."""
    b, _, h, w = shape.shape
    joint = colour[:, :, None] * shape[:, None] if product else colour[:, :, None] + shape[:, None]
    return joint.reshape(b, -1, h, w)


class FactoredCodebook(nn.Module):
    """The decoder's first layer for factored codes: a 1x1 conv from (B, vocab, S, S) codes whose
    weight column for code (c, g) is colour[:, c] + shape[:, g]."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.colour = _conv(config.colour_codes, config.n_init, 1)
        self.shape = _conv(config.shape_codes, config.n_init, 1)

    @property
    def weight(self) -> torch.Tensor:
        """(n_init, vocab, 1, 1), as nn.Conv2d's."""
        w = self.colour.weight[:, :, None, 0, 0] + self.shape.weight[:, None, :, 0, 0]  # (n, Kc, Kg)
        return w.reshape(w.shape[0], -1, 1, 1)

    @property
    def bias(self) -> torch.Tensor:
        return self.colour.bias + self.shape.bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, self.weight, self.bias)


class Decoder(nn.Module):
    """Codes (B, vocab, S, S), one-hot or relaxed -> (B, 2C, H, W): mu and ln b per channel."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        G, B, widths = config.groups, config.blocks_per_group, config.widths[::-1]
        codebook = FactoredCodebook(config) if config.colour_codes else _conv(config.vocab, config.n_init, 1)
        layers = [("input", codebook)]
        n_in = config.n_init
        for g, width in enumerate(widths):
            group = [(f"block_{i + 1}", DecoderBlock(n_in if i == 0 else width, width, G * B)) for i in range(B)]
            if g < G - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
            n_in = width
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", _FullPrecisionConv(widths[-1], 2 * config.in_channels))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if z.dim() != 4 or z.shape[1] != c.vocab:
            raise ValueError(f"decoder input must be (B, {c.vocab}, S, S) codes, got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"decoder input must be a floating tensor (one-hot or relaxed codes), got {z.dtype}")
        return self.blocks(z)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same as forward(one_hot(tokens)), reading the codebook conv's columns instead of
        multiplying a (B, vocab, S, S) one-hot tensor."""
        conv = self.blocks.input
        h = F.embedding(tokens, conv.weight[:, :, 0, 0].t()) + conv.bias  # (B, S, S, n_init)
        h = h.permute(0, 3, 1, 2)  # (B, n_init, S, S)
        return self.blocks[1:](h)


class DVAE(nn.Module):
    def __init__(self, config: DVAEConfig):
        super().__init__()
        if not isinstance(config, DVAEConfig):
            raise TypeError(f"config must be a DVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = FactoredEncoder(config) if config.colour_codes else Encoder(config)
        self.decoder = Decoder(config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # OpenAI's init: N(0, 1 / fan_in) weights, zero biases.
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            nn.init.normal_(module.weight, std=1 / math.sqrt(fan_in))
            nn.init.zeros_(module.bias)

    # -- input checks ----------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating tensor with values in [0, 1], got {images.dtype}")
        lo, hi = torch.stack(torch.aminmax(images)).tolist()  # one host sync
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"images must have values in [0, 1], got min {lo} and max {hi}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        c = self.config
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (c.grid, c.grid):
            raise ValueError(f"tokens must have shape (B, {c.grid}, {c.grid}), got {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError("tokens is an empty batch")
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
        if lo < 0 or hi >= c.vocab:
            raise ValueError(f"tokens must be in [0, {c.vocab}), got min {lo} and max {hi}")

    # -- inference ---------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> tokens (B, S, S), int64: argmax of the logits, no noise."""
        self._check_images(images)
        x = map_pixels(images, self.config.logit_laplace_eps).to(self._dtype)
        return self.encoder(x).argmax(dim=1)  # (B, S, S)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, S, S) -> images (B, 3, H, W) in [0, 1]: the decoder's mean, unmapped.

        Follows the grad mode; wrap in torch.no_grad() / inference_mode() for sampling."""
        self._check_tokens(tokens)
        out = self.decoder.forward_tokens(tokens.long())  # (B, 6, H, W)
        return self._unmap_mean(out)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """decode(encode(images)) without gradients."""
        with torch.no_grad():
            return self.decode(self.encode(images))

    def _unmap_mean(self, out: torch.Tensor) -> torch.Tensor:
        mu = out[:, : self.config.in_channels].to(_compute_dtype(out.dtype))
        return unmap_pixels(torch.sigmoid(mu), self.config.logit_laplace_eps)

    @property
    def _dtype(self) -> torch.dtype:
        return self.encoder.output_convs()[0].weight.dtype

    # -- training ----------------------------------------------------------------

    def forward(self, images: torch.Tensor, tau: float, beta: float,
                generator: torch.Generator | None = None, usage: float = 0.0, mse: float = 0.0) -> dict[str, torch.Tensor]:
        """The loss dict (see `loss`): forward is what DistributedDataParallel wraps, so a
        training loop calls `ddp_model(images, tau, beta)` to get its gradients all-reduced."""
        return self.loss(images, tau, beta, generator, usage, mse)

    def loss(self, images: torch.Tensor, tau: float, beta: float,
             generator: torch.Generator | None = None, usage: float = 0.0, mse: float = 0.0) -> dict[str, torch.Tensor]:
        """The training objective on images (B, 3, H, W) in [0, 1] (SPEC section 3).

        Per image, divided by its pixel count P = 3 * H * W (every channel of every pixel is one
        logit-Laplace variable, so `nll` is nats per subpixel):
            loss_i = (-log LogitLaplace(x'_i | mu, b) summed over pixels and channels
                      + beta * KL(softmax(logits) || uniform) summed over grid positions) / P
        plus, when `usage` > 0 (not in the paper), `usage * KL(mean softmax || uniform)`: the
        batch's average code distribution pulled towards uniform. The per-position KL does not
        stop codebook collapse (every position can pick the same few codes); on small data the
        dVAE otherwise settles on a handful of codes and merges colours.
        `loss` is the batch mean of loss_i and carries gradients to encoder and decoder (the
        decoder sees the soft Gumbel-softmax sample at temperature tau; the KL uses the plain
        softmax). Returned, all but `loss` detached:
            loss    scalar, the objective
            nll     scalar, batch mean of NLL_i / P
            kl      scalar, batch mean of KL_i / P, NOT multiplied by beta (so runs compare
                    across the beta schedule); loss = nll + beta * kl (+ usage * usage_kl)
            usage_kl scalar, KL(batch-mean softmax || uniform) in nats (0: every code equally used);
                    of the shape codes alone when the codes are factored
            recon   (B, 3, H, W) in [0, 1], the decoder mean of the relaxed sample
            logits  (B, vocab, S, S) encoder logits
            tokens  (B, S, S) their argmax, for codebook usage
        """
        self._check_images(images)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        for name, value in (("beta", beta), ("usage", usage), ("mse", mse)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        eps = self.config.logit_laplace_eps
        images = images.to(_compute_dtype(self._dtype))
        x = map_pixels(images, eps)  # (B, 3, H, W) in (eps, 1 - eps)
        if self.config.colour_codes:
            # Each factor draws its own relaxed sample; the factors are independent, so the KL to
            # the uniform joint is the sum of theirs.
            colour, shape = self.encoder.factors(x.to(self._dtype))
            logits = joint_codes(colour, shape)
            zc, klc = gumbel_softmax_kl(colour, tau, dim=1, generator=generator)
            zs, kls = gumbel_softmax_kl(shape, tau, dim=1, generator=generator)
            z, kl = joint_codes(zc, zs, product=True), klc + kls
        else:
            logits = self.encoder(x.to(self._dtype))  # (B, vocab, S, S)
            z, kl = gumbel_softmax_kl(logits, tau, dim=1, generator=generator)  # (B, vocab, S, S), (B, S, S)
        out = self.decoder(z)  # (B, 6, H, W)
        if self.config.dequantize:
            # The likelihood is of a continuous variable; 8-bit images are not. Spread each value
            # uniformly over its quantisation step, else exactly flat regions (synthetic data,
            # black backgrounds) reward shrinking the scale b without bound and the decoder
            # learns the background instead of the objects.
            u = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            x = map_pixels(((images * 255.0).round() + u) / 256.0, eps)
        pixels = images[0].numel()
        nll = logit_laplace_nll(x, out) / pixels  # (B,)
        kl = kl.to(nll.dtype).sum(dim=(1, 2)) / pixels  # (B,)
        loss = (nll + beta * kl).mean()
        # With factored codes only the shape codes' usage: pulling the colour codes' towards
        # uniform spreads the background (most cells) over all of them, which levels the palette's
        # biases and leaves a colour between two others (green between yellow and cyan) without a
        # code of its own.
        usage_logits = shape if self.config.colour_codes else logits
        mean_probs = usage_logits.float().softmax(dim=1).mean(dim=(0, 2, 3))  # (codes,)
        # sum p log(p V), not log V + sum p log p: the latter cancels two numbers near log V and
        # kept ~1e-5 of a small KL's value in float32
        usage_kl = (mean_probs * (mean_probs * mean_probs.numel()).clamp_min(1e-30).log()).sum()
        if usage > 0:
            loss = loss + usage * usage_kl
        # Squared error of the decoder mean in pixel units, unclamped so that saturated wrong
        # colours still get a gradient.
        mean = torch.sigmoid(out[:, : self.config.in_channels].to(images.dtype))
        mse_value = ((mean - map_pixels(images, eps)) / (1 - 2 * eps)).pow(2).mean()
        if mse > 0:
            loss = loss + mse * mse_value
        return {
            "loss": loss,
            "nll": nll.detach().mean(),
            "kl": kl.detach().mean(),
            "usage_kl": usage_kl.detach(),
            "mse": mse_value.detach(),
            "recon": unmap_pixels(mean.detach(), eps),
            "logits": logits.detach(),
            "tokens": logits.detach().argmax(dim=1),
        }


# -----------------------------------------------------------------------------
# the pixel mapping and the logit-Laplace likelihood


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], so the logit-Laplace density never sees 0 or 1."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """The inverse of map_pixels, clamped into [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_nll(x: torch.Tensor, decoder_out: torch.Tensor) -> torch.Tensor:
    """-log f(x | mu, b) summed over channels and pixels, per image: (B,), float32 or wider.

    x: mapped pixels (B, C, H, W) in (0, 1); decoder_out: (B, 2C, H, W), mu then ln b. The
    logit-Laplace density on (0, 1) (Ramesh et al. 2021, appendix A.3) is
        f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)).
    """
    if x.dim() != 4 or decoder_out.dim() != 4:
        raise ValueError(f"x and decoder_out must be 4-D, got {tuple(x.shape)} and {tuple(decoder_out.shape)}")
    B, C, H, W = x.shape
    if tuple(decoder_out.shape) != (B, 2 * C, H, W):
        raise ValueError(f"decoder_out must have shape {(B, 2 * C, H, W)} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(decoder_out.shape)}")
    dtype = _compute_dtype(torch.promote_types(x.dtype, decoder_out.dtype))
    x = x.to(dtype)
    mu, log_b = decoder_out.to(dtype).chunk(2, dim=1)  # (B, C, H, W) each
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (logit_x - mu).abs() * torch.exp(-log_b)
    return nll.sum(dim=(1, 2, 3))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Likelihoods in float32 at least: bf16/fp16 activations lose too much in log and sum."""
    return torch.promote_types(dtype, torch.float32)


# -----------------------------------------------------------------------------
# metrics and helpers


PSNR_MSE_FLOOR = 1e-10  # 100 dB


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's PSNR in dB, images (B, C, H, W) in [0, 1]
    (100 dB at most: identical images would give inf, which training reads as divergence)."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"psnr needs two (B, C, H, W) batches of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    mse = (a.float() - b.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (-10 * torch.log10(mse.clamp_min(PSNR_MSE_FLOOR))).mean()


def codebook_perplexity(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """exp(entropy of the code frequencies in `tokens`): from 1 (one code) to vocab (uniform)."""
    return counts_perplexity(code_counts(tokens, vocab))


def code_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each code occurs in `tokens`: float64 [vocab] (sums and means over processes pool them)."""
    if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty integer tensor, got {tokens.dtype} of shape "
                         f"{tuple(tokens.shape)}")
    flat = tokens.reshape(-1).long()
    lo, hi = torch.aminmax(flat)
    if lo.item() < 0 or hi.item() >= vocab:
        raise ValueError(f"tokens must be in [0, {vocab}), got min {lo.item()} and max {hi.item()}")
    return torch.bincount(flat, minlength=vocab).double()


def counts_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the frequencies `counts` (code_counts', or their sum or mean over processes)."""
    p = counts / counts.sum()
    entropy = -torch.special.xlogy(p, p).sum()
    return entropy.exp().float()


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def convert_openai_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the parameters of OpenAI's dall_e Encoder/Decoder (`.w`, `.b`) to ours
    (`.weight`, `.bias`); e.g. `encoder.load_state_dict(convert_openai_state_dict(
    torch.load("encoder.pkl").state_dict()))` with the `paper` preset."""
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith(".w"):
            key = key[:-2] + ".weight"
        elif key.endswith(".b"):
            key = key[:-2] + ".bias"
        renamed[key] = value
    return renamed
