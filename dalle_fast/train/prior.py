"""Stage 2 training: the transformer prior on cached dVAE tokens (SPEC.md section 4), importable and
behind `dalle-fast train-prior`.

The dataset is encoded once by a trained dVAE into a token cache (token_cache.py); a BPE is
trained on its captions unless one is given. AdamW (0.9, 0.96, 1e-8, weight decay 4.5e-2 on
matrices), linear warm-up then cosine decay, gradient clipping at 4, bf16 autocast on GPU, EMA
weights, safetensors checkpoints with exact resume, torchrun + DistributedDataParallel with an
optional PowerSGD gradient-compression hook.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel

from ..atomic import copy_file
from ..dvae import DVAE, DVAEConfig
from ..prior import Prior, PriorConfig
from ..tokenizer import TextTokenizer
from . import distributed
from ..checkpoint import checkpoint_file, load_model
from .loop import (RunOptions, TrainingRun, autocast, batches, check_batch_size, check_options, decay_groups,
                   ema_with_warmup, option as _f)
from .schedules import warmup_cosine
from .token_cache import TokenCache, build_token_cache


@dataclass
class TrainPriorConfig(RunOptions):
    dvae: str = _f("runs/dvae", "trained dVAE (train-vae's run folder or checkpoint) that makes the image tokens")
    data: str = _f("shapes", "dataset: 'shapes', a folder of image+caption pairs, or tar shards (*.tar, globs)")
    out: str = _f("runs/prior", "run folder: checkpoint, tokenizer, metrics.jsonl")
    cache: str = _f("", "token cache folder (default: OUT/cache); reused when built from the same inputs")
    num_images: int = _f(20000, "images to encode into the cache (0: the whole dataset; tar shards need a number, "
                                "at most the readable samples they hold)")
    tokenizer: str = _f("", "a trained tokenizer.json to use (default: --init's run's, else train a BPE on the "
                            "cached captions)")
    text_vocab: int = _f(16384, "BPE vocabulary size when training one (small corpora stop earlier)")
    bpe_dropout: float = _f(0.1, "BPE dropout of the cached caption tokenizations used in training")
    text_variants: int = _f(8, "tokenizations cached per caption (the first without dropout)")
    preset: str = _f("small", "model preset (PriorConfig.preset): paper, small, tiny")
    text_len: int = _f(0, "text positions T (0: the preset's)")
    layers: int = _f(0, "transformer layers (0: the preset's)")
    d_model: int = _f(0, "model width (0: the preset's)")
    heads: int = _f(0, "attention heads (0: the preset's)")
    checkpoint_activations: bool = _f(False, "recompute each block in the backward pass (less memory)")
    steps: int = _f(3000, "total optimizer steps")
    batch_size: int = _f(32, "sequences per step per process")
    lr: float = _f(1e-3, "peak learning rate (the paper: 4.5e-4 for 12B)")
    lr_end: float = _f(1e-5, "learning rate at the end of the cosine decay")
    warmup: int = _f(200, "linear warm-up steps")
    weight_decay: float = _f(4.5e-2, "AdamW weight decay (matrices only)")
    grad_clip: float = _f(4.0, "gradient norm clip (0: off)")
    ema: float = _f(0.999, "EMA decay of the weights kept for sampling")
    powersgd_rank: int = _f(0, "PowerSGD gradient compression rank under torchrun (0: plain all-reduce)")
    null_caption: float = _f(0.0, "probability that a sequence's caption is replaced by the empty one (BOS + "
                                  "pads), which teaches the model for guided sampling (--cond-scale); 0: off")
    word_dropout: float = _f(0.0, "probability that one caption token (a random one of BOS's followers, not a "
                                  "pad) is deleted from a sequence, so that the model also learns each word's "
                                  "effect alone; 0: off")
    init: str = _f("", "start from this prior's weights (a run folder or checkpoint of the same architecture), "
                       "e.g. to fine-tune with --null-caption; ignored on --resume")


def _arch_overrides(cfg: TrainPriorConfig) -> dict[str, int]:
    """The architecture options given (0: the preset's)."""
    return {k: getattr(cfg, k) for k in ("layers", "d_model", "heads") if getattr(cfg, k)}


def model_config(cfg: TrainPriorConfig, cache: TokenCache, tokenizer: TextTokenizer) -> PriorConfig:
    overrides = _arch_overrides(cfg)
    text_len = int(cache.meta["text_len"])
    return PriorConfig.preset(cfg.preset, text_len=text_len, grid=int(cache.meta["grid"]),
                              image_vocab=int(cache.meta["image_vocab"]), text_vocab=tokenizer.bpe_vocab_size,
                              colour_codes=int(cache.meta.get("colour_codes", 0)),
                              checkpoint_activations=cfg.checkpoint_activations, **overrides)


def prepare_cache(cfg: TrainPriorConfig, info: distributed.DistInfo) -> TokenCache:
    """Build the token cache on the main process (the others wait), then open it everywhere."""
    cache_dir = Path(cfg.cache) if cfg.cache else Path(cfg.out) / "cache"
    with distributed.others_wait():  # for as long as the build takes, not the process group's timeout
        if info.is_main:
            text_len = cfg.text_len or PriorConfig.preset(cfg.preset).text_len
            # no dVAE is needed to reuse a cache (train_prior has checked there is one): build_token_cache warns
            have_dvae = checkpoint_file(cfg.dvae).is_file()
            dvae = load_model(cfg.dvae, DVAE, DVAEConfig, kind="dvae").to(info.device) if have_dvae else None
            tokenizer_file = cfg.tokenizer or (cfg.init and _init_run_file(cfg.init, "tokenizer.json"))
            if tokenizer_file and not cfg.tokenizer:
                print(f"--init: using its run's tokenizer {tokenizer_file}")
            tokenizer = TextTokenizer.load(tokenizer_file) if tokenizer_file else None
            build_token_cache(cache_dir, dvae=dvae, data=cfg.data, text_len=text_len,
                              num_images=cfg.num_images or None, tokenizer=tokenizer, text_vocab=cfg.text_vocab,
                              variants=cfg.text_variants, dropout=cfg.bpe_dropout, seed=cfg.seed,
                              device=info.device, source=str(checkpoint_file(cfg.dvae).resolve()))
    return TokenCache(cache_dir, seed=cfg.seed)


def drop_captions(text: torch.Tensor, null_text: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """text [B, T] with each row replaced by `null_text` [T] with probability `prob`."""
    drop = torch.rand(text.shape[0], 1, device=text.device, generator=generator) < prob
    return torch.where(drop, null_text, text)


def drop_words(text: torch.Tensor, bpe_vocab: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    """text [B, T] (BOS, BPE tokens, then the position pads bpe_vocab + p) with, in each row with
    probability `prob`, one random BPE token after BOS deleted: the rest moves up a position and
    the freed positions get their own pads."""
    b, t = text.shape
    position = torch.arange(t, device=text.device)
    is_word = (text < bpe_vocab) & (position > 0)
    pick = torch.rand(b, t, device=text.device, generator=generator).masked_fill(~is_word, -1.0).argmax(1)
    rows = (torch.rand(b, device=text.device, generator=generator) < prob) & is_word.any(1)
    dropped = rows[:, None] & (position == pick[:, None])
    order = torch.argsort(dropped.long() * t + position, dim=1)  # kept tokens first, in order
    out = text.gather(1, order)
    freed = out >= bpe_vocab
    freed |= rows[:, None] & (position == t - 1)  # where the deleted token went
    return torch.where(freed, bpe_vocab + position, out)


def _init_run_file(path: str, name: str) -> Optional[Path]:
    """A file of the run an --init checkpoint comes from (beside the checkpoint), if it is there."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return folder / name if (folder / name).is_file() else None


def _load_init(model: Prior, path: str, tokenizer: TextTokenizer, cache: TokenCache) -> None:
    """Copy the weights of a prior checkpoint of the same architecture into `model`, refusing one
    that read other text ids (another tokenizer) or other image tokens (another dVAE)."""
    theirs_tok = _init_run_file(path, "tokenizer.json")
    if theirs_tok is None:
        warnings.warn(f"--init {path}: no tokenizer.json beside it, so whether it used this run's tokenizer "
                      "cannot be checked", stacklevel=2)
    elif TextTokenizer.load(theirs_tok).fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"--init {path} was trained with another tokenizer than this run's: its text embeddings "
                         f"would read other words; pass --tokenizer {theirs_tok} (and a new --cache or --out)")
    record = _init_run_file(path, "config.json")
    theirs_dvae = json.loads(record.read_text()).get("cache", {}).get("dvae_weights") if record else None
    if theirs_dvae is not None and cache.meta.get("dvae_weights") not in (None, theirs_dvae):
        raise ValueError(f"--init {path} was trained on the image tokens of another dVAE than this run's --dvae")
    source = load_model(path, Prior, PriorConfig, kind="prior")
    # activation checkpointing is how a run trains, not part of the architecture
    theirs = dataclasses.replace(source.config, checkpoint_activations=model.config.checkpoint_activations)
    if theirs != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in dataclasses.asdict(theirs).items()
                if getattr(model.config, k) != v}
        raise ValueError(f"--init {path}: its architecture differs from this run's (checkpoint vs run): {diff}")
    model.load_state_dict(source.state_dict())


def _optimizer(model: Prior, cfg: TrainPriorConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_groups(model.parameters(), cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.96),
                             eps=1e-8)


def _wrap(model: Prior, cfg: TrainPriorConfig, info: distributed.DistInfo):
    """The module whose forward is the loss: DistributedDataParallel (plus PowerSGD) under torchrun."""
    ddp = distributed.data_parallel(model, info)
    if info.enabled and cfg.powersgd_rank > 0:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

        # Error feedback needs a few uncompressed iterations first (start_powerSGD_iter > 1).
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                       start_powerSGD_iter=2, min_compression_rate=2, random_seed=cfg.seed)
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    return ddp


def train_prior(cfg: TrainPriorConfig) -> Path:
    """Run (or resume) a prior training; returns the checkpoint path."""
    check_options(cfg)
    # The architecture's own checks (heads dividing d_model, ...) before the long cache build.
    PriorConfig.preset(cfg.preset, **_arch_overrides(cfg), **({"text_len": cfg.text_len} if cfg.text_len else {}))
    if cfg.init and not checkpoint_file(cfg.init).is_file():
        raise FileNotFoundError(f"--init: no prior checkpoint at {cfg.init}")
    try:  # before the images are encoded, which a bad size would only fail after
        TextTokenizer.check_vocab_size(cfg.text_vocab, cfg.text_len or PriorConfig.preset(cfg.preset).text_len)
    except ValueError as exc:
        raise ValueError(f"--text-vocab: {exc}") from None
    if not checkpoint_file(cfg.dvae).is_file() and not (cfg.cache and (Path(cfg.cache) / "meta.json").is_file()):
        raise FileNotFoundError(f"no dVAE checkpoint at {cfg.dvae} (train one with `dalle-fast train-vae`)")
    info = distributed.setup(cfg.device)
    out = Path(cfg.out)
    cache = prepare_cache(cfg, info)
    check_batch_size(cache, cfg.batch_size, info)  # before OUT is touched
    tokenizer = TextTokenizer.load(cache.tokenizer_path)
    model_cfg = model_config(cfg, cache, tokenizer)
    torch.manual_seed(cfg.seed)
    model = Prior(model_cfg).to(info.device)
    if cfg.init and not (cfg.resume and checkpoint_file(out).is_file()):  # a resume brings its own weights
        _load_init(model, cfg.init, tokenizer, cache)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True)
    optimizer = _optimizer(model, cfg)
    record = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
              "cache": {**cache.meta, "path": str(cache.root)}}
    null_gen = torch.Generator(device=info.device).manual_seed(cfg.seed * 1000 + 7 + info.rank)
    null_text = tokenizer.null_text(model_cfg.text_len).to(info.device)
    run = TrainingRun(out, info, modules={"model": model, "ema": ema}, optimizer=optimizer,
                      generators={f"null{info.rank}": null_gen},
                      meta={"model_config": dataclasses.asdict(model_cfg), "kind": "prior",
                            "inputs": {"dVAE": cache.meta.get("dvae_weights"), "tokenizer": tokenizer.fingerprint()}},
                      record=record,
                      resume=cfg.resume, steps=cfg.steps, run_steps=cfg.run_steps, desc="train-prior")
    if info.is_main:
        copy_file(cache.tokenizer_path, out / "tokenizer.json")  # a run folder is self-contained
        print(f"prior: {model_cfg.num_params() / 1e6:.2f}M parameters, {len(cache)} cached images, "
              f"image-token unigram entropy {cache.unigram_entropy():.3f} nats")
    objective = _wrap(model, cfg, info)
    data = batches(cache, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, info=info, step=run.step)
    tokens_per_step = cfg.batch_size * info.world_size * model_cfg.seq_len
    model.train()
    with run.guard():
        while run.running:
            step = run.step
            text, image = (t.to(info.device, non_blocking=True) for t in next(data))
            if cfg.word_dropout > 0:
                text = drop_words(text, tokenizer.bpe_vocab_size, cfg.word_dropout, null_gen)
            if cfg.null_caption > 0:
                text = drop_captions(text, null_text, cfg.null_caption, null_gen)
            lr = warmup_cosine(step, cfg.lr, cfg.lr_end, cfg.warmup, cfg.steps)
            with autocast(cfg, info):
                result = objective(text, image)
            run.update(result["loss"], lr, model, ema, cfg.grad_clip)
            step = run.step
            log = run.should_log(cfg.log_every)
            metrics = {}
            if log:
                stats = torch.stack([result[k].detach().float() for k in ("loss", "text_loss", "image_loss")])
                stats = distributed.mean_over_ranks(stats).tolist()
                metrics = dict(zip(("loss", "text_loss", "image_loss"), stats))
                metrics.update(lr=lr, tokens_per_s=run.per_second(tokens_per_step))
            run.end_step(metrics, log, cfg.save_every)
    ckpt = run.finish()
    distributed.teardown()
    return ckpt
