"""`prg-fast reward`: flags -> RewardConfig -> prg_fast.training.reward.reward_finetune."""
from __future__ import annotations

import argparse

from .args import (HelpFormatter, add_data_arguments, add_interval_arguments, add_model_arguments, add_run_arguments,
                   add_solver_arguments, config_from_args, nonnegative_float, nonnegative_int, positive_float,
                   positive_int, print_metrics, run_options, user_model)
from .finetune import memory_budget


def add_reward(subparsers) -> None:
    from ..training.reward import RewardConfig

    d = RewardConfig()
    p = subparsers.add_parser(
        "reward", help="reward finetuning through the sampler (exact full chain, or DRaFT / AlignProp / ReFL)",
        formatter_class=HelpFormatter,
        description="Finetune a pretrained flow so that its samples (prg_fast.generate, t = 1 -> 0) maximise a "
                    "differentiable reward, minus KL_WEIGHT x the velocity difference to the pretrained network "
                    "(and FM_WEIGHT x the flow-matching loss on --data). --gradient full differentiates every "
                    "sampler step exactly (the discrete adjoint, memory flat in --ode-steps with --memory-budget "
                    "none); draft-K, alignprop and refl are the published truncations (docs/reward.md).")
    add_data_arguments(p, augment=False)
    p.add_argument("--checkpoint", metavar="DIR", default=None, help="pretraining run directory (or its checkpoint.pt)")
    p.add_argument("--reward", required=True, metavar="class:N|MODULE:FACTORY",
                   help="class:N: the log-probability of class N under a small classifier trained on --data's "
                        "training split at the start (kept in the checkpoint); or package.module:factory, a callable "
                        "returning the reward (an nn.Module or function: samples (B, C, H, W) -> (B,))")
    p.add_argument("--gradient", default=d.gradient, metavar="full|backprop|draft-K|alignprop|refl",
                   help="how much of the sampler chain the gradient flows through: full (exact adjoint), backprop "
                        "(plain autograd through the chain), draft-K (the last K steps: DRaFT-K), alignprop (the "
                        "last k ~ U{1..K} steps, checkpointed), refl (one step from a random late time: ReFL)")
    p.add_argument("--memory-budget", type=memory_budget, default=d.memory_budget, metavar="auto|none|BYTES",
                   help="--gradient full: evaluation graphs the adjoint keeps (auto: what fits in half the free "
                        "memory; none: recompute every one, memory flat in --ode-steps; inf: keep all)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="samples per step")
    add_solver_arguments(p, d.ode_steps, d.method, " (the sampler, t = 1 -> 0)")
    p.add_argument("--refl-late", type=positive_float, default=d.refl_late,
                   help="--gradient refl: start the one differentiated step in this last fraction of the steps")
    p.add_argument("--adapter", choices=("lora", "full", "none"), default=d.adapter,
                   help="lora: train a low-rank adapter on every Linear / Conv layer (built in; no peft needed); "
                        "full: every weight; none: the parameters that require grad as the --model network comes "
                        "(a peft-wrapped network)")
    p.add_argument("--lora-rank", type=positive_int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA scale alpha / rank (None: the rank)")
    p.add_argument("--kl-weight", type=nonnegative_float, default=d.kl_weight,
                   help="weight of the mean squared velocity difference to the pretrained network (a KL of the "
                        "flows' SDE path measures, up to the noise scale), on the chords noise -> sample")
    p.add_argument("--fm-weight", type=nonnegative_float, default=d.fm_weight,
                   help="weight of the flow-matching loss on --data's training images (the checkpoint's path)")
    p.add_argument("--fm-eps", type=nonnegative_float, default=d.fm_eps, help="t ~ U(eps, 1) in the FM term")
    p.add_argument("--classifier-steps", type=positive_int, default=d.classifier_steps,
                   help="class:N: training steps of the reward's classifier")
    p.add_argument("--raw-weights", action="store_true", help="start from the raw weights instead of the EMA")
    add_model_arguments(p, presets=False, weights=False)
    add_run_arguments(p)
    p.add_argument("--lr", type=positive_float, default=d.lr, help="AdamW learning rate (constant after the warm-up)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay)
    p.add_argument("--warmup", type=nonnegative_int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=nonnegative_float, default=d.grad_clip, help="max gradient norm, 0 disables")
    p.add_argument("--eval-samples", type=positive_int, default=d.eval_samples,
                   help="samples from fixed noise compared before / after at the end (metrics.json, samples.png)")
    add_interval_arguments(p, d, eval_batch=False)
    p.set_defaults(func=run_reward)


def run_reward(args: argparse.Namespace) -> int:
    from ..training.reward import RewardConfig, reward_finetune

    model = user_model(args)
    result = reward_finetune(config_from_args(RewardConfig, args), model=model, **run_options(args))
    print_metrics(result.metrics)
    return 0
