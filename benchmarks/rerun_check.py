"""What the rerun check of issue 34 costs: every evaluation the stored adjoint reruns (or keeps)
walks its graph once for what it reads that is none of the solve's inputs (prg_fast.ode.rerun,
unknown_reads). Side by side in one process, interleaved (thread CPU time: load moves it less): the
backward of a memory_budget=0 solve with the check and with it replaced by a no-op, on a small MLP
(where Python overhead is largest) and the tiny UNet; the median over the repeats.

    OMP_NUM_THREADS=1 python benchmarks/rerun_check.py [--repeats 15]
"""
import argparse
import statistics
import time

import torch

import prg_fast
from prg_fast.models import UNet
from prg_fast.ode import rerun


def _mlp():
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 16))
    return (lambda t, x: net(x)), torch.randn(32, 16), 50, "MLP 16-64-64-16, batch 32, rk4, 50 steps"


def _unet():
    net = UNet.preset("tiny", in_channels=1, image_size=16)
    return net, torch.randn(8, 1, 16, 16), 4, "tiny UNet 16x16, batch 8, rk4, 4 steps"


def backward_seconds(fn, x, steps, check: bool) -> float:
    real = rerun.unknown_reads
    rerun.unknown_reads = real if check else (lambda *args: (None, []))
    try:
        out = prg_fast.reverse(fn, x.clone().requires_grad_(True), steps=steps, method="rk4", memory_budget=0)
        start = time.thread_time()
        out.sum().backward()
        return time.thread_time() - start
    finally:
        rerun.unknown_reads = real


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| velocity | backward with the check (ms) | without (ms) | ratio |\n|---|---|---|---|")
    for build in (_mlp, _unet):
        fn, x, steps, what = build()
        times = {True: [], False: []}
        for check in (True, False):  # warm-up
            backward_seconds(fn, x, steps, check)
        for _ in range(args.repeats):
            for check in (True, False):
                times[check].append(backward_seconds(fn, x, steps, check))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {what} | {on * 1e3:.1f} | {off * 1e3:.1f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
