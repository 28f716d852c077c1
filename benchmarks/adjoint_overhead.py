"""The adjoint's per-evaluation bookkeeping at small sizes, where a network evaluation is cheap:
one training step (forward + backward) of a reverse solve through a small MLP, per strategy,
relative to plain backprop (adjoint=False) in the same run.

    backprop    adjoint=False: plain autograd through the solver (the reference)
    auto        the default (memory_budget="auto": here every graph fits, nothing is recomputed)
    budget_inf  memory_budget=float("inf"): every graph kept
    budget_0    memory_budget=0: every evaluation recomputed in the backward

Time: thread CPU time (one intra-op thread), every repeat runs all rows back to back (order rotated
per repeat), each row's time over backprop's time of the same repeat, median over repeats. Rows are
printed as they are measured.

    python benchmarks/adjoint_overhead.py                       # MLP 64->256->64, batch 64, euler/rk4, K=20,100
    python benchmarks/adjoint_overhead.py --methods rk4 --steps 50 --reps 31
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import prg_fast

ROWS = {"backprop": dict(adjoint=False), "auto": {}, "budget_inf": dict(memory_budget=float("inf")),
        "budget_0": dict(memory_budget=0)}


class MLP(torch.nn.Module):
    """v(t, x) = W2 tanh(W1 x + w t + b1) + b2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        self.time = torch.nn.Parameter(torch.randn(hidden) * 0.1)

    def forward(self, t, x):
        return self.out(torch.tanh(self.inp(x) + t[:, None] * self.time))


def step_seconds(model, x, row: str, steps: int, method: str) -> float:
    """Thread CPU seconds of one forward + backward."""
    start = time.thread_time()
    out = prg_fast.reverse(model, x, steps=steps, method=method, **ROWS[row])
    out.square().sum().backward()
    return time.thread_time() - start


def ratios(model, x, rows, steps: int, method: str, reps: int):
    for row in rows:  # warm-up
        step_seconds(model, x, row, steps, method)
    secs = {row: [] for row in rows}
    for rep in range(reps):
        for row in rows[rep % len(rows):] + rows[: rep % len(rows)]:
            model.zero_grad(set_to_none=True)
            x.grad = None
            secs[row].append(step_seconds(model, x, row, steps, method))
    return ({row: statistics.median(a / b for a, b in zip(secs[row], secs["backprop"])) for row in rows},
            {row: statistics.median(v) for row, v in secs.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["euler", "rk4"])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = ["backprop"] + [r for r in args.rows if r != "backprop"]
    torch.manual_seed(0)
    model = MLP(args.dim, args.hidden)
    x = torch.randn(args.batch, args.dim, requires_grad=True)
    print(f"CPU, torch {torch.__version__}, one thread; MLP {args.dim}->{args.hidden}->{args.dim}, batch {args.batch}; "
          f"thread CPU time, median of {args.reps} interleaved repeats")
    print("| method | K | " + " | ".join(f"{r} ms" for r in rows) + " | " + " | ".join(f"{r} / backprop" for r in rows[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(rows) - 1))
    for method in args.methods:
        for steps in args.steps:
            r, s = ratios(model, x, rows, steps, method, args.reps)
            print(f"| {method} | {steps} | " + " | ".join(f"{s[row] * 1e3:.1f}" for row in rows) + " | "
                  + " | ".join(f"{r[row]:.3f}" for row in rows[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
