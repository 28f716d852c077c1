"""The exact adjoint on networks prg_fast did not write: diffusers' UNet2DModel and torchcfm's UNet,
as their users call them, against plain backprop through the same solver.

    python benchmarks/third_party_models.py            # rows for whichever libraries are installed
    python benchmarks/third_party_models.py --strategies   # + worst error per network and adjoint strategy

Neither library is a dependency: a row says "not installed" (with the import error) when its library
is missing. Each network gets random weights on top of its initialisation (zero-initialised output
layers would make most gradients zero) and runs in train mode with dropout 0.1 (replayed exactly),
with and without the library's own gradient checkpointing. Figures: the relative L2 error of all
gradients together (x and every parameter), and the worst single-tensor error among tensors whose
gradient is not zero by symmetry (norm >= 1e-6 of the largest; a bias followed by GroupNorm has a
gradient of rounding size in both runs, whose ratio says nothing).
"""
import argparse
import math
import platform
import sys

import torch

import prg_fast


def _perturb(module, scale):
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def gradients(fn, params, x, adjoint, method, steps):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    out = prg_fast.reverse(fn, x, steps=steps, method=method, adjoint=adjoint)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), [x] + params, allow_unused=True)


def compare(fn, params, x, method, steps):
    ref = gradients(fn, params, x, False, method, steps)
    adj = gradients(fn, params, x, True, method, steps)
    missing = sum((a is None) != (b is None) for a, b in zip(adj, ref))
    pairs = [(a, b) for a, b in zip(adj, ref) if a is not None and b is not None]
    flat_a = torch.cat([a.flatten() for a, _ in pairs])
    flat_b = torch.cat([b.flatten() for _, b in pairs])
    flat = ((flat_a - flat_b).norm() / flat_b.norm()).item()
    largest = max(b.norm().item() for _, b in pairs)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in pairs if b.norm().item() >= 1e-6 * largest)
    return flat, worst, missing


def diffusers_cases(dtype):
    from diffusers import DDIMScheduler, UNet2DModel

    def build(checkpointing):
        torch.manual_seed(0)
        net = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                          norm_num_groups=8, dropout=0.1)
        net = _perturb(net.to(dtype).train(), 0.02)
        if checkpointing:
            net.enable_gradient_checkpointing()
        # an epsilon-prediction UNet on a discrete schedule: its probability-flow ODE (prg_fast.diffusion),
        # not its output fed to the solver as a velocity; DDIM's 2 trailing timesteps (999, 499) as levels
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=False)
        return prg_fast.from_diffusers(net, scheduler, steps=2), list(net.parameters())

    yield "diffusers UNet2DModel (attention, dropout 0.1)", lambda: build(False)
    yield "diffusers UNet2DModel, gradient checkpointing", lambda: build(True)


def torchcfm_cases(dtype):
    from torchcfm.models.unet.unet import UNetModelWrapper

    def build(checkpointing):
        torch.manual_seed(0)
        net = UNetModelWrapper(dim=(3, 16, 16), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                               attention_resolutions="8", dropout=0.1, num_heads=2, num_head_channels=16,
                               use_checkpoint=checkpointing)
        # torchcfm's time embedding is float32 whatever the weights: the network runs in float32
        net = _perturb(net.train(), 0.02)
        # torchcfm's convention is t = 0 noise: time_reversed adapts it
        return prg_fast.time_reversed(net), list(net.parameters())

    yield "torchcfm UNetModelWrapper (attention, dropout 0.1)", lambda: build(False)
    yield "torchcfm UNetModelWrapper, use_checkpoint", lambda: build(True)


def strategy_table() -> float:
    """--strategies: every network of python_tests/test_third_party_models.py (diffusers, peft,
    torchdyn, torchcfm, torch's toolbox) under euler and rk4 x each adjoint strategy; a cell is
    the worst single-tensor relative error against plain backprop through the same solver (float64;
    float32 rows: all gradients together). Returns the worst cell over its tolerance."""
    import os
    import pytest
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python_tests"))
    import test_third_party_models as zoo

    cols = [(m, s) for m in zoo.METHODS for s in zoo.STRATEGIES]
    print()
    print("worst relative error per network and strategy (adjoint vs adjoint=False, same solver):")
    print("| network | dtype | " + " | ".join(f"{m} {s}" for m, s in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    worst = 0.0
    for name, build in zoo.CASES.items():
        build = build.values[0] if hasattr(build, "values") else build  # pytest.param(...)
        cells, dtype = [], None
        try:
            for m, strat in cols:
                (_, err), together, dtype = zoo.compare(build, m, strat)
                value = err if dtype == torch.float64 else together
                worst = max(worst, value / zoo.RTOL[dtype])
                cells.append(f"{value:.1e}")
        except pytest.skip.Exception as e:
            print(f"| {name} | - | skipped: {e.msg} |")
            continue
        print(f"| {name} | {str(dtype).replace('torch.', '')} | " + " | ".join(cells) + " |", flush=True)
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rk4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--strategies", action="store_true",
                    help="also the table per network and adjoint strategy (every family of the third-party tests)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"adjoint vs plain backprop, {args.method} x {args.steps} steps, x of shape (2, 3, 16, 16); torch "
          f"{torch.__version__}, {platform.machine()}, CPU, one thread")
    print("| network | dtype | all gradients, rel. L2 | worst tensor | missing gradients |")
    print("|---|---|---|---|---|")
    worst_all = 0.0
    for library, cases, dtype in (("diffusers", diffusers_cases, torch.float64), ("torchcfm", torchcfm_cases, torch.float32)):
        try:
            rows = list(cases(dtype))
        except ImportError as e:
            print(f"| {library} | - | not installed ({e}) | - | - |")
            continue
        for name, build in rows:
            fn, params = build()
            x = torch.randn(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(5))
            flat, worst, missing = compare(fn, params, x, args.method, args.steps)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            worst_all = max(worst_all, worst / tol, math.inf if missing else 0.0)
            print(f"| {name} | {str(dtype).replace('torch.', '')} | {flat:.1e} | {worst:.1e} | {missing} |")
    if args.strategies:
        worst_all = max(worst_all, strategy_table())
    return 0 if worst_all < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
