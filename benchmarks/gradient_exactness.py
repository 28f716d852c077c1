"""Exact for every model: the adjoint's gradients against plain backprop through the same solver
(adjoint=False; for reversible=True through the same reversible scheme), one table per --tables:
zoo (python_tests/test_model_zoo.py's velocities x every method, float64), third-party (diffusers'
UNet2DModel and torchcfm's UNet as their users call them, with and without gradient checkpointing,
train mode, dropout 0.1) and strategies (every network of python_tests/test_third_party_models.py x
euler and rk4 x each adjoint strategy). RESULTS.md, "Exact for every model", says what each cell is.
A library that is not installed gets a row saying so. Exit status 1 when any figure exceeds its
tolerance.

    python benchmarks/gradient_exactness.py                       # zoo and third-party
    python benchmarks/gradient_exactness.py --tables strategies
"""
import math
import os
import sys

import torch

import harness
import prg_fast

sys.path.insert(0, os.path.join(harness.ROOT, "python_tests"))  # the velocities the tests define


def zoo_table(args, log):
    import test_model_zoo as zoo

    worst = 0.0
    for case in sorted(zoo.CASES):
        key = dict(table="zoo", name=case)
        if "cells" not in log.get(key):
            cells = {}
            for method in zoo.METHODS:
                grads = []
                for adjoint in (False, True):
                    fn, x, tensors, kw, steps = zoo.CASES[case]()  # afresh: stateful velocities start alike
                    grads.append(zoo.adjoint_and_backprop_gradients(fn, x, tensors, adjoint=adjoint, method=method,
                                                                    steps=steps, **kw)[1])
                cells[method] = zoo.worst_relative_error(grads[1], grads[0])[1]
            log.add(key, cells=cells)
        worst = max([worst] + list(log.get(key)["cells"].values()))
    print("\nadjoint vs plain backprop, float64, worst relative gradient error")
    print(harness.table(log.rows([dict(table="zoo", name=c) for c in sorted(zoo.CASES)]), [("model", "name")] + [
        (m, lambda r, m=m: r["cells"][m], ".1e") for m in zoo.METHODS]))
    print(f"worst over all: {worst:.2e}")
    return worst / zoo.RTOL


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
    ref, adj = gradients(fn, params, x, False, method, steps), gradients(fn, params, x, True, method, steps)
    missing = sum((a is None) != (b is None) for a, b in zip(adj, ref))
    pairs = [(a, b) for a, b in zip(adj, ref) if a is not None and b is not None]
    flat_a, flat_b = (torch.cat([p[i].flatten() for p in pairs]) for i in (0, 1))
    largest = max(b.norm().item() for _, b in pairs)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in pairs if b.norm().item() >= 1e-6 * largest)
    return dict(flat=((flat_a - flat_b).norm() / flat_b.norm()).item(), worst=worst, missing=missing)


def diffusers_cases():
    from diffusers import DDIMScheduler, UNet2DModel

    def build(checkpointing):
        torch.manual_seed(0)
        net = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                          norm_num_groups=8, dropout=0.1)
        net = _perturb(net.to(torch.float64).train(), 0.02)
        if checkpointing:
            net.enable_gradient_checkpointing()
        # an epsilon-prediction UNet on a discrete schedule: its probability-flow ODE (prg_fast.diffusion)
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", clip_sample=False)
        return prg_fast.from_diffusers(net, scheduler, steps=2), list(net.parameters())

    return {"diffusers UNet2DModel (attention, dropout 0.1)": lambda: build(False),
            "diffusers UNet2DModel, gradient checkpointing": lambda: build(True)}


