"""Where a PRG finetuning step spends its time, to bound what any exact method can gain over the
released pipeline (torchdiffeq's odeint_adjoint) -- the parts finetune_step.py's rows are made of:

    F0   one network evaluation without a graph (torch.no_grad)
    F    one network evaluation with a graph
    B    the backward of one evaluation (its VJP: input and parameter gradients)
    C    the rest of the step, common to every row: head forward+backward, the flow-matching term
         (one F + B of the network), AdamW

With K Euler steps, the released pipeline's step costs K*F0 (its forward) + K*(F + B) (its adjoint
integrates the augmented system backwards, one evaluation with its VJP per step) + C; plain backprop
costs K*(F + B) + C, and so does prg_fast's default while every graph fits (nothing recomputed).
So no exact method that recomputes nothing can beat the pipeline by more than
(K*F0 + K*(F + B) + C) / (K*(F + B) + C).

Same network, batch, size and thread settings as finetune_step.py (tiny preset, 32x32, batch 8,
one thread); thread CPU time, medians of interleaved repeats.

    python benchmarks/finetune_parts.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import prg_fast
from prg_fast.models import ClassifierHead

from finetune_step import trained_like_flow  # this folder is the script's sys.path[0]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="Euler steps K")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=9)
    return p.parse_args()


def parts(args) -> dict:
    """{name: a callable running that part once}, on finetune_step.py's network and batch."""
    flow = trained_like_flow(args.preset, args.size)
    head = ClassifierHead((3, args.size, args.size), 10)
    flow_params = list(flow.parameters())
    opt = torch.optim.AdamW(flow_params + list(head.parameters()), lr=1e-6)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    t = torch.full((args.batch,), 0.5)
    g = torch.randn_like(x)

    def f0():
        with torch.no_grad():
            flow(t, x)

    def fb():
        xl = x.detach().requires_grad_(True)  # the state's cotangent is part of every step's VJP
        torch.autograd.grad(flow(t, xl), [xl] + flow_params, g)

    def common():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x), y)
        if args.beta > 0:
            loss = loss + args.beta * prg_fast.flow_matching_loss(flow, x, "otcfm")
        loss.backward()
        opt.step()

    return {"F0": f0, "F": lambda: flow(t, x), "F+B": fb, "C": common}


def main():
    args = parse()
    torch.set_num_threads(1)
    fns = parts(args)
    for fn in fns.values():
        fn()  # warm-up
    secs = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            start = time.thread_time()
            fn()
            secs[k].append(time.thread_time() - start)
    m = {k: statistics.median(v) for k, v in secs.items()}
    K = args.steps
    released = K * m["F0"] + K * m["F+B"] + m["C"]
    backprop = K * m["F+B"] + m["C"]
    print(f"CPU, torch {torch.__version__}, one thread; UNet {args.preset} {args.size}x{args.size}, batch {args.batch}, "
          f"K={K} Euler, beta={args.beta}; thread CPU time, median of {args.reps} interleaved repeats")
    print("| part | ms |\n|---|---|")
    for k in fns:
        print(f"| {k} | {m[k] * 1e3:.1f} |")
    print(f"| B = (F+B) - F | {(m['F+B'] - m['F']) * 1e3:.1f} |")
    print(f"\nB / F = {(m['F+B'] - m['F']) / m['F']:.2f}; F / F0 = {m['F'] / m['F0']:.2f}")
    print(f"predicted step: released {released * 1e3:.0f} ms, backprop (= prg_fast default when every graph fits) "
          f"{backprop * 1e3:.0f} ms: at most {released / backprop:.2f}x faster than the released pipeline")


if __name__ == "__main__":
    main()
