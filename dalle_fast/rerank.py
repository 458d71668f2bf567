"""The reranker of DALL-E (SPEC.md section 6): a small CLIP-style contrastive text-image model.

Sampling draws many candidates per caption; the reranker scores each against the caption
(scaled cosine similarity of the two embeddings) and keeps the best. Texts come in the prior's
layout (`TextTokenizer.encode_batch`: BOS at 0, caption tokens, per-position pads), so the prior
and the reranker share one tokenizer.

- text: token + position embeddings, a bidirectional pre-LayerNorm transformer encoder, the
  feature at position 0 (BOS) after a final LayerNorm, a linear projection;
- image: a conv net of stride-2 stages down to a 4x4 map, flattened (not pooled, so that
  "left of" and "above" survive), then a linear projection; with `image_encoder="split"` the
  conv net sees brightness only and a per-pixel colour map joins it (SplitImageEncoder);
- both embeddings L2-normalised; a learnable logit scale (CLIP: init 1/0.07, at most 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .skeleton import without_random_init

_MAX_LOGIT_SCALE = math.log(100.0)
IMAGE_ENCODERS = ("joint", "split")


@dataclass
class RerankerConfig:
    image_size: int = 64  # a power of two >= 8: stride-2 stages go down to 4x4
    text_len: int = 32  # T, as in the prior's text stream
    text_vocab: int = 1024 + 32  # embedding rows: tokenizer.text_vocab_size(text_len)
    embed_dim: int = 128  # E, the joint embedding
    width: int = 128  # text transformer width
    text_layers: int = 4  # with 2, relations came about half as fast on shapes (see _init_text)
    heads: int = 4
    image_width: int = 32  # channels of the first conv; stages double it up to 4x
    # "joint": one conv net over RGB. "split": shape and colour apart (see SplitImageEncoder),
    # so that a colour and a shape never seen together still embed as that colour + that shape.
    image_encoder: str = "joint"
    colour_width: int = 16  # "split" only: per-pixel colour features

    def __post_init__(self):
        for name in ("image_size", "text_len", "text_vocab", "embed_dim", "width", "text_layers", "heads",
                     "image_width", "colour_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RerankerConfig.{name} must be a positive int, got {value!r}")
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ValueError(f"RerankerConfig.image_size must be a power of two >= 8, got {self.image_size}")
        if self.width % self.heads:
            raise ValueError(f"RerankerConfig.width {self.width} must be divisible by heads {self.heads}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"RerankerConfig.image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        if self.text_vocab <= self.text_len:
            raise ValueError(f"RerankerConfig.text_vocab {self.text_vocab} must exceed text_len {self.text_len} "
                             "(it is the BPE vocabulary plus one pad id per position)")

    def num_params(self) -> int:
        """Parameter count, from a model built on the meta device (nothing is allocated)."""
        with without_random_init("meta"):
            model = Reranker(self)
        return sum(p.numel() for p in model.parameters())


def _conv_stages(in_channels: int, cfg: RerankerConfig) -> tuple[nn.Sequential, int]:
    """[B, in_channels, H, W] -> [B, C * 4 * 4] (and that size): a stride-2 4x4 stem, then
    stride-2 stages down to 4x4. The shapes' objects are >= 19 px wide, so halving at once loses
    nothing, and on CPU it makes the net about 5x cheaper than a full-resolution stem."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, cfg.image_width, 4, stride=2, padding=1), nn.GELU()]
    channels, size = cfg.image_width, cfg.image_size // 2
    while size > 4:
        out = min(channels * 2, cfg.image_width * 4)
        # GroupNorm, not BatchNorm: a candidate's score must not depend on the other candidates.
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8 if out % 8 == 0 else 1, out),
                   nn.GELU()]
        channels, size = out, size // 2
    return nn.Sequential(*layers, nn.Flatten()), channels * 4 * 4


COLOUR_GRID = 8  # the split encoder's colour map: COLOUR_GRID x COLOUR_GRID cells


