"""Training of the reranker (SPEC.md section 6), importable and behind `dalle-fast train-reranker`.

A CLIP-style contrastive model (rerank.py) on image-caption pairs, with the prior's tokenizer so
that both read a caption as the same ids. In-batch negatives alone rarely contain the hard
cases (same objects, other relation; same words, other binding), so each caption also brings
extra negative texts (negatives.py): with `hard_negatives` "A <relation> B" brings
"B <relation> A", with `word_negatives` one caption a word swap or replacement away. AdamW (the
text encoder at a fraction of the learning rate, see _optimizer), linear warm-up then cosine
decay, gradient clipping, EMA weights, safetensors checkpoints with exact resume; torchrun data
parallelism (the contrastive batch is each process's own).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ..atomic import copy_file
from ..data import make_dataset
from ..rerank import Reranker, RerankerConfig
from ..tokenizer import TextTokenizer
from . import distributed
from .negatives import WordPairs, scene, swap_relation
from .loop import (RunOptions, TrainingRun, autocast, batches, check_batch_size, check_options, decay_groups,
                   ema_with_warmup, option as _f)
from .schedules import warmup_cosine


@dataclass
class TrainRerankerConfig(RunOptions):
    data: str = _f("shapes", "dataset: 'shapes', a folder of image+caption pairs, or tar shards (*.tar, globs)")
    out: str = _f("runs/reranker", "run folder: checkpoint, tokenizer, metrics.jsonl")
    tokenizer: str = _f("runs/prior/tokenizer.json", "the prior's tokenizer.json (required: both models must "
                                                     "tokenize captions alike)")
    text_len: int = _f(32, "text positions T (BOS + caption tokens + pads)")
    image_size: int = _f(64, "image side in pixels (a power of two >= 8)")
    embed_dim: int = _f(128, "joint embedding size")
    width: int = _f(128, "text transformer width")
    text_layers: int = _f(4, "text transformer layers")
    heads: int = _f(4, "text attention heads")
    image_width: int = _f(32, "channels of the image net's first conv (its stages go up to 4x)")
    image_encoder: str = _f("joint", "image net: 'joint' (one conv net over RGB) or 'split' (shape from brightness "
                                     "and per-pixel colour apart, joined linearly: generalises to colour-shape "
                                     "pairs never seen together)")
    text_lr_scale: float = _f(0.2, "learning rate of the text encoder relative to --lr (see _optimizer)")
    hard_negatives: bool = _f(True, "add each 'A <relation> B' caption's swap 'B <relation> A' as an extra "
                                    "negative text")
    word_negatives: bool = _f(False, "add one caption with two words swapped or one word replaced as an extra "
                                     "negative text, kept only if all its adjacent word pairs occur in the "
                                     "training captions (see train/negatives.py; on shapes it did not change "
                                     "zero-shot accuracy)")
    pair_captions: int = _f(5000, "training captions read to collect those word pairs")
    steps: int = _f(2000, "total optimizer steps")
    batch_size: int = _f(64, "image-caption pairs per step per process (the contrastive batch)")
    lr: float = _f(1e-3, "peak learning rate")
    lr_end: float = _f(1e-5, "learning rate at the end of the cosine decay")
    warmup: int = _f(100, "linear warm-up steps")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices only)")
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)")
    ema: float = _f(0.999, "EMA decay of the weights kept for reranking")


def model_config(cfg: TrainRerankerConfig, tokenizer: TextTokenizer) -> RerankerConfig:
    return RerankerConfig(image_size=cfg.image_size, text_len=cfg.text_len,
                          text_vocab=tokenizer.text_vocab_size(cfg.text_len), embed_dim=cfg.embed_dim,
                          width=cfg.width, text_layers=cfg.text_layers, heads=cfg.heads,
                          image_width=cfg.image_width, image_encoder=cfg.image_encoder)


def encode(tokenizer: TextTokenizer, captions: Sequence[str], text_len: int, hard_negatives: bool,
           word_pairs: Optional[WordPairs] = None, rng: Optional[np.random.Generator] = None):
    """Captions -> (text ids [B, T], negatives [K, T] or None, owners: the image of each negative,
    swaps: how many of the negatives, the first ones, are relation swaps; the others are word
    negatives from `word_pairs`, drawn with `rng`; true_of [B, B + K]: which other texts say what
    an image's own caption says in other words, so are no negatives for it)."""
    text = tokenizer.encode_batch(list(captions), text_len)
    relation = [swap_relation(c) for c in captions] if hard_negatives else [None] * len(captions)
    words = [word_pairs.negative(c, rng) for c in captions] if word_pairs is not None else [None] * len(captions)
    owners, texts = [], []
    for kind in (relation, words):
        for i, negative in enumerate(kind):
            if negative is not None:
                owners.append(i)
                texts.append(negative)
    swaps = sum(n is not None for n in relation)
    negatives = tokenizer.encode_batch(texts, text_len) if texts else None
    ids: dict[str, int] = {}
    scenes = torch.tensor([ids.setdefault(scene(c), len(ids)) for c in list(captions) + texts])
    true_of = scenes[:len(captions), None] == scenes[None, :]
    true_of[:, :len(captions)].fill_diagonal_(False)
    return text, negatives, owners, swaps, true_of


def collect_word_pairs(dataset, count: int) -> WordPairs:
    """The adjacent word pairs of the first `count` captions of `dataset`."""
    return WordPairs(caption for _, caption in itertools.islice(iter(dataset), count))


_NEGATIVES = 0x4E47  # the word negatives' random stream, drawn per (seed, step, rank): resumes repeat

_TEXT = ("token_embed", "pos_embed", "text_encoder", "text_norm", "text_proj")


class _AdamW(torch.optim.AdamW):
    """AdamW whose parameter groups may carry an `lr_scale`: TrainingRun.update sets one learning
    rate on every group, this applies each group's scale to it for the step."""

    def step(self, closure=None):
        base = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, base):
                group["lr"] = lr


