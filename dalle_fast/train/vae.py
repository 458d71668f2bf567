"""Stage 1 training: the dVAE on images (SPEC.md section 3), importable and behind `dalle-fast train-vae`.

AdamW, cosine schedules for learning rate, temperature and KL weight, EMA weights, gradient
clipping, bf16 autocast on GPU, reconstruction grids, safetensors checkpoints with exact resume
and data-parallel training under torchrun.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import IterableDataset

from .. import images as imageio
from ..data import RandomResizedCrop, make_dataset
from ..dvae import DVAE, DVAEConfig, code_counts, counts_perplexity, map_pixels, psnr
from . import distributed
from .loop import (RunOptions, TrainingRun, autocast, batches, check_batch_size, check_options, ema_with_warmup,
                   option as _f)
from .schedules import cosine


@dataclass
class TrainVAEConfig(RunOptions):
    data: str = _f("shapes", "dataset: 'shapes', a folder of image+caption pairs, or tar shards (*.tar, globs)")
    out: str = _f("runs/dvae", "run folder: checkpoint, metrics.jsonl, reconstruction grids")
    preset: str = _f("small", "model preset (DVAEConfig.preset): paper, small, tiny, ...")
    colour_codes: int = _f(0, "factor each code into (colour, shape): this many colour codes, a palette over the hue "
                              "around each cell, and vocab / this many shape codes from brightness alone (see "
                              "dvae.FactoredEncoder); 0: plain codes. --usage then counts the shape codes and needs "
                              "to be larger: on shapes with 8 colour codes and --usage 0.1 "
                              "the shape codes collapsed to one within 40 steps, with 3 they did not")
    steps: int = _f(2000, "total optimizer steps")
    batch_size: int = _f(32, "images per step per process")
    lr: float = _f(1e-3, "peak learning rate (the paper: 1e-4 for its 256 px model)")
    lr_end: float = _f(1.25e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    tau_start: float = _f(1.0, "Gumbel-softmax temperature at step 0")
    tau_end: float = _f(1 / 16, "temperature at the end of its cosine schedule")
    tau_steps: int = _f(0, "length of the temperature schedule (0: the whole run)")
    beta_end: float = _f(6.6, "KL weight reached at the end of its cosine warm-up from 0")
    beta_steps: int = _f(0, "length of the KL-weight schedule (0: a quarter of the run)")
    usage: float = _f(0.0, "weight of KL(batch-mean code distribution || uniform), against codebook collapse "
                           "(not in the paper; 0: off)")
    mse: float = _f(0.0, "weight of the squared error of the decoder mean, beside the logit-Laplace NLL (not in the "
                         "paper; on flat synthetic colours it separates the colours in hundreds of steps instead "
                         "of thousands; 0: off)")
    logit_init: float = _f(1.0, "scale of the encoder's output conv at initialisation (OpenAI's init gives logits "
                                "of std ~0.1, far under the Gumbel noise's 1.3: the decoder then sees noise); with "
                                "--colour-codes also the colour palette's scale (logit margin per squared hue distance)")
    palette_images: int = _f(256, "with --colour-codes: images whose hues' k-means palette starts the colour codes")
    ema: float = _f(0.999, "EMA decay of the weights used for reconstructions and tokens")
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)")
    sample_every: int = _f(250, "steps between reconstruction grids")
    crop: bool = _f(False, "augment with the paper's random crops (data.RandomResizedCrop.paper(): a square of 2/3 to "
                           "8/9 of the image's short side at a random place, flipped left-right half the time) "
                           "instead of the centred square; synthetic shapes are never cropped")


def pooled_perplexity(tokens: torch.Tensor, vocab: int) -> float:
    """The codebook perplexity of every process's `tokens` together (each process holds as many)."""
    return counts_perplexity(distributed.mean_over_ranks(code_counts(tokens, vocab))).item()


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _fit_palette(model: DVAE, dataset, cfg: TrainVAEConfig, info: distributed.DistInfo) -> None:
    """Start the colour codes at the k-means palette of the hues of `cfg.palette_images` training
    images (rank 0's; DDP hands its weights to the other ranks)."""
    n = cfg.palette_images
    if not isinstance(dataset, IterableDataset):
        n = min(n, len(dataset) // info.world_size)
    sample = _images(next(batches(dataset, batch_size=max(1, n), seed=cfg.seed, workers=0, info=info, step=0)))
    model.encoder.fit_palette(map_pixels(sample.to(info.device).float(), model.config.logit_laplace_eps),
                              scale=cfg.logit_init)


def train_vae(cfg: TrainVAEConfig) -> Path:
    """Run (or resume) a dVAE training; returns the checkpoint path."""
    check_options(cfg)
    info = distributed.setup(cfg.device)
    out = Path(cfg.out)
    model_cfg = DVAEConfig.preset(cfg.preset, colour_codes=cfg.colour_codes)
    crop = RandomResizedCrop.paper() if cfg.crop else None
    dataset = make_dataset(cfg.data, size=model_cfg.image_size, seed=cfg.seed, crop=crop)  # bad --data: before OUT
    check_batch_size(dataset, cfg.batch_size, info)
    torch.manual_seed(cfg.seed)
    model = DVAE(model_cfg).to(info.device)
    with torch.no_grad():  # before the EMA copy and before a resumed checkpoint replaces it
        for conv in model.encoder.output_convs():
            conv.weight.mul_(cfg.logit_init)
    if model_cfg.colour_codes:
        _fit_palette(model, dataset, cfg, info)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema), use_buffers=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    noise = torch.Generator(device=info.device).manual_seed(cfg.seed * 1000 + info.rank)
    run = TrainingRun(out, info, modules={"model": model, "ema": ema}, optimizer=optimizer,
                      generators={f"noise{info.rank}": noise},
                      meta={"model_config": dataclasses.asdict(model_cfg), "kind": "dvae"},
                      record={"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)},
                      resume=cfg.resume, steps=cfg.steps, run_steps=cfg.run_steps, desc="train-vae")

    objective = distributed.data_parallel(model, info)
    tau_steps = cfg.tau_steps or cfg.steps
    beta_steps = cfg.beta_steps or max(1, cfg.steps // 4)
    fixed = None  # the batch shown in reconstruction grids

    def sample_grid(tag: str):
        if info.is_main and fixed is not None:
            ema.module.eval()
            with torch.no_grad():
                recon = ema.module.decode(ema.module.encode(fixed))
            path = imageio.save_grid(torch.cat([fixed, recon]).cpu(), out / f"recon_{tag}.png", nrow=len(fixed), scale=2)
            shutil.copyfile(path, out / "recon_latest.png")

    data = batches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, info=info, step=run.step)
    model.train()
    with run.guard():
        while run.running:
            step = run.step
            images = _images(next(data)).to(info.device, non_blocking=True)
            if fixed is None:
                fixed = images[:8].detach().clone()
            lr = cosine(step, cfg.lr, cfg.lr_end, cfg.steps)
            tau = cosine(step, cfg.tau_start, cfg.tau_end, tau_steps)
            beta = cosine(step, 0.0, cfg.beta_end, beta_steps)
            with autocast(cfg, info):
                result = objective(images, tau, beta, noise, cfg.usage, cfg.mse)
            run.update(result["loss"], lr, model, ema, cfg.grad_clip)
            step = run.step
            log = run.should_log(cfg.log_every)
            metrics = {}
            if log:
                with torch.no_grad():
                    tokens = result["tokens"]
                    stats = torch.tensor([result["loss"].item(), result["nll"].item(), result["kl"].item(),
                                          result["usage_kl"].item(), result["mse"].item(),
                                          psnr(result["recon"].float(), images.float()).item()], device=info.device)
                    stats = distributed.mean_over_ranks(stats).tolist()
                    # of every process's codes together: a mean of per-process perplexities is biased
                    # low by each one's few tokens, and more so the more processes there are
                    stats.append(pooled_perplexity(tokens, model_cfg.vocab))
                metrics = dict(zip(("loss", "nll", "kl", "usage_kl", "mse", "psnr", "perplexity"), stats))
                metrics.update(tau=tau, beta=beta, lr=lr)
            run.end_step(metrics, log, cfg.save_every)
            if step % cfg.sample_every == 0:
                sample_grid(f"{step:06d}")
    ckpt = run.finish()
    sample_grid("final" if run.complete else f"{run.step:06d}")
    distributed.teardown()
    return ckpt
