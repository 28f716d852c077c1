"""`prg-fast finetune`: flags -> FinetuneConfig -> prg_fast.training.finetune.finetune."""
from __future__ import annotations

import argparse

from ..ode.description import check_memory_budget
from .args import (HelpFormatter, add_data_arguments, add_interval_arguments, add_model_arguments, add_run_arguments,
                   add_solver_arguments, config_from_args, nonnegative_float, nonnegative_int, positive_float,
                   positive_int, print_metrics, run_options, time_list, unit_time, user_model)
from .pretrain import PRESET_HELP


def add_finetune(subparsers) -> None:
    from ..paths import PATHS
    from ..training.finetune import FinetuneConfig

    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune", help="PRG finetuning: classifier head on the reversed trajectory, trained jointly with the flow",
        formatter_class=HelpFormatter,
        description="Load a pretraining checkpoint (EMA weights by default), reverse images from t0 to t with the "
                    "flow, classify the end state with a ClassifierHead, and train head and flow jointly with "
                    "cross-entropy + BETA x flow-matching loss through the exact adjoint. Runs on one process, or "
                    "under `torchrun --nproc_per_node N` with DistributedDataParallel (the test split is then "
                    "evaluated in shards, one per process).")
    add_data_arguments(p)
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="pretraining run directory (or its checkpoint.pt); optional with --from-scratch --model")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global batch, split over processes")
    add_solver_arguments(p, d.ode_steps, d.method)
    p.add_argument("--t0", type=unit_time, default=d.t0,
                   help="start of the trajectory segment; the image is the state at t0 (0 = data)")
    p.add_argument("--t", type=unit_time, default=d.t, help="end of the segment, whose state is classified")
    p.add_argument("--save-at", type=time_list, default=None, metavar="T1,T2,...",
                   help="classify the states at these times, concatenated on the channel dim (None: only t)")
    p.add_argument("--learn-t", action="store_true",
                   help="learn the end time t jointly with the flow and head (starts at --t, kept in (t0, 1]); "
                        "the learned value is t_final in metrics.json")
    p.add_argument("--learn-t0", action="store_true", help="learn the start time t0 too (kept in [0, t))")
    p.add_argument("--t-lr", type=positive_float, default=d.t_lr,
                   help="peak learning rate of the learned times' logits (no weight decay)")
    p.add_argument("--beta", type=nonnegative_float, default=d.beta,
                   help="weight of the flow-matching loss on the same batch (0: cross-entropy only, as the released "
                        "PRG code; the paper's objective uses beta > 0)")
    p.add_argument("--label-smoothing", type=nonnegative_float, default=d.label_smoothing)
    p.add_argument("--freeze-flow", action="store_true", help="train the head only (the flow is a fixed feature map)")
    p.add_argument("--from-scratch", action="store_true",
                   help="same architecture with random initial weights (no pretraining)")
    add_model_arguments(p, presets=True, weights=True,
                        preset_help=f"for --from-scratch without --checkpoint: {PRESET_HELP}",
                        weights_help="a pretrained flow's published weights (a prg_fast.flow file, such as "
                                     "weights/fashion_mnist_flow.pt), in place of --checkpoint; with --model "
                                     "MODULE:FACTORY: a state_dict (torch.save) loaded into that network")
    p.add_argument("--path", choices=sorted(PATHS), default=None,
                   help="flow-matching path of the beta term (None: the checkpoint's, else otcfm)")
    p.add_argument("--raw-weights", action="store_true", help="start from the raw weights instead of the EMA")
    p.add_argument("--hidden", type=positive_int, default=None, help="head width (None: the pooled feature size)")
    p.add_argument("--labels-per-class", type=positive_int, default=None, metavar="N",
                   help="finetune on a seeded, class-balanced subset of N labelled training images per class "
                        "(None: every one); evaluation still uses the whole test split")
    p.add_argument("--labels-seed", type=nonnegative_int, default=None,
                   help="seed of that subset (None: --seed); written to metrics.json")
    p.add_argument("--val-size", type=nonnegative_int, default=d.val_size, metavar="N",
                   help="hold out N training images (class-stratified, drawn by --seed) before the labelled subset "
                        "is drawn, and report their top-1 as val_top1 in metrics.json (0: none)")
    add_run_arguments(p)
    p.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    p.add_argument("--head-lr", type=positive_float, default=None, help="peak learning rate of the head (None: --lr)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay, help="AdamW")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="linear warm-up steps (None: 5%% of --steps)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule, help="after the warm-up")
    p.add_argument("--min-lr", type=nonnegative_float, default=d.min_lr, help="cosine floor, fraction of the peak")
    p.add_argument("--grad-clip", type=nonnegative_float, default=d.grad_clip, help="max gradient norm, 0 disables")
    p.add_argument("--fm-eps", type=nonnegative_float, default=d.fm_eps, help="t ~ U(eps, 1) in the beta term")
    p.add_argument("--eval-every", type=nonnegative_int, default=d.eval_every,
                   help="test top-1 every N steps into log.csv (0: only at the end)")
    p.add_argument("--memory-budget", type=memory_budget, default=d.memory_budget, metavar="auto|none|BYTES",
                   help="evaluation graphs the exact adjoint keeps to skip their recomputation: auto (what fits in "
                        "half the free memory), none (recompute every one: memory flat in --ode-steps), or bytes "
                        "(inf: keep all)")
    add_interval_arguments(p, d)
    p.set_defaults(func=run_finetune)


def memory_budget(text: str):
    """--memory-budget: "auto", "none" or a number of bytes >= 0 ("inf" allowed), checked by the
    engine's own check of memory_budget."""
    word = text.strip().lower()
    try:
        return check_memory_budget(None if word == "none" else word if word == "auto" else float(word))
    except ValueError:  # not a number, NaN, negative
        raise argparse.ArgumentTypeError(f"expected auto, none or a number of bytes >= 0, got {text!r}") from None


def run_finetune(args) -> int:
    from ..training.finetune import FinetuneConfig, finetune
    from ..training.flows import is_factory_spec

    flow_file = None
    if args.weights is not None and not is_factory_spec(args.model):  # a flow file, not a state_dict for --model
        flow_file, args.weights = args.weights, None
    model = user_model(args)
    if model is not None:
        args.model = None  # FinetuneConfig.model is a preset; the network itself goes as model=
    config = config_from_args(FinetuneConfig, args)
    config.weights = flow_file  # the --weights of a factory went into the network above
    result = finetune(config, model=model, time_convention=args.time_convention, **run_options(args))
    print_metrics(result.metrics)
    return 0
