"""`dalle-fast ...`: thin subcommands over the package (also `python -m dalle_fast.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing


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


def _cmd_train_vae(args) -> int:
    from .train.vae import TrainVAEConfig, train_vae

    path = train_vae(_config(TrainVAEConfig, args))
    print(f"checkpoint: {path}")
    return 0


def _cmd_train_prior(args) -> int:
    from .train.prior import TrainPriorConfig, train_prior

    path = train_prior(_config(TrainPriorConfig, args))
    print(f"checkpoint: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train.prior import TrainPriorConfig
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"dalle-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
