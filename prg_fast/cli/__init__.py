"""Command line: `prg-fast <command> ...` (also `python -m prg_fast ...`; docs/cli.md). All
argument parsing lives in this package (one module per command); the training code below takes
config dataclasses and knows no argparse.

    prg-fast pretrain | finetune | evaluate | extract | repfusion | genrep | info

Adding a command: write `add_<name>(subparsers)` in its own module here, creating its parser with
`subparsers.add_parser(name, help=..., formatter_class=HelpFormatter)`, adding its options (reuse
prg_fast.cli.args' types and flag groups so the flags read the same everywhere) and setting
`func=<callable(args) -> exit code>` with `parser.set_defaults(...)`; then append it to COMMANDS.
Every command writes DIR/metrics.json and prints that object as one line on stdout.
Errors a user can fix (bad values, missing files, unusable checkpoints) are printed as one line
and exit with status 2; set PRG_FAST_TRACEBACK=1 to see the traceback instead.

Stopping a training command (pretrain, finetune, repfusion, genrep; also under torchrun): the first
SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes a checkpoint, prints one line saying
how to resume and exits with status 130 (SIGINT) or 143 (SIGTERM); the same command resumes the run
bitwise. A second signal aborts at once with status 3 (nothing written since the last checkpoint).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from typing import Callable, List, Optional

from .args import (HelpFormatter, add_data_arguments, add_run_arguments, bounded, fold_data_dir, nonnegative_float,
                   nonnegative_int, positive_float, positive_int)
from .evaluate import add_evaluate, add_extract
from .finetune import add_finetune
from .pretrain import add_pretrain
from .related import add_genrep, add_repfusion

__all__ = ["main", "build_parser", "COMMANDS", "add_data_arguments", "add_run_arguments", "bounded",
           "positive_int", "nonnegative_int", "nonnegative_float", "positive_float", "HelpFormatter"]


def add_info(subparsers) -> None:
    p = subparsers.add_parser("info", formatter_class=HelpFormatter, help="what prg_fast was built with (CPU/CUDA ops, Triton) and why not")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from ..ode import info

    info()
    return 0


# the commands, in the order `prg-fast --help` lists them
COMMANDS: List[Callable] = [add_pretrain, add_finetune, add_evaluate, add_extract, add_repfusion, add_genrep,
                           add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prg-fast", formatter_class=HelpFormatter,
        description="prg_fast: reverse pretrained flow models (data -> noise) with an exact adjoint; PRG on top.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


EXIT_USER_ERROR = 2
EXIT_ABORTED = 3  # a second signal: stopped at once, without a checkpoint


def _user_errors():
    from ..training.rundir import CheckpointError

    return (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError,
            FloatingPointError)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error, 130 / 143
    stopped by SIGINT / SIGTERM with a checkpoint written, 3 aborted by a second signal)."""
    from ..training.trainer import Interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        fold_data_dir(args)
        return int(args.func(args) or 0)
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            command = shlex.join(["prg-fast", *(sys.argv[1:] if argv is None else argv)])
            launcher = " under the same torchrun line" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"prg-fast {args.command}: stopped by {signal.Signals(e.signum).name} after step {e.step}, checkpoint "
                  f"written to {e.checkpoint}; resume with: {command}{launcher}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"prg-fast {args.command}: aborted ({e or 'KeyboardInterrupt'})", file=sys.stderr, flush=True)
        return EXIT_ABORTED
    except _user_errors() as e:
        if os.environ.get("PRG_FAST_TRACEBACK"):
            raise
        print(f"prg-fast {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
