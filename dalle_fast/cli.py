"""`dalle-fast ...`: thin subcommands over the package (also `python -m dalle_fast.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of a config dataclass, with its help text and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{help_text} (default: {f.default})")
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})")


def _config(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _cmd_info(args) -> int:
    import dalle_fast

    print(json.dumps(dalle_fast.backend_info(), indent=2))
    return 0


def _training_exit_code() -> int:
    """0 for a run that ended at its step budget (or --run-steps), 128 + the signal for one stopped
    by SIGTERM (143) or Ctrl-C (130): its checkpoint is written, and a scheduler that requeues on
    a nonzero exit code runs it again (with --resume it continues where it stopped)."""
    from .train.loop import stopped_by_signal

    signum = stopped_by_signal()
    return 128 + signum if signum else 0


def _cmd_train_vae(args) -> int:
    from .train.vae import TrainVAEConfig, train_vae

    path = train_vae(_config(TrainVAEConfig, args))
    print(f"checkpoint: {path}")
    return _training_exit_code()


def _cmd_train_prior(args) -> int:
    from .train.prior import TrainPriorConfig, train_prior

    path = train_prior(_config(TrainPriorConfig, args))
    print(f"checkpoint: {path}")
    return _training_exit_code()


def _cmd_train_tokenizer(args) -> int:
    import itertools

    from .atomic import set_aside
    from .data import make_dataset
    from .tokenizer import TextTokenizer

    if args.num_captions < 1:
        raise ValueError(f"--num-captions must be >= 1, got {args.num_captions}")
    try:
        TextTokenizer.check_vocab_size(args.vocab)
    except ValueError as exc:
        raise ValueError(f"--vocab: {exc}") from None
    out = _check_out(args.out, folder=False)  # before reading the captions
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {args.out}: its folder {out.parent} cannot be written")
    # images are read at the smallest useful size; one process reads every shard, even with RANK /
    # WORLD_SIZE in its environment (a launcher's), which would otherwise split the stream
    dataset = make_dataset(args.data, size=16, seed=args.seed, split_ranks=False)
    captions = [caption for _, caption in itertools.islice(iter(dataset), args.num_captions)]
    if not captions:
        raise ValueError(f"{args.data} holds no image-caption pairs")
    tokenizer = TextTokenizer.train(captions, vocab_size=args.vocab)
    if out.exists():  # as a training run sets the run before aside
        print(f"the tokenizer that was at {out} is now {set_aside(out)}")
    tokenizer.save(out)
    print(f"tokenizer: {out} ({tokenizer.bpe_vocab_size} BPE ids from {len(captions)} captions)")
    return 0


def _cmd_generate(args) -> int:
    import time

    from . import images as imageio
    from .atomic import atomic_write_all, unmade_on_failure
    from .pipeline import check_prime, check_request, generate, load_models

    if (args.prime is None) != (args.rows is None):
        raise ValueError("--prime IMAGE and --rows R go together")
    sampling = _sampling(args)
    device = _device(args.device)
    keep = min(4, args.num) if args.keep is None else args.keep
    check_request(args.prompt, args.num, keep, args.seed, args.batch)  # a bad request leaves no --out folder behind
    t0 = time.perf_counter()
    models = load_models(args.model, device=device)
    load_s = time.perf_counter() - t0
    if args.prime is not None:  # --rows against the model's grid, and the image readable
        check_prime(args.prime, args.rows, models.dvae.config.grid)
    at_once = args.num if args.batch is None else min(args.batch, args.num)
    with unmade_on_failure([args.out]):  # a failed or interrupted run leaves no empty folder behind
        out = _out_folder(args.out)  # before the sampling, not after it
        with _memory_advice(f"sampling {at_once} candidates at once on {device}",
                            "sample fewer at a time with --batch (or lower --num)"):
            result = generate(models, args.prompt, num=args.num, keep=keep, seed=args.seed, sampling=sampling,
                              prime_image=args.prime, prime_rows=args.rows or 0, batch=args.batch)

        # all written before any is renamed in: a failure leaves the earlier run's images, not a mix
        def png(image):
            return lambda tmp: imageio.to_pil(image).save(tmp)  # the temporary's name ends in .png

        files = {out / f"rank{rank}.png": png(image) for rank, image in enumerate(result.images)}
        files[out / "grid.png"] = lambda tmp: imageio.save_grid(result.images, tmp, scale=args.grid_scale)
        # an earlier run's ranks that this one does not write (it kept more): not this run's images
        stale = [p for p in out.glob("rank*.png") if p.name[len("rank"):-len(".png")].isdigit() and p not in files]
        atomic_write_all(files, remove=stale)
    ranked = "reranked" if result.scores is not None else "in sampling order (the model folder has no reranker)"
    print(f"{result.num_sampled} candidates sampled, best {len(result.images)} {ranked} -> {out}/rank*.png, "
          f"{out}/grid.png")
    print(f"{result.seconds:.2f} s for {result.num_sampled} images: {result.seconds / result.num_sampled * 1e3:.0f} ms "
          f"per image on {device} (models loaded in {load_s:.2f} s from {models.folder})")
    return 0


def _cmd_export_model(args) -> int:
    import torch

    from .pipeline import export_model_folder

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    prior = Path(args.prior)
    tokenizer = Path(args.tokenizer) if args.tokenizer else (prior if prior.is_dir() else prior.parent) / "tokenizer.json"
    _check_out(args.out, folder=True)
    out = export_model_folder(args.out, dvae=args.dvae, prior=prior, reranker=args.reranker, tokenizer=tokenizer,
                              dtype=dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"model folder {out}: {', '.join(sorted(f.name for f in out.iterdir()))} ({size:.1f} MiB)")
    return 0


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0, off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    parser.add_argument("--cond-scale", type=float, default=1.0,
                        help="classifier-free guidance scale: null + s * (caption - null); 1 is off and one "
                             "pass, > 1 samples a second, empty-caption batch (default: 1.0)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the prior's sampling step (fuses its small kernels; the first "
                             "call compiles for seconds to a minute, so it pays off for large batches or many calls)")


def _device(name: str):
    """--device: auto (CUDA when torch sees a device), cpu, cuda or cuda:N, checked before any work."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def _check_out(path: str, *, folder: bool) -> Path:
    """--out as a Path, refused before any work where it cannot be written: a folder where a file
    is wanted or the reverse, or a file where one of its parent folders would be."""
    if not str(path).strip():  # an unset shell variable: not the current folder, whose files we would replace
        raise ValueError("--out is empty; name the output (use '.' for the current folder)")
    out = Path(path)
    kinds = ("folder", "file") if folder else ("file", "folder")
    if out.exists() and out.is_dir() != folder:
        raise ValueError(f"--out {path} is a {kinds[1]}, not a {kinds[0]}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {path}: {parent} is a file, not a folder")
            break
    return out