def _optimizer(model: Reranker, cfg: TrainRerankerConfig) -> torch.optim.AdamW:
    """Decay on matrices (linear, conv and embedding weights), not on biases, norms or the logit
    scale. The text encoder learns slower: at the full rate it first drifts towards a bag of
    words (early on the image side cannot tell "A left of B" from "B left of A" either), at 0.2x
    it keeps its order-aware initial features (Reranker._init_text) while the image side learns
    where things are. On shapes at 64 px the in-batch relation-swap accuracy reaches 0.94 at
    step 150 with 0.2x, against 0.52 at step 150 and 0.89 at step 350 with 1x. Each step ends
    with the logit scale capped at 100 (CLIP)."""
    groups = []
    for text in (True, False):
        params = [p for n, p in model.named_parameters() if n.startswith(_TEXT) == text]
        scale = cfg.text_lr_scale if text else 1.0
        groups += decay_groups(params, cfg.weight_decay, lr_scale=scale)
    optimizer = _AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    # right after each step, before TrainingRun.update's EMA copies the weights
    optimizer.register_step_post_hook(lambda *_: model.clamp_logit_scale_())
    return optimizer


def train_reranker(cfg: TrainRerankerConfig) -> Path:
    """Run (or resume) a reranker training; returns the checkpoint path."""
    check_options(cfg)
    if cfg.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (a contrastive batch needs negatives), got {cfg.batch_size}")
    if not 0.0 < cfg.text_lr_scale <= 1.0:
        raise ValueError(f"--text-lr-scale must be in (0, 1], got {cfg.text_lr_scale}")
    if cfg.text_len < 2:  # BOS alone: every caption would read as the same text
        raise ValueError(f"--text-len must be >= 2 (BOS and at least one caption token), got {cfg.text_len}")
    if not Path(cfg.tokenizer).is_file():
        raise FileNotFoundError(f"no tokenizer at {cfg.tokenizer}: pass the prior's (`dalle-fast train-tokenizer` "
                                "makes one for both, or use runs/prior/tokenizer.json) so that both models "
                                "tokenize captions alike")
    tokenizer = TextTokenizer.load(cfg.tokenizer)
    model_cfg = model_config(cfg, tokenizer)
    dataset = make_dataset(cfg.data, size=cfg.image_size, seed=cfg.seed)  # bad --data fails before OUT is touched
    info = distributed.setup(cfg.device)
    check_batch_size(dataset, cfg.batch_size, info)  # before OUT is touched
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model = Reranker(model_cfg).to(info.device)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True)
    optimizer = _optimizer(model, cfg)
    run = TrainingRun(out, info, modules={"model": model, "ema": ema}, optimizer=optimizer, generators={},
                      meta={"model_config": dataclasses.asdict(model_cfg), "kind": "reranker",
                            "inputs": {"tokenizer": tokenizer.fingerprint()}},
                      record={"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)},
                      resume=cfg.resume, steps=cfg.steps, run_steps=cfg.run_steps, desc="train-reranker")
    if info.is_main:
        if Path(cfg.tokenizer).resolve() != (out / "tokenizer.json").resolve():
            copy_file(cfg.tokenizer, out / "tokenizer.json")  # a run folder is self-contained
        print(f"reranker: {model_cfg.num_params() / 1e6:.2f}M parameters")
    word_pairs = collect_word_pairs(dataset, cfg.pair_captions) if cfg.word_negatives else None
    objective = distributed.data_parallel(model, info)
    data = batches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, info=info, step=run.step)
    model.train()
    with run.guard():
        while run.running:
            step = run.step
            images, captions = next(data)
            rng = np.random.default_rng([_NEGATIVES, cfg.seed, step, info.rank])
            text, negatives, owners, swaps, true_of = encode(tokenizer, captions, cfg.text_len, cfg.hard_negatives,
                                                             word_pairs, rng)
            images, text = images.to(info.device, non_blocking=True), text.to(info.device)
            negatives = negatives.to(info.device) if negatives is not None else None
            lr = warmup_cosine(step, cfg.lr, cfg.lr_end, cfg.warmup, cfg.steps)
            with autocast(cfg, info):
                result = objective(text, images, negatives, true_of.to(info.device))
            run.update(result["loss"], lr, model, ema, cfg.grad_clip)
            step = run.step
            log = run.should_log(cfg.log_every)
            metrics = {}
            if log:
                # how often an image's own caption beats its relation swap / its word negative
                logits, rows = result["logits"].detach().float(), torch.tensor(owners, dtype=torch.long, device=info.device)
                cols = torch.arange(len(owners), device=info.device) + len(captions)
                won = (logits[rows, rows] > logits[rows, cols]).float()
                stats = torch.stack([result["loss"].detach().float(), result["accuracy"], won[:swaps].sum(),
                                     torch.tensor(float(swaps), device=info.device), won[swaps:].sum(),
                                     torch.tensor(float(len(owners) - swaps), device=info.device)])
                loss, accuracy, swap_wins, swap_count, word_wins, word_count = distributed.mean_over_ranks(stats).tolist()
                metrics = dict(loss=loss, accuracy=accuracy)
                if swap_count > 0:
                    metrics["swap_accuracy"] = swap_wins / swap_count
                if word_count > 0:
                    metrics["word_negative_accuracy"] = word_wins / word_count
                metrics.update(lr=lr, logit_scale=model.scale().item(),
                               images_per_s=run.per_second(cfg.batch_size * info.world_size))
            run.end_step(metrics, log, cfg.save_every)
    ckpt = run.finish()
    distributed.teardown()
    return ckpt
