"""What the training loops share: resumable batches, the run folder, checkpoints, progress and
interrupts. Each loop (vae.py, prior.py, ...) keeps only its own model, objective and metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, IterableDataset

from . import distributed
from ..atomic import atomic_write, remove_stale_temporaries, set_aside
from ..checkpoint import load_checkpoint, read_info, rng_tensors, save_checkpoint
from .progress import Progress, drop_metrics_after
from .sampler import ResumableSampler


def option(default, help: str, **kw):
    """A config dataclass field with the help text that `dalle-fast`'s flags show."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class RunOptions:
    """The options every training command shares (its config dataclass extends this one)."""

    seed: int = option(0, "seed of the data order, initialisation and noise")
    workers: int = option(0, "DataLoader worker processes")
    log_every: int = option(10, "steps between metrics lines")
    save_every: int = option(500, "steps between checkpoints (one is always written at the end)")
    run_steps: int = option(0, "stop after this many steps in this invocation (0: run to the end); "
                               "with --resume, for time-sliced jobs")
    resume: bool = option(False, "continue from OUT/checkpoint.safetensors if it exists (same architecture); "
                                 "the options given now (learning-rate schedule, weight decay, --text-lr-scale, "
                                 "...) apply from its step on")
    device: str = option("auto", "auto, cpu or cuda")
    amp: bool = option(True, "bf16 autocast on CUDA")


# Ranges of the options the training commands share, checked before any work: a bad value fails
# at once instead of after minutes of training (a zero tau, a modulo by a zero interval) or
# quietly misbehaving (a negative learning rate climbs the loss; an EMA decay outside [0, 1]
# extrapolates).
_POSITIVE = ("steps", "batch_size", "lr", "tau_start", "tau_end", "text_variants", "pair_captions", "logit_init",
             "palette_images")
_NON_NEGATIVE = ("workers", "run_steps", "lr_end", "weight_decay", "grad_clip", "warmup", "mse", "usage",
                 "tau_steps", "beta_steps", "beta_end", "powersgd_rank", "num_images", "text_len", "layers",
                 "d_model", "heads")
_PROBABILITY = ("bpe_dropout", "null_caption", "word_dropout")  # in [0, 1): at 1 nothing would be left


def check_options(cfg) -> None:
    """Refuse out-of-range shared options of a training config (a RunOptions dataclass)."""
    values = dataclasses.asdict(cfg)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if (name.endswith("_every") or name in _POSITIVE) and not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
        if name in _NON_NEGATIVE and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
        if name in _PROBABILITY and not 0.0 <= value < 1.0:
            raise ValueError(f"{flag} must be in [0, 1), got {value}")
    if "out" in values and not str(values["out"]).strip():  # an unset $OUT: the run would take the current folder
        raise ValueError("--out must name a folder, got an empty one")
    if "seed" in values and not 0 <= values["seed"] < 2**32:  # seed * 1000 + rank seeds a generator
        raise ValueError(f"--seed must be in [0, 2**32), got {values['seed']}")
    if "ema" in values and not 0.0 <= values["ema"] <= 1.0:
        raise ValueError(f"--ema must be in [0, 1], got {values['ema']}")
    # A warm-up as long as the run would end at (or before) the peak learning rate, never decaying.
    if "warmup" in values and values["warmup"] >= values["steps"]:
        raise ValueError(f"--warmup {values['warmup']} must be less than --steps {values['steps']} (the "
                         "learning rate decays after the warm-up)")


def decay_groups(params, weight_decay: float, **extra) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (linear, conv and embedding weights), none
    on biases, norm gains or scalars; `extra` goes into both groups."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **extra},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **extra}]