def _out_folder(path: str) -> Path:
    """The output folder, made now so that a bad --out fails before minutes of work."""
    out = _check_out(path, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _memory_advice(doing: str, advice: str):
    """Running out of memory while `doing` becomes a one-line error with `advice`: on CUDA
    torch.OutOfMemoryError, on the CPU a RuntimeError from the allocator or a MemoryError."""
    import torch

    try:
        yield
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(exc):
            raise
        raise ValueError(f"out of memory {doing}: {advice}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


MAX_GRID_SCALE = 8  # a 256-pixel model's images at 2048 pixels; larger only costs memory (a MemoryError at 10**4)


def _grid_scale(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_GRID_SCALE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_GRID_SCALE}, got {value}")
    return value


def _sampling(args):
    from .sampler import SamplingConfig

    if args.compile:  # the first step compiles silently for seconds to a minute: say so
        print("--compile: compiling the prior's sampling step (seconds to a minute, first call only)", file=sys.stderr, flush=True)
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          cond_scale=args.cond_scale, compile_step=args.compile)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate images for a text prompt (reranked, best first)")
    gen.add_argument("prompt", help="the caption of the images to generate")
    gen.add_argument("--num", type=int, default=16, help="candidates sampled, as one batch unless --batch "
                     "(default: 16)")
    gen.add_argument("--batch", type=int, default=None, help="sample the candidates this many at a time: less "
                     "memory (the first batch draws what one batch would; the later ones other images) "
                     "(default: all at once)")
    gen.add_argument("--keep", type=int, default=None, help="best candidates written out (default: 4, or --num if "
                     "fewer)")
    gen.add_argument("--out", default="samples", help="output folder for rank*.png and grid.png, replacing an earlier "
                     "run's (default: samples)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2**32 - 1 (default: 0)")
    gen.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    gen.add_argument("--prime", default=None, metavar="IMAGE", help="image whose top rows are kept (image priming)")
    gen.add_argument("--rows", type=int, default=None, help="with --prime: how many token rows to keep")
    _add_sampling_args(gen)
    gen.add_argument("--grid-scale", type=_grid_scale, default=2,
                     help=f"pixel scale of grid.png, 1 to {MAX_GRID_SCALE} (default: 2)")
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    gen.set_defaults(run=_cmd_generate)
    exp = sub.add_parser("export-model", help="write a model folder for `generate` from training runs")
    exp.add_argument("--dvae", required=True, help="train-vae run folder or checkpoint")
    exp.add_argument("--prior", required=True, help="train-prior run folder or checkpoint")
    exp.add_argument("--reranker", default=None, help="train-reranker run folder or checkpoint (optional)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the prior run's)")
    exp.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"),
                     help="weight precision on disk (default: float16)")
    exp.add_argument("--out", required=True, help="model folder to write")
    exp.set_defaults(run=_cmd_export_model)


