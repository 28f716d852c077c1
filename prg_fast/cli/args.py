"""Argument types and the flag groups every command shares, so that the flags read the same
everywhere. argparse turns an ArgumentTypeError into "argument --x: <message>"."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from typing import Any, Callable, Dict, List, Optional

from ..ode.api import UNIT_TIME

__all__ = ["bounded", "positive_int", "nonnegative_int", "nonnegative_float", "positive_float", "unit_time",
           "time_list", "add_data_arguments", "add_run_arguments", "add_solver_arguments", "config_from_args",
           "print_metrics", "HelpFormatter", "add_model_arguments", "user_model", "add_interval_arguments",
           "run_options", "DATA_HELP", "add_data_dir_argument", "fold_data_dir"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, also for options given no help text (argparse's own
    formatter only appends the default to an existing help text)."""

    def _format_action(self, action):
        if not (action.help or "").strip() and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        # an on/off flag (--freeze-flow, --no-progress) has no value to show; --hflip/--no-hflip does
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            return action.help
        return super()._get_help_string(action)


def bounded(kind: type, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
            hi_open: bool = False, what: Optional[str] = None) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) parsed from the text, finite, within [lo, hi] (an end
    None is unbounded; lo_open / hi_open make an end open)."""
    if what is None:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        noun = "an integer" if kind is int else "a finite number"
        what = f"{noun} {' and '.join(parts)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


positive_int = bounded(int, 1)
nonnegative_int = bounded(int, 0)
nonnegative_float = bounded(float, 0.0)
positive_float = bounded(float, 0.0, lo_open=True)


def _unit_times(text: str, what: str) -> List[float]:
    """Times read by the one parser of times (classifier.parse_times: numbers in [0, 1] by the
    engine's own check), as argparse wants the error."""
    from ..classifier import parse_times

    try:
        times = parse_times(text)
    except ValueError:
        times = None
    if not times:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return times


def unit_time(text: str) -> float:
    """One time in [0, 1]."""
    times = _unit_times(text, UNIT_TIME)
    if len(times) != 1:
        raise argparse.ArgumentTypeError(f"expected {UNIT_TIME}, got {text}")
    return times[0]


def time_list(text: str) -> List[float]:
    """Comma-separated times in [0, 1], such as 0.5,1.0."""
    return _unit_times(text, "comma-separated times in [0, 1] (0 = data, 1 = noise)")


DATA_HELP = ("digits | fashion-mnist | mnist (IDX files: --data-dir, $PRG_FAST_DATA or the Debian package's folder) | "
             "cifar10:PATH (cifar-10-batches-py) | folder:PATH (PATH/{train,test}/<class>/*.png|jpg)")


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder of the fashion-mnist / mnist IDX files (DIR, DIR/raw or torchvision's "
                             "DIR/FashionMNIST/raw; None: $PRG_FAST_DATA/<name>, then /usr/share/datasets/fashion-mnist)")


def fold_data_dir(args: argparse.Namespace) -> None:
    """--data-dir DIR becomes part of the DATA spec (fashion-mnist -> fashion-mnist:DIR), which is
    what the training code, checkpoints and metrics carry."""
    from ..data import with_data_dir

    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        return
    if getattr(args, "data", None) is None:
        raise ValueError("--data-dir needs --data fashion-mnist or --data mnist")
    args.data = with_data_dir(args.data, data_dir)


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True, augment: bool = True) -> None:
    """--data (and the augmentation flags), shared by every command that reads a data set."""
    parser.add_argument("--data", required=required, metavar="DATA", help=DATA_HELP)
    add_data_dir_argument(parser)
    if augment:
        parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                            help="random horizontal flips (None: on for fashion-mnist/cifar10/folder, off for digits/mnist)")
        parser.add_argument("--crop-padding", type=nonnegative_int, default=0, metavar="P",
                            help="random crops after reflect-padding by P pixels (0: off)")


