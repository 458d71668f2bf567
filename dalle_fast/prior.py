"""Stage 2 of DALL-E: the sparse-attention transformer prior over text + image tokens (SPEC sections 1, 2, 4).

One stream of N = T + S*S positions: BOS and the caption's BPE tokens (per-position pad ids fill
the rest of the T text positions), then the S*S image tokens in raster order. A decoder-only,
pre-LayerNorm transformer predicts every next token; each layer attends with its own mask kind
(row, column, conv, causal) through `dalle_fast.ops.sparse_attention`, so the same model runs
the reference, our CPU kernel or our CUDA kernel, as `dalle_fast.ops.backend` selects.

Outputs: position p predicts the token at p + 1. Positions 0..T-2 predict text tokens 1..T-1
(text head); positions T-1..N-2 predict image tokens 0..S*S-1 (image head).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .ops import KINDS, layer_kinds, sparse_attention
from .skeleton import without_random_init

# attention(q, k, v, kind, text_len, grid, kernel) -> out, all [B, H, N, D]: the op by default; a
# benchmark may pass dense SDPA or FlexAttention instead.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, str, int, int, int], torch.Tensor]


@dataclass
class PriorConfig:
    text_len: int = 256  # T: BOS + at most T-1 caption tokens, pads after
    grid: int = 32  # S: the image is S x S tokens
    text_vocab: int = 16384  # BPE vocabulary (BOS included); T per-position pad ids come on top
    image_vocab: int = 8192  # the dVAE's codebook size
    # The dVAE's DVAEConfig.colour_codes: > 0 when its codes are pairs (colour, shape); the image
    # embedding and head are then factored the same way (FactoredImageEmbedding / Head).
    colour_codes: int = 0
    d_model: int = 3968
    heads: int = 62
    layers: int = 64
    kernel: int = 11  # conv mask kernel (odd)
    mlp_ratio: int = 4
    kinds: Optional[tuple[str, ...]] = None  # explicit per-layer mask kinds; None: SPEC's schedule
    image_loss_weight: float = 7.0  # loss = (text + w * image) / (1 + w)
    checkpoint_activations: bool = False  # recompute each block in the backward pass to save memory

    def __post_init__(self):
        for name in ("text_len", "grid", "text_vocab", "image_vocab", "d_model", "heads", "layers", "kernel",
                     "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PriorConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.colour_codes, bool) or not isinstance(self.colour_codes, int) or self.colour_codes < 0:
            raise ValueError(f"PriorConfig.colour_codes must be an int >= 0, got {self.colour_codes!r}")
        if self.colour_codes and (self.image_vocab % self.colour_codes or self.image_vocab == self.colour_codes):
            raise ValueError(f"PriorConfig.image_vocab {self.image_vocab} must be a multiple (> 1x) of colour_codes "
                             f"{self.colour_codes}")
        if self.d_model % self.heads:
            raise ValueError(f"PriorConfig.d_model {self.d_model} must be divisible by heads {self.heads}")
        if self.kernel % 2 == 0:
            raise ValueError(f"PriorConfig.kernel must be odd, got {self.kernel}")
        if self.text_len < 2:
            raise ValueError(f"PriorConfig.text_len must be >= 2 (BOS and at least one caption token: the text "
                             f"loss predicts positions 1..text_len-1), got {self.text_len}")
        w = self.image_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"PriorConfig.image_loss_weight must be a finite number >= 0, got {w!r}")
        if self.kinds is not None:
            self.kinds = tuple(self.kinds)
            if len(self.kinds) != self.layers:
                raise ValueError(f"PriorConfig.kinds has {len(self.kinds)} entries for {self.layers} layers")
            bad = [k for k in self.kinds if k not in KINDS]
            if bad:
                raise ValueError(f"PriorConfig.kinds: unknown kind(s) {bad}; expected {', '.join(KINDS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """N = T + S*S."""
        return self.text_len + self.image_len

    @property
    def text_vocab_total(self) -> int:
        """Rows of the text embedding and outputs of the text head: BPE ids + T pad ids."""
        return self.text_vocab + self.text_len

    def layer_kinds(self) -> list[str]:
        return list(self.kinds) if self.kinds is not None else layer_kinds(self.layers)

    def num_params(self) -> int:
        """Parameter count, from a model built on the meta device (nothing is allocated)."""
        with without_random_init("meta"):
            model = Prior(self)
        return sum(p.numel() for p in model.parameters())

    @classmethod
    def preset(cls, name: str, **overrides) -> "PriorConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown prior preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, PriorConfig] = {
    # The paper's 12B model: 64 layers, d 3968, 62 heads of 64, 256 text + 32x32 image tokens.
    "paper": PriorConfig(),
    # CPU work on the small dVAE's 16x16 grids (512 codes) with short captions.
    "small": PriorConfig(text_len=32, grid=16, text_vocab=1024, image_vocab=512, d_model=256, heads=4,
                         layers=8),
    # The tiny dVAE's 8x8 grids (256 codes); also the size of the unit tests' models.
    "tiny": PriorConfig(text_len=16, grid=8, text_vocab=512, image_vocab=256, d_model=128, heads=2, layers=4),
}


# -----------------------------------------------------------------------------
# model


def _attend(q, k, v, kind, text_len, grid, kernel):
    return sparse_attention(q, k, v, kind, text_len, grid, kernel)


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig, kind: str, attention: AttentionFn):
        super().__init__()
        self.cfg, self.kind, self.attention = cfg, kind, attention
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, d] -> q, k, v stacked as one view [3, B, H, n, D] of the projection."""
        return self.heads_of(self.qkv(x))

    def heads_of(self, qkv: torch.Tensor) -> torch.Tensor:
        """The projection [B, n, 3d] -> q, k, v stacked as one view [3, B, H, n, D]."""
        b, n, _ = qkv.shape
        return qkv.view(b, n, 3, self.cfg.heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, n, d] -> q, k, v, each [B, H, n, D]."""
        return self.qkv_heads(x).unbind(0)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, n, D] -> projected [B, n, d]."""
        return self.proj(self.concat_heads(out))

    def concat_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, n, D] -> [B, n, d], the heads side by side (what proj takes)."""
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        cfg = self.cfg
        out = self.attention(q, k, v, self.kind, cfg.text_len, cfg.grid, cfg.kernel)  # (B, H, N, D)
        return self.merge_heads(out)


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig, kind: str, attention: AttentionFn):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, kind, attention)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class FactoredImageEmbedding(nn.Module):
    """Embedding of factored codes, id = c * shape_codes + g: colour[c] + shape[g]."""

    def __init__(self, colour_codes: int, shape_codes: int, d: int):
        super().__init__()
        self.shape_codes = shape_codes
        self.colour = nn.Embedding(colour_codes, d)
        self.shape = nn.Embedding(shape_codes, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.colour(torch.div(ids, self.shape_codes, rounding_mode="floor")) + self.shape(ids % self.shape_codes)


class FactoredImageHead(nn.Module):
    """Logits over factored codes: logit(c, g) = colour(x)[c] + shape(x)[g], so the colour and the
    shape of a token are drawn independently given the context, each by its own head, and the
    cross-entropy of a code is the sum of the two factors'."""

    def __init__(self, colour_codes: int, shape_codes: int, d: int):
        super().__init__()
        self.colour = nn.Linear(d, colour_codes)
        self.shape = nn.Linear(d, shape_codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour, shape = self.colour(x), self.shape(x)
        return (colour[..., :, None] + shape[..., None, :]).flatten(-2)


class Prior(nn.Module):
    """`forward(text, image) -> (text_logits, image_logits)`; `loss(text, image) -> dict`."""

    def __init__(self, config: PriorConfig, attention: Optional[AttentionFn] = None):
        super().__init__()
        self.config = cfg = config
        attention = attention or _attend
        d = cfg.d_model
        self.text_emb = nn.Embedding(cfg.text_vocab_total, d)
        self.text_pos = nn.Embedding(cfg.text_len, d)
        if cfg.colour_codes:
            shape_codes = cfg.image_vocab // cfg.colour_codes
            self.image_emb = FactoredImageEmbedding(cfg.colour_codes, shape_codes, d)
        else:
            self.image_emb = nn.Embedding(cfg.image_vocab, d)
        self.row_emb = nn.Embedding(cfg.grid, d)
        self.col_emb = nn.Embedding(cfg.grid, d)
        self.blocks = nn.ModuleList(Block(cfg, kind, attention) for kind in cfg.layer_kinds())
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab_total)
        self.image_head = (FactoredImageHead(cfg.colour_codes, shape_codes, d) if cfg.colour_codes
                           else nn.Linear(d, cfg.image_vocab))
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))

    def _check(self, text: torch.Tensor, image: torch.Tensor, image_len: int) -> None:
        # Shapes and dtypes only: checking values would cost a device sync per step (the token
        # cache and the tokenizer produce ids in range; nn.Embedding rejects the rest on CPU).
        cfg = self.config
        if text.dtype != torch.long or image.dtype != torch.long:
            raise TypeError(f"text and image must be int64 token ids, got {text.dtype} and {image.dtype}")
        if text.dim() != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text must be [B, {cfg.text_len}] (text_len), got {tuple(text.shape)}")
        if image.dim() != 2 or image.shape[0] != text.shape[0] or image.shape[1] != image_len:
            raise ValueError(f"image must be [B, {image_len}] with B = {text.shape[0]}, got {tuple(image.shape)}")

    def grid_embedding(self) -> torch.Tensor:
        """The position embedding of every grid index g: row_emb(g // S) + col_emb(g % S), [S*S, d]."""
        s = self.config.grid
        return self.row_emb.weight.repeat_interleave(s, 0) + self.col_emb.weight.repeat(s, 1)

    def embed_image(self, image: torch.Tensor, grid_pos: Optional[torch.Tensor] = None,
                    grid_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings of image tokens [B, n] at grid indices `grid_pos` [n] (default 0 .. n-1).
        `grid_table`: grid_embedding(), when the caller keeps it (a sampler's steps)."""
        table = self.grid_embedding() if grid_table is None else grid_table
        pos = table[: image.shape[1]] if grid_pos is None else table.index_select(0, grid_pos)
        return self.image_emb(image) + pos

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_emb(text) + self.text_pos.weight[: text.shape[1]]

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, T], image [B, S*S] -> text logits [B, T-1, T_vocab] (predicting text 1..T-1)
        and image logits [B, S*S, image_vocab] (predicting image 0..S*S-1)."""
        cfg = self.config
        self._check(text, image, cfg.image_len)
        # The last image token is never an input (nothing follows it): positions 0..N-2 suffice,
        # but the masks are defined over all N, so it is embedded and its output dropped.
        x = torch.cat([self.embed_text(text), self.embed_image(image)], dim=1)  # (B, N, d)
        for block in self.blocks:
            if cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.ln_f(x)
        t = cfg.text_len
        return self.text_head(x[:, : t - 1]), self.image_head(x[:, t - 1 : -1])

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean text and image cross-entropies and their weighted sum (SPEC section 4)."""
        if text.shape[0] == 0:  # the mean of no cross-entropy is NaN, which would read as a diverged run
            raise ValueError("the batch is empty: a loss needs at least one caption and image")
        text_logits, image_logits = self(text, image)
        # at least float32 (bf16 / fp16 logits under autocast), float64 kept (a float64 model's checks)
        compute = torch.promote_types(text_logits.dtype, torch.float32)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).to(compute), text[:, 1:].flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).to(compute), image.flatten())
        w = self.config.image_loss_weight
        return {"loss": (text_loss + w * image_loss) / (1 + w), "text_loss": text_loss, "image_loss": image_loss}
