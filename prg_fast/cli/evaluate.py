"""`prg-fast evaluate` and `prg-fast extract`: flags -> prg_fast.training.evaluate.evaluate / extract."""
from __future__ import annotations

import sys

from .args import (HelpFormatter, add_data_arguments, add_model_arguments, add_run_arguments, add_solver_arguments,
                   positive_int, print_metrics, time_list, unit_time, user_model)


def add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="test top-1 of a finetuned checkpoint, with any ODE step count", formatter_class=HelpFormatter,
        description="Re-evaluate a finetuned PRG classifier on the test split of DATA, with the step count and "
                    "solver it was trained with or others (the step-invariance check). Writes metrics.json into "
                    "--out and prints it. Under `torchrun` every process classifies its share of the split.")
    add_data_arguments(p, augment=False)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="finetuning run directory (or its checkpoint.pt)")
    add_solver_arguments(p, None, None, " (None: those it was trained with)")
    add_model_arguments(p, presets=False, weights=False)
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_run_arguments(p, seed=False, out_required=False,
                      out_help="run directory for metrics.json (None: CHECKPOINT_DIR/evaluate-METHOD-K)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    from ..training.evaluate import evaluate

    metrics = evaluate(args.checkpoint, args.data, ode_steps=args.ode_steps, method=args.method,
                       batch_size=args.batch_size, device=args.device, progress=args.progress, out=args.out,
                       model=user_model(args), default_out=True, force=args.force)
    print(f"prg-fast evaluate: top-1 {metrics['top1']:.4f} ({metrics['correct']}/{metrics['test_size']}) with "
          f"{metrics['ode_steps']} {metrics['method']} steps; wrote {metrics.get('out')}/metrics.json", file=sys.stderr)
    print_metrics(metrics)
    return 0


def add_extract(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="features along the reversed trajectory (train and test splits) into a run directory",
        formatter_class=HelpFormatter,
        description="Reverse every image of both splits of DATA with a checkpoint's flow (a pretraining checkpoint: "
                    "its EMA weights; a finetuning checkpoint: its finetuned flow) and write the states at --t (or "
                    "--save-at) with the labels to DIR/features.npz (arrays train_features, train_labels, "
                    "test_features, test_labels, feature_shape, classes, meta) and DIR/metrics.json. --out FILE.npz "
                    "writes that file alone (and FILE.probe.json with --probe). --probe adds linear-probe and k-NN top-1.")
    add_data_arguments(p, augment=False)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="pretraining or finetuning run directory, or a flow weights file (prg_fast.flow)")
    p.add_argument("--t", type=unit_time, default=None, help="feature time (None: 1, or the finetuned t)")
    p.add_argument("--t0", type=unit_time, default=None, help="start time; the image is the state there (None: 0)")
    p.add_argument("--save-at", type=time_list, default=None, metavar="T1,T2,...",
                   help="several feature times, concatenated on the channel dim")
    add_solver_arguments(p, None, None, " (None: 20 euler, or those a finetuned checkpoint was trained with)")
    p.add_argument("--raw-weights", action="store_true", help="pretraining checkpoint: raw weights instead of EMA")
    add_model_arguments(p, presets=False, weights=False)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--probe", action="store_true", help="also run a linear probe and k-NN on the features")
    p.add_argument("--knn-k", type=positive_int, default=20)
    add_run_arguments(p, seed=False, out_help="run directory (DIR/features.npz, DIR/metrics.json) or FILE.npz")
    p.set_defaults(func=run_extract)


def run_extract(args) -> int:
    from ..training.evaluate import extract

    meta = extract(args.checkpoint, args.data, args.out, t=args.t, t0=args.t0, save_at=args.save_at,
                   ode_steps=args.ode_steps, method=args.method, raw_weights=args.raw_weights,
                   batch_size=args.batch_size, device=args.device, progress=args.progress, probe=args.probe,
                   knn_k=args.knn_k, model=user_model(args), force=args.force)
    msg = f"wrote {args.out}: {meta['n_train']} train / {meta['n_test']} test features of shape {meta['feature_shape']}"
    if args.probe:
        msg += f"; linear probe top-1 {meta['linear_probe_top1']:.4f}, {meta['knn_k']}-NN top-1 {meta['knn_top1']:.4f}"
    print(f"prg-fast extract: {msg}", file=sys.stderr)
    print_metrics(meta)
    return 0