def add_run_arguments(parser: argparse.ArgumentParser, seed: bool = True, out_required: bool = True,
                      out_help: str = "run directory: checkpoint, metrics.json; an existing checkpoint there is resumed") -> None:
    """--out, --seed, --device, --no-progress, shared by every command that writes a run directory."""
    parser.add_argument("--out", required=out_required, default=None, metavar="DIR", help=out_help)
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder prg-fast did not make (or replace an existing --out file); "
                             "another command's run directory is never written into")
    if seed:
        parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_interval_arguments(parser: argparse.ArgumentParser, defaults, eval_batch: bool = True) -> None:
    """--ckpt-every, --log-every, --ckpt-minutes (and --eval-batch-size), with the defaults of the
    config `defaults`."""
    from ..training.trainer import RunOptions

    parser.add_argument("--ckpt-every", type=positive_int, default=defaults.ckpt_every, help="steps between checkpoints")
    parser.add_argument("--log-every", type=positive_int, default=defaults.log_every,
                        help="steps between log.csv rows (log.csv and a running metrics.json are written then)")
    parser.add_argument("--ckpt-minutes", type=nonnegative_float, default=RunOptions.ckpt_minutes,
                        help="also checkpoint when this many minutes passed since the last checkpoint (0: off)")
    if eval_batch:
        parser.add_argument("--eval-batch-size", type=positive_int, default=defaults.eval_batch_size,
                            help="images per batch when evaluating")


def add_solver_arguments(parser: argparse.ArgumentParser, steps_default, method_default, what: str = "") -> None:
    """--ode-steps and --method: how the reversed trajectory is integrated."""
    from ..ode import SOLVERS

    parser.add_argument("--ode-steps", type=positive_int, default=steps_default, metavar="K",
                        help=f"fixed solver steps from t0 to t{what}")
    parser.add_argument("--method", choices=sorted(SOLVERS), default=method_default, help=f"ODE solver{what}")


def add_model_arguments(parser: argparse.ArgumentParser, presets: bool, weights: bool, preset_help: str = "",
                        default=None, weights_help: str = "with --model MODULE:FACTORY: a state_dict (torch.save) "
                                                           "loaded into the network") -> None:
    """--model (a UNet preset and/or package.module:factory: bring your own flow), --weights and
    --time-convention."""
    if presets:
        from ..models.unet import PRESETS
        from ..training.flows import is_factory_spec

        def model_spec(text: str) -> str:
            if text in PRESETS or is_factory_spec(text):
                return text
            raise argparse.ArgumentTypeError(f"expected a UNet preset ({', '.join(sorted(PRESETS))}) or "
                                             f"package.module:factory, got {text!r}")

        parser.add_argument("--model", type=model_spec, default=default, metavar="PRESET|MODULE:FACTORY",
                            help=f"{preset_help}; or package.module:factory, a callable returning any nn.Module "
                                 f"called as model(t, x)")
    else:
        parser.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                            help="for a checkpoint of a network prg_fast did not build: package.module:factory, "
                                 "the callable that builds it")
    if weights:
        parser.add_argument("--weights", default=None, metavar="FILE", help=weights_help)
        parser.add_argument("--time-convention", choices=("prg", "torchcfm"), default="prg",
                            help="of a --model MODULE:FACTORY network: prg (t = 0 is data) or torchcfm (t = 0 is "
                                 "noise; run through prg_fast.time_reversed)")


def user_model(args: argparse.Namespace):
    """The network a --model MODULE:FACTORY names, with --weights loaded; None for a preset."""
    spec = getattr(args, "model", None)
    if not (isinstance(spec, str) and ":" in spec):
        if getattr(args, "weights", None):
            raise ValueError("--weights goes with --model package.module:factory")
        return None
    import torch

    from ..training.flows import import_factory

    model = import_factory(spec)()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    if getattr(args, "weights", None):
        try:
            model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, KeyError) as e:
            raise ValueError(f"--weights {args.weights}: not a state_dict of the --model network: {e}") from e
    return model


def run_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The trainers' RunOptions keywords (how a run is kept) from the parsed flags."""
    return {"ckpt_minutes": args.ckpt_minutes, "force": args.force}


def config_from_args(cls, args: argparse.Namespace):
    """The config dataclass `cls` from the parsed flags (one flag per field; fields without a flag
    keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def print_metrics(metrics: Dict[str, Any]) -> None:
    """Every command prints the same shape: its metrics.json object on one line of stdout (the
    human summary went to stderr). Under torchrun only rank 0 prints."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(json.dumps(metrics, allow_nan=True), file=sys.stdout, flush=True)