class SplitImageEncoder(nn.Module):
    """[B, 3, H, W] in [-1, 1] -> [B, F]: two streams that meet only in the final linear map.

    - shape: the conv stages over the brightness max(r, g, b) alone, so its features are the
      same for a red triangle and a green one;
    - colour: a per-pixel MLP over RGB (no spatial filter, so it cannot learn shapes), averaged
      over COLOUR_GRID x COLOUR_GRID cells: which colours lie where.

    The embedding is then (linear in) shape features + colour features, and binding a colour to
    a shape goes through location, which both maps keep. A joint net learns conjunctions
    instead: trained on shapes without red triangles, it read a red triangle as "a red circle"
    (see README)."""

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.shape, self.shape_size = _conv_stages(1, cfg)
        self.colour = nn.Sequential(nn.Conv2d(3, cfg.colour_width, 1), nn.GELU(),
                                    nn.Conv2d(cfg.colour_width, cfg.colour_width, 1), nn.GELU(),
                                    nn.AdaptiveAvgPool2d(COLOUR_GRID), nn.Flatten())
        self.size = self.shape_size + cfg.colour_width * COLOUR_GRID ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.shape(x.amax(1, keepdim=True)), self.colour(x)], dim=1)


def _image_encoder(cfg: RerankerConfig) -> tuple[nn.Module, int]:
    """The image net (see RerankerConfig.image_encoder) and its output size."""
    if cfg.image_encoder == "split":
        net = SplitImageEncoder(cfg)
        return net, net.size
    return _conv_stages(3, cfg)


