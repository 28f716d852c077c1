"""Command line: `prg-fast <command> ...` (also `python -m prg_fast ...`); DESIGN.md section 4.

    prg-fast pretrain --data DATA --path {gvp,icfm,otcfm} --model PRESET --steps N --batch-size B --out DIR
    prg-fast info

Adding a command (finetune, evaluate, extract, ...): write a function `add_<name>(subparsers)` that
creates its parser with `subparsers.add_parser(name, help=...)`, adds its options (reuse
`add_data_arguments` / `add_run_arguments` so the flags read the same everywhere) and sets
`func=<callable(args) -> exit code>` with `parser.set_defaults(...)`; then append it to COMMANDS.
Errors a user can fix (bad values, missing files, unusable checkpoints) are printed as one line
and exit with status 2; set PRG_FAST_TRACEBACK=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

__all__ = ["main", "build_parser", "COMMANDS", "add_data_arguments", "add_run_arguments",
           "positive_int", "nonnegative_int", "nonnegative_float"]


# -------------------------------------------------------------------------------------------------
# argument types: argparse turns their ArgumentTypeError into "argument --x: <message>"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data and the augmentation flags, shared by every command that reads a data set."""
    parser.add_argument("--data", required=required, metavar="DATA",
                        help="digits | cifar10:PATH (cifar-10-batches-py) | folder:PATH (PATH/{train,test}/<class>/*.png|jpg)")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flips (default: on for cifar10/folder, off for digits)")
    parser.add_argument("--crop-padding", type=nonnegative_int, default=0, metavar="P",
                        help="random crops after reflect-padding by P pixels (0: off)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--out, --seed, --device, --no-progress, shared by every command that writes a run directory."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run directory: checkpoint, metrics.json; an existing checkpoint there is resumed")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


# -------------------------------------------------------------------------------------------------
# commands


def add_pretrain(subparsers) -> None:
    from .models.unet import PRESETS
    from .paths import PATHS
    from .ode import SOLVERS
    from .training.pretrain import PretrainConfig

    d = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain", help="flow-matching pretraining of a velocity network",
        description="Flow-matching pretraining (GVP / ICFM / OTCFM) of a UNet velocity network. Runs on one "
                    "process, or under `torchrun --nproc_per_node N` with DistributedDataParallel.")
    add_data_arguments(p)
    p.add_argument("--path", choices=sorted(PATHS), default=d.path, help=f"probability path (default {d.path})")
    p.add_argument("--sigma", type=nonnegative_float, default=d.sigma, help="ICFM/OTCFM path noise (default 0)")
    p.add_argument("--model", choices=sorted(PRESETS), default=d.model, help=f"UNet preset: tiny for 8x8 images (digits; 2 levels, CPU-sized), cifar or prg32 for 32x32 "
                        f"(4 levels, attention at 16x16, and prg32 also at 8x8; GPU-sized) (default {d.model})")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps in total (default {d.steps})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"global batch, split over processes (default {d.batch_size})")
    add_run_arguments(p)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=d.optimizer)
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay)
    p.add_argument("--warmup", type=nonnegative_int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--grad-clip", type=nonnegative_float, default=d.grad_clip,
                   help=f"max gradient norm, 0 disables (default {d.grad_clip:g})")
    p.add_argument("--ema-decay", type=nonnegative_float, default=d.ema_decay,
                   help=f"EMA decay, ramped as min(decay, (1+n)/(10+n)) (default {d.ema_decay:g})")
    p.add_argument("--dropout", type=nonnegative_float, default=None, help="override the preset's dropout")
    p.add_argument("--eps", type=nonnegative_float, default=d.eps, help=f"t ~ U(eps, 1) (default {d.eps:g})")
    p.add_argument("--ckpt-every", type=positive_int, default=d.ckpt_every, help=f"(default {d.ckpt_every})")
    p.add_argument("--log-every", type=positive_int, default=d.log_every, help=f"(default {d.log_every})")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--num-samples", type=positive_int, default=d.num_samples, help="images in DIR/samples.png")
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help="ODE steps for samples.png")
    p.add_argument("--sample-method", choices=sorted(SOLVERS), default=d.sample_method)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .training.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    pretrain(config)
    return 0


def add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="what prg_fast was built with (CPU/CUDA ops, Triton) and why not")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from .ode import info

    info()
    return 0


def add_related(subparsers) -> None:
    """`repfusion` and `genrep`: the related systems (prg_fast.related)."""
    from .related.genrep import add_genrep
    from .related.repfusion import add_repfusion

    add_repfusion(subparsers)
    add_genrep(subparsers)


def add_prg(subparsers) -> None:
    """`finetune`, `evaluate` and `extract`: PRG classifiers and features (prg_fast.training.finetune)."""
    from .training.finetune import add_evaluate, add_extract, add_finetune

    add_finetune(subparsers)
    add_evaluate(subparsers)
    add_extract(subparsers)


# the commands, in the order `prg-fast --help` lists them
COMMANDS: List[Callable] = [add_pretrain, add_prg, add_related, add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prg-fast",
        description="prg_fast: reverse pretrained flow models (data -> noise) with an exact adjoint; PRG on top.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _user_errors():
    from .training.pretrain import CheckpointError

    return (ValueError, TypeError, FileNotFoundError, NotADirectoryError, CheckpointError, FloatingPointError)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        if os.environ.get("PRG_FAST_TRACEBACK"):
            raise
        print(f"prg-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