def autocast(options: RunOptions, info: distributed.DistInfo):
    """bf16 autocast on CUDA when `--amp` (the default); a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=options.amp and info.device.type == "cuda")


def _loader(dataset, batch_size: int, seed: int, workers: int, info: distributed.DistInfo,
            sampler: Optional[ResumableSampler]) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)


def check_batch_size(dataset, batch_size: int, info: distributed.DistInfo) -> int:
    """A map-style dataset's batches per epoch on each process; a ValueError where that is none. The
    trainers call it before TrainingRun sets up OUT (batches' own call comes at the first batch)."""
    if isinstance(dataset, IterableDataset):
        return 0  # a stream's length is unknown: _stream_batches says when a pass gives no batch
    share = ResumableSampler(len(dataset), 0, info.rank, info.world_size).share()
    if share < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {share} items per process")
    return share // batch_size


def batches(dataset, *, batch_size: int, seed: int, workers: int, info: distributed.DistInfo,
            step: int) -> Iterator:
    """Batches from `step` on, forever, in the order an uninterrupted run would see them."""
    if isinstance(dataset, IterableDataset):
        yield from _stream_batches(dataset, batch_size, seed, workers, info, step)
        return
    sampler = ResumableSampler(len(dataset), seed, info.rank, info.world_size)
    per_epoch = check_batch_size(dataset, batch_size, info)
    epoch, offset = divmod(step, per_epoch)
    while True:
        sampler.set_position(epoch, offset * batch_size)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from _loader(dataset, batch_size, seed, workers, info, sampler)
        epoch, offset = epoch + 1, 0


def _stream_batches(dataset: IterableDataset, batch_size: int, seed: int, workers: int, info: distributed.DistInfo,
                    step: int) -> Iterator:
    """A stream's batches (tar shards), epoch after epoch: a stream has no index to seek to, so a
    resumed run reads past the batches before `step` again, which decodes their images but keeps
    every later batch exact (each epoch's order is a function of the seed and the epoch)."""
    epoch, skip = 0, step
    if skip and info.is_main:
        print(f"resuming a stream of tar shards: reading past its first {skip} batches", flush=True)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        produced = 0
        for batch in _loader(dataset, batch_size, seed, workers, info, None):
            produced += 1
            if skip:
                skip -= 1
                continue
            yield batch
        if produced == 0:
            raise ValueError(f"a whole pass over the data gave no batch of {batch_size} (fewer readable samples "
                             f"than the batch size in each of the {max(workers, 1)} loader processes)")
        epoch += 1


def ema_with_warmup(decay: float):
    """EMA update for AveragedModel whose decay ramps up as min(decay, (1 + n) / (10 + n)) over
    the first updates, so a short run's EMA weights are not still its initialisation."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, weight)

    return update


# Set by the SIGTERM / SIGINT handlers of any run in this process: the command line then exits
# with 128 + the signal (143 for SIGTERM, as schedulers that requeue preempted jobs expect; 130 for
# Ctrl-C) after the checkpoint is written, instead of 0 (a finished run).
_stopped_by: Optional[int] = None


def stopped_by_signal() -> Optional[int]:
    """The signal (SIGTERM, SIGINT) that stopped a run in this process early, its checkpoint saved."""
    return _stopped_by


class TrainingRun:
    """A run folder `out` holding checkpoint.safetensors, config.json and metrics.jsonl.

    With `resume` and an existing checkpoint, the modules, optimizer, generators and RNG states
    are restored and `step` continues, unless `meta["inputs"]` (what the run learns from: the
    dVAE's weights, the tokenizer) differs from the checkpoint's, a ValueError. Otherwise the folder
    starts afresh: an earlier run's checkpoint there becomes checkpoint.previous.safetensors (a
    --resume after this run died before its first save would otherwise continue the earlier run).
    `guard()` turns Ctrl-C and SIGTERM into a stop at the next step boundary, one that every process
    of a distributed run agrees on, and closes the progress bar; `finish()` writes the last checkpoint.
    """

    def __init__(self, out: str | Path, info: distributed.DistInfo, *, modules: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], meta: dict,
                 record: dict, resume: bool, steps: int, run_steps: int, desc: str):
        self.out, self.info = Path(out), info
        self.ckpt = self.out / "checkpoint.safetensors"
        self.modules, self.optimizer, self.generators, self.meta = modules, optimizer, generators, meta
        self.step = 0
        self._saved: Optional[int] = None  # the step of the checkpoint this run wrote or resumed from
        elapsed = 0.0  # training time before this invocation, for metrics.jsonl's time_s
        if self.ckpt.exists():
            self._check_kind(resume)  # before anything is moved or loaded
        if not resume:
            distributed.barrier()  # every process has read the checkpoint's kind before the main one moves it
        if resume and self.ckpt.exists():
            self._check_inputs()  # before anything is loaded
            # The checkpoint's parameter groups would bring back the old run's weight decay and
            # learning-rate scales: the options given now apply from the resumed step on.
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            state = load_checkpoint(self.ckpt, modules=modules, optimizer=optimizer, generators=generators,
                                    rank=info.rank)
            for group, options in zip(optimizer.param_groups, hyper):
                group.update(options)
            self.step = self._saved = state["step"]
            elapsed = float(state["meta"].get("time_s", 0.0))
            if info.is_main:
                print(f"resuming from {self.ckpt} at step {self.step}")
                drop_metrics_after(self.out / "metrics.jsonl", self.step)
        elif info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.ckpt.exists():  # the run before, with its record, is set aside (replacing one set aside before)
                for name in ("checkpoint.safetensors", "metrics.jsonl", "config.json"):
                    path = self.out / name
                    if path.exists():
                        set_aside(path)
                print(f"a fresh run (no --resume): the run before is now {self.out}/*.previous.* (its checkpoint, "
                      "metrics and config)", flush=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)  # a run that died before its first save
        if info.is_main:
            remove_stale_temporaries(self.ckpt)  # the writes of a run killed while saving
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        distributed.barrier()
        self.steps = steps
        self.stop = steps if not run_steps else min(steps, self.step + run_steps)
        self.progress = Progress(steps, self.step, self.out / "metrics.jsonl", info.is_main, desc, elapsed)
        self._clock = (time.perf_counter(), self.step)
        self._terminated = False  # this process got a signal
        self._signal = 0  # which (0: none)
        self._agreed = 0  # the signal any process got, as all of them agreed at the last step boundary
        # every step, the processes of a distributed run agree on whether to stop, over a CPU group (no device sync)
        self._flags = distributed.cpu_group() if info.enabled else None

    def _check_kind(self, resume: bool) -> None:
        """A ValueError if OUT's checkpoint is of another kind of model than this run's (a dVAE's in
        a reranker run's --out): a fresh run would set it aside, a resumed one could not load it."""
        ours = self.meta.get("kind")
        try:
            theirs = read_info(self.ckpt)["meta"].get("kind")
        except (ValueError, OSError) as exc:
            if resume:
                raise
            # a damaged file (an interrupted copy): set aside like any other, not a reason to refuse the run
            warnings.warn(f"{self.ckpt} cannot be read ({exc}); the fresh run sets it aside unchecked", stacklevel=3)
            return
        if ours is not None and theirs is not None and theirs != ours:
            what = "resume it" if resume else "start there (it would set that run aside)"
            raise ValueError(f"{self.out} holds a {theirs} run's checkpoint: a {ours} run cannot {what}; "
                             "pass another --out")

    def _check_inputs(self) -> None:
        """A ValueError if the checkpoint learnt from other inputs than this run's (meta["inputs"])."""
        theirs = read_info(self.ckpt)["meta"].get("inputs", {})
        ours = self.meta.get("inputs", {})
        differ = [key for key, value in ours.items() if None not in (value, theirs.get(key)) and theirs[key] != value]
        if differ:
            raise ValueError(f"--resume: {self.ckpt} was trained with another {' and another '.join(differ)} than "
                             f"this run's; resume with the ones it was trained with, or pass another --out")

    @property
    def running(self) -> bool:
        stopping = self._agreed if self.info.enabled else self._terminated
        return self.step < self.stop and not stopping

    def _agree(self) -> None:
        """At a step boundary, every process of a distributed run learns whether any got a signal;
        they all stop after the same step (one process leaving for the final save while the others
        wait in the next step's all-reduce would hang them all, with nothing saved)."""
        global _stopped_by
        if self._flags is None:
            return
        agreed = distributed.max_over_ranks(self._signal, self._flags)
        if agreed and not self._agreed:
            if not self._signal:  # another process got it: this one exits as it will (143 or 130)
                _stopped_by = agreed
                if self.info.is_main:
                    print(f"\nanother process got {signal.Signals(agreed).name} at step {self.step}: stopping; "
                          "continue with --resume", flush=True)
        self._agreed = agreed

    @property
    def complete(self) -> bool:
        return self.step >= self.steps

    def update(self, loss: torch.Tensor, lr: float, model: torch.nn.Module, ema: Optional[AveragedModel],
               grad_clip: float) -> None:
        """One optimizer step on `loss` at learning rate `lr` (gradient norm clipped to `grad_clip`
        unless 0), then the EMA; advances `step`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)
        self.step += 1
        self._agree()

    def save(self) -> None:
        """Write the checkpoint, unless the weights went non-finite: a diverged state never replaces
        the last good checkpoint (FloatingPointError)."""
        finite = {name: torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all()
                  for name, module in self.modules.items()}
        bad = [name for name, ok in finite.items() if not ok]
        if bad:
            raise FloatingPointError(f"training diverged: non-finite weights in {', '.join(bad)} at step "
                                     f"{self.step}; {self._last_good()}")
        rank_rng = distributed.gather_to_all(rng_tensors(self.generators))  # each process's draws resume
        if self.info.is_main:
            self.progress.sync()
            save_checkpoint(self.ckpt, modules=self.modules, optimizer=self.optimizer, step=self.step,
                            meta={**self.meta, "time_s": round(self.progress.elapsed(), 3)}, rank_rng=rank_rng)
        distributed.barrier()
        self._saved = self.step

    def _last_good(self) -> str:
        """Where a diverged run's last good state is, if anywhere: a fresh run in an old run's
        folder has not written the checkpoint that may lie there."""
        if self._saved is None:
            return "this run wrote no checkpoint yet"
        return f"{self.ckpt} keeps the last good state, step {self._saved} (--resume continues from it)"

    def log(self, metrics: dict[str, float], log: bool) -> None:
        """Advance the bar; on a logging step, write the metrics (and stop on a non-finite one)."""
        if log and not all(math.isfinite(v) for v in metrics.values()):  # the checkpoint keeps the last good state
            raise FloatingPointError(f"training diverged: non-finite metrics at step {self.step}: {metrics}; "
                                     f"{self._last_good()}")
        self.progress.update(self.step, metrics, log)

    def per_second(self, units_per_step: float) -> float:
        """Throughput (tokens, images, ...) since the previous call, or since the run (re)started."""
        now, step = time.perf_counter(), self.step
        then, before = self._clock
        self._clock = (now, step)
        return units_per_step * (step - before) / max(now - then, 1e-9)

    def end_step(self, metrics: dict[str, float], log: bool, save_every: int) -> None:
        """`log`, then a checkpoint every `save_every` steps (the last one is `finish`'s)."""
        self.log(metrics, log)
        if self.step % save_every == 0 and self.running:
            self.save()

    def should_log(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.stop

    @contextlib.contextmanager
    def guard(self):
        """Ctrl-C and SIGTERM (a scheduler's preemption, `kill`) end the run after the current
        step, so `finish` saves a state `--resume` continues exactly, and the command line exits
        with 130 or 143 (`stopped_by_signal`). A second Ctrl-C quits at once without saving (an
        interrupt inside an update would save a half-applied step); the last checkpoint stays."""
        previous = {}
        self._installer = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._stop)
        try:
            yield self
        except KeyboardInterrupt:
            if self.info.is_main:
                print(f"\nquit at step {self.step} without saving; {self.ckpt} keeps the last checkpoint", flush=True)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.progress.close()

    def _stop(self, signum, frame) -> None:
        global _stopped_by
        if os.getpid() != self._installer:
            # A forked DataLoader worker, which inherited this handler and gets the terminal's Ctrl-C
            # too: it keeps serving batches (the step in progress may wait for one), and the
            # process running the training stops it with the others at the end.
            return
        _stopped_by = self._signal = signum
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt as usual
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.info.is_main and not self._terminated:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""
            print(f"\n{name} at step {self.step}: stopping after this step{again}; continue with --resume",
                  flush=True)
        self._terminated = True

    def finish(self) -> Path:
        self.save()
        return self.ckpt