def _cmd_train_reranker(args) -> int:
    from .train.reranker import TrainRerankerConfig, train_reranker

    path = train_reranker(_config(TrainRerankerConfig, args))
    print(f"checkpoint: {path}")
    return _training_exit_code()


def _cmd_eval_shapes(args) -> int:
    from .atomic import unmade_on_failure
    from .evaluate import evaluate_shapes, format_report, select_captions
    from .pipeline import load_models

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    sampling = _sampling(args)
    models = load_models(args.model, device=_device(args.device))
    try:  # a fraction of a second: the test split has enough captions
        select_captions(models.dvae.config.image_size, args.captions, args.seed)
    except ValueError as exc:
        raise ValueError(f"--captions {args.captions}: {exc}") from None

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"{done}/{total} captions", file=sys.stderr, flush=True)

    with unmade_on_failure([args.out]):  # a failed or interrupted evaluation leaves no empty folder behind
        out = _out_folder(args.out)  # once the inputs are good: a bad one leaves no --out folder behind
        with _memory_advice(f"sampling {args.candidates} candidates at once on {models.device}",
                            "lower --candidates"):
            report = evaluate_shapes(models, num_captions=args.captions, candidates=args.candidates, seed=args.seed,
                                     sampling=sampling, out_json=out / "eval.json", out_png=out / "samples.png",
                                     progress=progress)
    print(format_report(report))
    print(f"-> {out / 'eval.json'}, {out / 'samples.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train.prior import TrainPriorConfig
    from .train.reranker import TrainRerankerConfig
    from .train.vae import TrainVAEConfig

    parser = argparse.ArgumentParser(prog="dalle-fast", description="DALL-E with fast sparse-attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which kernels are built and usable here, and why not")
    info.set_defaults(run=_cmd_info)
    vae = sub.add_parser("train-vae", help="train the discrete VAE (stage 1); torchrun for several processes")
    _add_dataclass_args(vae, TrainVAEConfig)
    vae.set_defaults(run=_cmd_train_vae)
    prior = sub.add_parser("train-prior", help="train the transformer prior (stage 2) on a trained dVAE's tokens; "
                                               "torchrun for several processes")
    _add_dataclass_args(prior, TrainPriorConfig)
    prior.set_defaults(run=_cmd_train_prior)
    tok = sub.add_parser("train-tokenizer", help="train the byte-level BPE on a dataset's captions (train-prior "
                                                 "and train-reranker take it with --tokenizer)")
    tok.add_argument("--data", default="shapes", help="dataset: 'shapes', a folder or tar shards (default: shapes)")
    tok.add_argument("--num-captions", type=int, default=20000, help="captions read (default: 20000)")
    tok.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary size (default: 16384; small corpora "
                                                             "stop earlier)")
    tok.add_argument("--seed", type=int, default=0, help="caption pick of folders with several lines (default: 0)")
    tok.add_argument("--out", required=True, help="tokenizer.json to write")
    tok.set_defaults(run=_cmd_train_tokenizer)
    rerank = sub.add_parser("train-reranker", help="train the contrastive reranker of samples on image-caption "
                                                   "pairs, with the prior's tokenizer")
    _add_dataclass_args(rerank, TrainRerankerConfig)
    rerank.set_defaults(run=_cmd_train_reranker)
    _add_generate(sub)
    ev = sub.add_parser("eval-shapes", help="zero-shot accuracy on shapes test captions, seen and held-out pairs, "
                                            "judged by a pixel detector")
    ev.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ev.add_argument("--captions", type=_positive_int, default=50, help="captions of each kind, seen and held-out "
                    "(default: 50)")
    ev.add_argument("--candidates", type=_positive_int, default=8, help="images sampled per caption (default: 8)")
    ev.add_argument("--seed", type=int, default=0, help="caption selection and sampling seed (default: 0)")
    ev.add_argument("--out", default="eval-shapes", help="folder for eval.json and samples.png (default: eval-shapes)")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    _add_sampling_args(ev)
    ev.set_defaults(run=_cmd_eval_shapes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    # bad input or files (UnreadableImage is a ValueError), a diverged training (FloatingPointError): a message
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"dalle-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