class Reranker(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = cfg = config
        self.token_embed = nn.Embedding(cfg.text_vocab, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.text_len, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        # No padding mask: pads have their own per-position ids, which the encoder reads like words.
        self.text_encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(cfg.width)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.image_encoder, flat = _image_encoder(cfg)
        self.image_proj = nn.Linear(flat, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_text()

    @torch.no_grad()
    def _init_text(self) -> None:
        """Start the text encoder order-aware. The contrastive loss first learns which objects a
        caption names; with GPT-style small embeddings (0.02) and near-uniform attention the
        encoder then settles into a bag of words ("A left of B" == "B left of A"): on shapes,
        relation swaps stayed at chance for 1200 steps even with hard negatives. Unit-scale
        embeddings keep each token's identity in the residual stream, and sharper initial
        attention (queries and keys x4) gives each position its own context, so conjunctions
        such as "red, before 'above'" exist from step 0 for the image side to latch onto."""
        nn.init.normal_(self.token_embed.weight, std=1.0)
        nn.init.normal_(self.pos_embed, std=1.0)
        for layer in self.text_encoder.layers:
            layer.self_attn.in_proj_weight[: 2 * self.config.width] *= 4.0

    # -- inputs ------------------------------------------------------------------------------

    def _check_text(self, text_ids: torch.Tensor, name: str = "text_ids", values: bool = True) -> None:
        """dtype and shape, and (`values`) the ids' range: a host synchronisation."""
        T, V = self.config.text_len, self.config.text_vocab
        if not isinstance(text_ids, torch.Tensor) or text_ids.dtype != torch.long:
            raise TypeError(f"{name} must be an int64 tensor, got {getattr(text_ids, 'dtype', type(text_ids))}")
        if text_ids.dim() != 2 or text_ids.shape[1] != T:
            raise ValueError(f"{name} must have shape [B, {T}], got {tuple(text_ids.shape)}")
        if values and text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= V):
            raise ValueError(f"text ids must lie in [0, {V}), got [{int(text_ids.min())}, {int(text_ids.max())}]")

    def _check_images(self, images: torch.Tensor) -> None:
        S = self.config.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[2] < 1:
            raise ValueError(f"images must have shape [B, 3, {S}, {S}] (or another square size, resized to "
                             f"{S}), got {tuple(images.shape)}")
        if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # NaN fails too
            raise ValueError(f"images must lie in [0, 1], got [{float(images.min())}, {float(images.max())}]")

    # -- embeddings --------------------------------------------------------------------------

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """text_ids [B, T] int64 -> [B, E], unit norm."""
        self._check_text(text_ids)
        return self._text_features(text_ids)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, H] in [0, 1], any float dtype -> [B, E], unit norm. Images of another
        size than the config's are resized to it first (bilinear, antialiased), so a reranker can
        score the output of a dVAE that works at another resolution."""
        self._check_images(images)
        return self._image_features(images)

    def _text_features(self, text_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(text_ids) + self.pos_embed
        x = self.text_norm(self.text_encoder(x))[:, 0]
        return F.normalize(self.text_proj(x), dim=-1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        # in the weights' dtype: a float64 or half image met float32 weights with a bare RuntimeError
        images = images.to(self.logit_scale.dtype)
        S = self.config.image_size
        if images.shape[-1] != S:
            images = F.interpolate(images, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        x = self.image_encoder(images * 2 - 1)
        return F.normalize(self.image_proj(x), dim=-1)

    def _similarities(self, i: torch.Tensor, t: torch.Tensor, pairs: bool = False) -> torch.Tensor:
        """scale * i @ t^T ([B, K]), or of each image with its own text row (pairs: [B], t [1 or
        B, E]), in float32 whatever autocast says: near the scale's cap of 100, bf16 logits are
        only good to 0.25-0.5, which tied captions with their near-identical negatives."""
        with torch.autocast(i.device.type, enabled=False):
            i, t = i.float(), t.float()
            return self.scale().float() * ((i * t).sum(-1) if pairs else i @ t.T)

    def scale(self) -> torch.Tensor:
        """The logit scale exp(logit_scale), at most 100 as in CLIP: training caps the parameter
        itself after each step (`clamp_logit_scale_`), not the forward pass, whose clamp would zero
        the gradient above the cap and leave the parameter stuck there."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Cap the logit scale at 100 in place (train.reranker calls it after each optimizer step)."""
        self.logit_scale.clamp_(max=_MAX_LOGIT_SCALE)

    # -- training ----------------------------------------------------------------------------

    def loss(self, text_ids: torch.Tensor, images: torch.Tensor, negatives: Optional[torch.Tensor] = None,
             true_of: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over a batch of B matching (text_ids [B, T], images [B, 3, H, W]) pairs.

        `negatives` [K, T]: extra texts (e.g. captions with a swapped relation), added as K more
        columns of the image->text logits. A text that is true of an image is no negative for it
        and is masked out of that image's row and column: one equal to its own caption (a caption
        that occurs twice in the batch, or a negative that happens to be another image's caption),
        and those `true_of` [B, B + K] marks (other wordings of its caption: train.reranker.encode).
        Returns loss, accuracy (fraction of images whose best text among the B + K is their own)
        and logits [B, B + K] (image -> text).
        """
        # every input's own check first: a 1-D text_ids or a 3-D image read as a count mismatch
        self._check_text(text_ids, values=False)
        if negatives is not None:
            self._check_text(negatives, "negatives", values=False)
        self._check_images(images)
        if text_ids.shape[0] != images.shape[0] or images.shape[0] < 1:
            raise ValueError(f"need as many texts as images (>= 1), got {text_ids.shape[0]} and {images.shape[0]}")
        texts = text_ids if negatives is None else torch.cat([text_ids, negatives])
        self._check_text(texts)  # the ids' range, once for captions and negatives (as before)
        t, i = self._text_features(texts), self._image_features(images)
        B = images.shape[0]
        same = (text_ids[:, None, :] == texts[None, :, :]).all(-1)  # [B, B + K]
        if true_of is not None:
            if true_of.shape != same.shape:
                raise ValueError(f"true_of must be [B, B + K] = {tuple(same.shape)}, got {tuple(true_of.shape)}")
            same |= true_of.to(same.device, torch.bool)
        same[:, :B].fill_diagonal_(False)
        logits = self._similarities(i, t).masked_fill(same, float("-inf"))
        target = torch.arange(B, device=images.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].T, target)) / 2
        accuracy = (logits.detach().argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy, "logits": logits}

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, text_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """text_ids [1, T] (one caption for all) or [M, T], images [M, 3, H, W] -> [M] scaled
        cosine similarities: the higher, the better the image matches its caption."""
        self._check_text(text_ids)
        self._check_images(images)
        if text_ids.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"text_ids must have 1 or {images.shape[0]} rows (one per image), "
                             f"got {text_ids.shape[0]}")
        return self._similarities(self._image_features(images), self._text_features(text_ids), pairs=True)

    @torch.no_grad()
    def rank(self, text_ids: torch.Tensor, images: torch.Tensor, keep: int) -> torch.Tensor:
        """Indices [keep] of the `keep` best-scoring images (see `score`), best first."""
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= len(images):
            raise ValueError(f"keep must be an int in [1, {len(images)}], got {keep!r}")
        return self.score(text_ids, images).topk(keep).indices