def torchcfm_cases():
    from torchcfm.models.unet.unet import UNetModelWrapper

    def build(checkpointing):
        torch.manual_seed(0)
        net = UNetModelWrapper(dim=(3, 16, 16), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                               attention_resolutions="8", dropout=0.1, num_heads=2, num_head_channels=16,
                               use_checkpoint=checkpointing)
        # torchcfm's time embedding is float32 whatever the weights; its convention is t = 0 noise
        return prg_fast.time_reversed(_perturb(net.train(), 0.02)), list(net.parameters())

    return {"torchcfm UNetModelWrapper (attention, dropout 0.1)": lambda: build(False),
            "torchcfm UNetModelWrapper, use_checkpoint": lambda: build(True)}


def third_party_table(args, log):
    worst, rows = 0.0, []
    for library, cases, dtype in (("diffusers", diffusers_cases, torch.float64), ("torchcfm", torchcfm_cases, torch.float32)):
        try:
            builds = cases()
        except ImportError as e:
            rows.append(dict(name=library, dtype="-", flat=f"not installed ({e})"))
            continue
        for name, build in builds.items():
            key = dict(table="third-party", name=name)
            if "worst" not in log.get(key):
                x = torch.randn(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(5))
                log.add(key, dtype=str(dtype).replace("torch.", ""), **compare(*build(), x, args.method, args.steps))
            rows.append(r := log.get(key))
            worst = max(worst, r["worst"] / (1e-12 if dtype == torch.float64 else 1e-5), math.inf if r["missing"] else 0)
    print(f"\nadjoint vs plain backprop, {args.method} x {args.steps} steps, x of shape (2, 3, 16, 16)")
    print(harness.table(rows, [("network", "name"), ("dtype", "dtype"), ("all gradients, rel. L2", "flat", ".1e"),
                                         ("worst tensor", "worst", ".1e"), ("missing gradients", "missing")]))
    return worst


def strategy_table(args, log):
    import pytest
    import test_third_party_models as zoo

    cols = [(m, s) for m in zoo.METHODS for s in zoo.STRATEGIES]
    worst, keys = 0.0, []
    for name, build in zoo.CASES.items():
        build = build.values[0] if hasattr(build, "values") else build  # pytest.param(...)
        keys.append(dict(table="strategies", name=name))
        if "cells" not in log.get(keys[-1]) and "skipped" not in log.get(keys[-1]):
            try:
                cells, dtype = {}, None
                for m, strat in cols:
                    (_, err), together, dtype = zoo.compare(build, m, strat)
                    cells[f"{m} {strat}"] = (err if dtype == torch.float64 else together)
                log.add(keys[-1], dtype=str(dtype).replace("torch.", ""), cells=cells, tolerance=zoo.RTOL[dtype])
            except pytest.skip.Exception as e:
                log.add(keys[-1], dtype="-", skipped=e.msg)
        r = log.get(keys[-1])
        worst = max([worst] + [v / r["tolerance"] for v in r.get("cells", {}).values()])
    print("\nworst relative error per network and strategy (adjoint vs adjoint=False, same solver):")
    print(harness.table(log.rows(keys), [("network", "name"), ("dtype", "dtype")] + [
        (f"{m} {s}", lambda r, c=f"{m} {s}": r["cells"][c] if "cells" in r else r.get("skipped"), ".1e")
        for m, s in cols]))
    return worst


TABLES = {"zoo": zoo_table, "third-party": third_party_table, "strategies": strategy_table}


def main(argv=None):
    ap = harness.parser("gradient_exactness", __doc__)
    ap.add_argument("--tables", nargs="+", choices=list(TABLES), default=["zoo", "third-party"])
    ap.add_argument("--method", default="rk4", help="third-party: the solver")
    ap.add_argument("--steps", type=int, default=2, help="third-party: solver steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(harness.machine(torch.device("cpu")))
    log = harness.Results(args, "gradient_exactness", dict(method=args.method, steps=args.steps), key=("table", "name"))
    worst = max(TABLES[t](args, log) for t in args.tables)
    print(f"\nworst over all, as a multiple of its tolerance: {worst:.2g}")
    return 0 if worst < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
