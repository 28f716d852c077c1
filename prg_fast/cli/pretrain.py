"""`prg-fast pretrain`: flags -> PretrainConfig -> prg_fast.training.pretrain.pretrain."""
from __future__ import annotations

import argparse

from .args import (HelpFormatter, add_data_arguments, add_interval_arguments, add_model_arguments, add_run_arguments,
                   config_from_args, nonnegative_float, nonnegative_int, positive_float, positive_int, print_metrics,
                   run_options, user_model)

PRESET_HELP = ("UNet preset: tiny for 8x8 images (digits; 2 levels, CPU-sized), mnist28 for 28x28 grey images (fashion-mnist, "
               "mnist; 2x2 patches, CPU-sized), cifar or prg32 for 32x32 (4 levels, "
               "attention at 16x16, and prg32 also at 8x8; GPU-sized)")


def add_pretrain(subparsers) -> None:
    from ..ode import SOLVERS
    from ..paths import PATHS
    from ..training.pretrain import PretrainConfig

    d = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain", help="flow-matching pretraining of a velocity network", formatter_class=HelpFormatter,
        description="Flow-matching pretraining (GVP / ICFM / OTCFM) of a UNet velocity network. Runs on one "
                    "process, or under `torchrun --nproc_per_node N` with DistributedDataParallel.")
    add_data_arguments(p)
    p.add_argument("--path", choices=sorted(PATHS), default=d.path, help="probability path")
    p.add_argument("--sigma", type=nonnegative_float, default=d.sigma, help="ICFM/OTCFM path noise")
    p.add_argument("--prediction", choices=("velocity", "epsilon", "v"), default=d.prediction,
                   help="what the UNet predicts: the path's velocity (flow matching), or the noise / v "
                        "(diffusion-style; the UNet turns it into the path's velocity)")
    add_model_arguments(p, presets=True, weights=True, preset_help=PRESET_HELP, default=d.model)
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global batch, split over processes")
    add_run_arguments(p)
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adam", "adamw"), default=d.optimizer)
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay)
    p.add_argument("--warmup", type=nonnegative_int, default=d.warmup,
                   help="linear warm-up steps; a run shorter than this never reaches --lr (it says so)")
    p.add_argument("--grad-clip", type=nonnegative_float, default=d.grad_clip, help="max gradient norm, 0 disables")
    p.add_argument("--ema-decay", type=nonnegative_float, default=d.ema_decay,
                   help="EMA decay, ramped as min(decay, (1+n)/(10+n))")
    p.add_argument("--dropout", type=nonnegative_float, default=None, help="override the preset's dropout (None: keep)")
    p.add_argument("--eps", type=nonnegative_float, default=d.eps, help="t ~ U(eps, 1)")
    add_interval_arguments(p, d, eval_batch=False)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--num-samples", type=positive_int, default=d.num_samples, help="images in DIR/samples.png")
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help="ODE steps for samples.png")
    p.add_argument("--sample-method", choices=sorted(SOLVERS), default=d.sample_method)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..training.pretrain import PretrainConfig, pretrain

    result = pretrain(config_from_args(PretrainConfig, args), model=user_model(args),
                      time_convention=args.time_convention, **run_options(args))
    print_metrics(result.metrics)
    return 0
