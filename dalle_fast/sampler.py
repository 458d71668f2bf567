"""Sampling image tokens from the prior with a KV cache (SPEC.md section 6).

The caption (and any priming rows of image tokens) is run once through the model ("prefill"),
filling a preallocated key/value cache of N positions per layer. Then each step feeds one image
token per sequence and attends only to the keys its layer's mask allows: the T text keys plus
the image keys at offsets `d = g - g'` the kind permits. The masks depend on `d` alone
(`ops.masks.image_offset_allowed`), so each kind has one fixed offset list (row: S + 1 keys,
column: S, conv: at most h*k + h + 1, causal: all) and a step reads `g - offsets` from the
cache with `ops.sparse_decode` (one kernel per layer for scores, softmax and values; the
PyTorch fallback is a fixed-shape gather): no per-step index building, so a step is the same
kernel sequence for every `g`.

Nothing in the loop reads a device value on the host: the position `g` is a device tensor that
the step advances itself, sampling writes its token into the output buffer on the device, and
on CUDA the whole step (model, top-k/top-p, sampling, bookkeeping) is captured once in a CUDA
graph and replayed for every token.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops import attention_mask, decode, gumbel_argmax, linear
from .ops.decode import StepDecode
from .ops.linear import StepLinear
from .ops.masks import image_offset_allowed
from .prior import Prior


# Logits are scaled by 1 / temperature in float32: the bounds keep the scale (and the scaled
# logits) finite and inside gumbel_argmax's range; beyond them the draw is greedy (use top_k=1)
# or uniform in all but name.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6
# Guidance scales the caption's logit difference: far beyond useful (1 to ~10) it overflows
# float32 to inf and every candidate is one degenerate argmax.
MAX_COND_SCALE = 1e3


@dataclass(frozen=True)  # checked once, when made: dataclasses.replace makes another, checked again
class SamplingConfig:
    temperature: float = 1.0  # logits are divided by it; lower is more conservative
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1: all)
    cuda_graph: bool = True  # on CUDA, capture one step in a graph and replay it
    # torch.compile the model's step (fuses its many small kernels: layer norms, residual adds,
    # GELUs, cache writes); the first step compiles, which takes seconds to a minute
    compile_step: bool = False
    # classifier-free guidance: logits = null + cond_scale * (caption - null), where "null" is the
    # prior's prediction for an empty caption (BOS + pads); 1 = off (one pass), > 1 doubles the batch
    cond_scale: float = 1.0

    def __post_init__(self):
        if not (_is_number(self.temperature) and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (for greedy "
                             f"decoding use top_k=1), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not (_is_number(self.cond_scale) and 1 <= self.cond_scale <= MAX_COND_SCALE):
            raise ValueError(f"cond_scale must be a number in [1, {MAX_COND_SCALE:g}] (1: no guidance), "
                             f"got {self.cond_scale!r}")
        for name in ("cuda_graph", "compile_step"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def guided(self) -> bool:
        return self.cond_scale != 1.0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def key_offsets(kind: str, grid: int, kernel: int) -> torch.Tensor:
    """The image offsets d = g - g' (ascending, int64) that an image query may see in `kind`."""
    d = torch.arange(grid * grid)
    return d[image_offset_allowed(kind, grid, d, kernel)]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. [B, V] -> [B, V].
    The nucleus is found in float32 at least (a bfloat16 cumulative sum drifts by a tenth)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not (_is_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")
    if top_k and top_k < logits.shape[-1]:
        # exactly k tokens, also when several tie with the k-th (top_k=1 is then one token, not a draw
        # among the tied ones, as a threshold at the k-th value would make it)
        top = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        # drop a token when the tokens before it already reach p (the most likely always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, config: SamplingConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of [B, V] logits: [B] int64, drawn without a host synchronisation.

    The draw is Gumbel-max (`ops.gumbel_argmax`): the first argmax of logits / temperature + g,
    g ~ Gumbel(0, 1) i.i.d., which picks index i with probability softmax(logits / temperature)_i,
    like torch.multinomial, in one pass over the logits (on CUDA one kernel, with no top-k / top-p)."""
    scale = 1.0 / config.temperature
    if config.top_p < 1.0 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # the nucleus is that of the tempered distribution; float64 logits are drawn in float32
        logits, scale = logits.float() * scale, 1.0
    return gumbel_argmax(filter_logits(logits, config.top_k, config.top_p), dim=-1, scale=scale, generator=generator)


class IncrementalPrior:
    """A Prior run one position at a time over a KV cache of `batch` sequences.

    `prefill(text, prime)` runs the caption and priming tokens and returns the logits of the
    next image token; `step(token, g)` feeds image token `g` (at position T + g) and returns
    the logits of image token g + 1.
    """

    def __init__(self, prior: Prior, batch: int, compile_step: bool = False):
        self.prior = prior
        cfg = self.cfg = prior.config
        param = next(prior.parameters())
        self.device, self.dtype = param.device, param.dtype
        # One [2, B, H, N, D] buffer per layer, keys then values.
        shape = (2, batch, cfg.heads, cfg.seq_len, cfg.head_dim)
        self.cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in prior.blocks]
        self.keys = [c[0] for c in self.cache]
        self.values = [c[1] for c in self.cache]
        offsets = {kind: key_offsets(kind, cfg.grid, cfg.kernel).to(self.device) for kind in set(cfg.layer_kinds())}
        self.offsets = [offsets[block.attn.kind] for block in prior.blocks]
        self.batch = batch
        self.grid_table = prior.grid_embedding().detach()  # one lookup per step for the position
        # The step's linear layers, checked once for its [batch, 1, K] inputs: per block qkv (the
        # layer norm before it included), proj, fc1 (its norm and GELU), fc2; ln_f and the head.
        x = torch.empty(batch, 1, cfg.d_model, device=self.device, dtype=self.dtype)
        self.linears = [(StepLinear(x, b.attn.qkv.weight, b.attn.qkv.bias, norm=b.ln_1),
                         StepLinear(x, b.attn.proj.weight, b.attn.proj.bias),
                         StepLinear(x, b.mlp[0].weight, b.mlp[0].bias, "gelu", b.ln_2),
                         StepLinear(x.new_empty(batch, 1, b.mlp[2].in_features), b.mlp[2].weight, b.mlp[2].bias))
                        for b in prior.blocks]
        head = prior.image_head
        self.head = None
        if isinstance(head, nn.Linear):
            self.head = StepLinear(x[:, 0], head.weight, head.bias, norm=prior.ln_f)
        self.step_linears = [layer for layers in self.linears for layer in layers] + ([self.head] if self.head is not None else [])
        # Each layer's attention over its cache, writing this step's key and value, checked once too.
        q = x.new_empty(batch, cfg.heads, cfg.head_dim)
        self.decoders = [StepDecode(q, self.keys[layer], self.values[layer], self.offsets[layer], cfg.text_len,
                                    1.0 / math.sqrt(cfg.head_dim)) for layer in range(len(prior.blocks))]
        self.step_tensors = [t for layer in self.step_linears for t in layer.tensors if t is not None]
        self._step = torch.compile(self._step_eager, dynamic=False) if compile_step else self._step_eager

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text [B, T], prime [B, n0] (the first n0 image tokens, or None) -> logits [B, V_image]."""
        prior, cfg = self.prior, self.cfg
        if prime is None:
            prime = text.new_zeros(text.shape[0], 0)
        prior._check(text, prime, prime.shape[1])
        if text.shape[0] != self.batch:
            raise ValueError(f"this cache holds {self.batch} sequences, got a batch of {text.shape[0]}")
        x = torch.cat([prior.embed_text(text), prior.embed_image(prime)], dim=1)  # (B, n, d)
        n = x.shape[1]
        masks = {}
        for layer, block in enumerate(prior.blocks):
            kind = block.attn.kind
            if kind not in masks:
                masks[kind] = attention_mask(kind, cfg.text_len, cfg.grid, cfg.kernel, device=self.device)[:n, :n]
            q, k, v = block.attn.split_heads(block.ln_1(x))  # (B, H, n, D)
            self.keys[layer][:, :, :n] = k
            self.values[layer][:, :, :n] = v
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[kind])
            x = x + block.attn.merge_heads(out)
            x = x + block.mlp(block.ln_2(x))
        return prior.image_head(prior.ln_f(x[:, -1]))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               direct: bool = False) -> torch.Tensor:
        """Writes this step's key and value k, v [B, H, 1, D] to the cache at image position g and
        returns the attention of its query q [B, H, 1, D] over the keys its mask allows
        (`ops.sparse_decode`: our kernel, which also writes the cache, when it fits, else
        index_copy_ and the same gather in PyTorch; direct=True: the kernel itself, for a step
        that decode.step_takes_kernel allowed)."""
        return self.decoders[layer](q.squeeze(2), k.squeeze(2), v.squeeze(2), g, direct=direct).unsqueeze(2)

    @torch.no_grad()
    def step(self, token: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """token [B] int64 = image token g; g a 0-dim int64 tensor on the model's device (0 <= g < S*S - 1)."""
        return self._step(token, g)

    def _step_eager(self, token: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        prior = self.prior
        grid_pos = g.view(1)
        x = prior.embed_image(token.unsqueeze(1), grid_pos, self.grid_table)  # (B, 1, d)
        # One decision for the step's linear layers and one for its attention: the kernel itself
        # for every call, or ops.skinny_linear's / ops.sparse_decode's own choice at each.
        direct = linear.step_takes_kernel(x, self.step_linears)
        direct_decode = decode.step_takes_kernel(x, self.decoders, self.step_tensors)
        for layer, (block, (qkv_linear, proj, fc1, fc2)) in enumerate(zip(prior.blocks, self.linears)):
            # The block's arithmetic (Block.forward) with its linear layers as skinny_linear: one
            # kernel each for a step's few rows, the layer norm before and the bias and residual
            # add after included (the GELU too).
            attn = block.attn
            qkv = attn.heads_of(qkv_linear(x, direct=direct))  # (3, B, H, 1, D)
            out = self.attend(layer, *qkv, g, direct=direct_decode)  # (B, H, 1, D); the cache gets this step's k, v
            x = proj(attn.concat_heads(out), residual=x, direct=direct)
            x = fc2(fc1(x, direct=direct), residual=x, direct=direct)
        if self.head is not None:  # ln_f and the head as one kernel too
            return self.head(x[:, 0], direct=direct)
        return prior.image_head(prior.ln_f(x[:, 0]))


class GuidedPrior:
    """Classifier-free guidance over an IncrementalPrior of 2B sequences: rows B.. hold the null
    caption; `prefill` and `step` take and return B rows like IncrementalPrior, with logits
    null + scale * (caption - null) (computed in fp32 at least)."""

    def __init__(self, prior: Prior, batch: int, null_text: torch.Tensor, scale: float, compile_step: bool = False):
        self.inc = IncrementalPrior(prior, 2 * batch, compile_step)
        self.null_text, self.scale, self.batch = null_text, float(scale), batch

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        cond, null = logits.to(torch.promote_types(logits.dtype, torch.float32)).chunk(2)
        return null + self.scale * (cond - null)

    def prefill(self, text: torch.Tensor, prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        null = self.null_text.to(text.device).expand_as(text)
        return self._mix(self.inc.prefill(torch.cat([text, null]), None if prime is None else prime.repeat(2, 1)))

    def step(self, token: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self._mix(self.inc.step(token.repeat(2), g))


def _no_peak(device: torch.device) -> torch.Tensor:
    return torch.full((), float("-inf"), device=device)


class _Loop:
    """The per-token state on the device and the step that advances it: feed `token` (image token
    `g`), sample token g + 1, write it to `tokens`, advance `g`."""

    def __init__(self, inc, tokens: torch.Tensor, first: int, config: SamplingConfig,
                 generator: Optional[torch.Generator], peak: Optional[torch.Tensor] = None):
        self.inc, self.tokens, self.config, self.generator = inc, tokens, config, generator
        self.g = torch.tensor(first, device=tokens.device)
        self.token = tokens[:, first].clone()
        # the running max of the steps' logits, on the device: NaN once any logit was (max and amax
        # propagate NaN), for the caller to read once at the end; two small kernels a step
        self.peak = _no_peak(tokens.device) if peak is None else peak

    def advance(self) -> None:
        logits = self.inc.step(self.token, self.g)
        torch.maximum(self.peak, logits.amax(), out=self.peak)
        nxt = sample_logits(logits, self.config, self.generator)
        self.g += 1
        self.tokens.index_copy_(1, self.g.view(1), nxt.unsqueeze(1))
        self.token.copy_(nxt)


def _run_graph(loop: _Loop, count: int) -> None:
    """Capture one `advance` in a CUDA graph and replay it `count` times."""
    g0, token0 = loop.g.clone(), loop.token.clone()
    gen_state = loop.generator.get_state() if loop.generator is not None else torch.cuda.get_rng_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (lazy initialisation, workspaces)
        loop.advance()
    torch.cuda.current_stream().wait_stream(side)
    # the warm-up moved the state on: put it back before capturing (its logits' peak is the first replay's)
    loop.g.copy_(g0)
    loop.token.copy_(token0)
    graph = torch.cuda.CUDAGraph()
    if loop.generator is not None:
        loop.generator.set_state(gen_state)
        graph.register_generator_state(loop.generator)
    else:
        torch.cuda.set_rng_state(gen_state)
    with torch.cuda.graph(graph):
        loop.advance()
    for _ in range(count):
        graph.replay()


@torch.no_grad()
def sample_image_tokens(prior: Prior, text: torch.Tensor, *, prime: Optional[torch.Tensor] = None,
                        config: Optional[SamplingConfig] = None,
                        generator: Optional[torch.Generator] = None,
                        null_text: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample the image tokens of each caption in text [B, T]: returns [B, S*S] int64.

    `prime` [B, n0] fixes the first n0 image tokens (image priming: n0 = rows * S); the rest are
    sampled one position at a time. Seeded `generator`s repeat exactly. Guided sampling
    (`config.cond_scale` > 1) needs `null_text` [T], the empty caption's ids
    (`TextTokenizer.null_text`)."""
    config = SamplingConfig() if config is None else config
    _check_inputs(prior, text, prime, config, generator, null_text)
    # the graph capture, its stream and the default generator's state are those of the current
    # CUDA device: make it the model's (cuda:1 while cuda:0 is current would capture on the wrong one)
    with torch.cuda.device(text.device) if text.is_cuda else contextlib.nullcontext():
        return _sample(prior, text, prime, config, generator, null_text)


def _check_inputs(prior: Prior, text: torch.Tensor, prime: Optional[torch.Tensor], config: SamplingConfig,
                  generator: Optional[torch.Generator], null_text: Optional[torch.Tensor]) -> None:
    """Clear errors for what would otherwise fail deep in the model (or not at all)."""
    cfg = prior.config
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    device = next(prior.parameters()).device
    if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[0] < 1:
        raise ValueError(f"text must be a [B, {cfg.text_len}] tensor of token ids with B >= 1, got "
                         f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
    for name, value in (("prime", prime), ("null_text", null_text)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of token ids or None, got {type(value).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} (seed one "
                        f"with torch.Generator(device).manual_seed(seed))")
    if text.device != device:
        raise ValueError(f"text is on {text.device} but the prior on {device}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the prior on {device}")
    _check_ids("text", text, cfg.text_vocab_total, "the tokenizer's ids and the pads of this prior's text_len")
    if prime is not None:
        if prime.dim() != 2 or prime.shape[1] > cfg.image_len or prime.shape[0] != text.shape[0]:
            raise ValueError(f"prime must be [B, n0] with B = {text.shape[0]} (the captions) and n0 <= "
                             f"{cfg.image_len} (the grid's {cfg.grid}x{cfg.grid} tokens), got {tuple(prime.shape)}")
        if prime.dtype != torch.long or prime.device != device:
            raise ValueError(f"prime must be int64 token ids on {device}, got {prime.dtype} on {prime.device}")
        if prime.numel() and not 0 <= int(prime.min()) <= int(prime.max()) < cfg.image_vocab:
            raise ValueError(f"prime tokens must be in [0, {cfg.image_vocab}) (the prior's image vocabulary), got "
                             f"{int(prime.min())}..{int(prime.max())}: were they made by this model's dVAE?")
    if config.guided:
        if null_text is None:
            raise ValueError("cond_scale > 1 needs null_text, the empty caption's ids (TextTokenizer.null_text)")
        if null_text.shape != (cfg.text_len,):
            raise ValueError(f"null_text must have shape ({cfg.text_len},), got {tuple(null_text.shape)}")
        _check_ids("null_text", null_text, cfg.text_vocab_total, "TextTokenizer.null_text of this prior's text_len")


def _check_ids(name: str, ids: torch.Tensor, vocab: int, what: str) -> None:
    """int64 ids in [0, vocab): an id out of range fails in the embedding, on CUDA as a device-side
    assert that takes the process's CUDA context down. One host synchronisation."""
    if ids.dtype != torch.long:
        raise ValueError(f"{name} must be int64 token ids, got {ids.dtype}")
    if ids.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())  # one synchronisation, not two
        if not 0 <= lo <= hi < vocab:
            raise ValueError(f"{name} ids must be in [0, {vocab}) ({what}), got {lo}..{hi}")


def _sample(prior: Prior, text: torch.Tensor, prime: Optional[torch.Tensor], config: SamplingConfig,
            generator: Optional[torch.Generator], null_text: Optional[torch.Tensor]) -> torch.Tensor:
    cfg = prior.config
    modes = {module: module.training for module in prior.modules()}  # each module's, put back after
    prior.eval()
    peak = _no_peak(text.device)
    try:
        if config.guided:
            inc = GuidedPrior(prior, text.shape[0], null_text, config.cond_scale, config.compile_step)
        else:
            inc = IncrementalPrior(prior, text.shape[0], config.compile_step)
        logits = inc.prefill(text, prime)
        first = 0 if prime is None else prime.shape[1]
        tokens = torch.zeros(text.shape[0], cfg.image_len, dtype=torch.long, device=text.device)
        if first:
            tokens[:, :first] = prime
        if first == cfg.image_len:
            return tokens
        torch.maximum(peak, logits.amax(), out=peak)
        tokens[:, first] = sample_logits(logits, config, generator)
        loop = _Loop(inc, tokens, first, config, generator, peak)
        remaining = cfg.image_len - 1 - first
        if remaining and config.cuda_graph and tokens.is_cuda:
            _run_graph(loop, remaining)
        else:
            for _ in range(remaining):
                loop.advance()
        if bool(peak.isnan()):  # the one host synchronisation of the loop, at its end
            raise FloatingPointError("the prior's logits were NaN while sampling (non-finite weights or activations: "
                                     "a diverged checkpoint, or an overflow in half precision?); no image is drawn "
                                     "from them")
        return tokens
    finally:
        for module, training in modes.items():
            module.train(training)
