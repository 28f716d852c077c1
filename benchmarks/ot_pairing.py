"""Time the OTCFM minibatch pairing: squared-Euclidean cost matrix + exact assignment
(scipy.optimize.linear_sum_assignment), as prg_fast.paths.ot_permutation does it per training step
(float32 inputs: the cost matrix is computed in float32).

    python benchmarks/ot_pairing.py                                   # Gaussian "data", 3072-d
    python benchmarks/ot_pairing.py --data folder:/work/shared/data/cifar10   # real CIFAR-10 images

Prints a Markdown table (median and interquartile range over --repeats) of the cost-matrix time,
the assignment time and the total, per batch size.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from scipy.optimize import linear_sum_assignment

from prg_fast.paths import ot_cost_matrix, ot_permutation


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--dim", type=int, default=3 * 32 * 32, help="data dimension for Gaussian data")
    parser.add_argument("--data", default=None, help="a prg_fast DATA spec to pair real images with noise")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    images = None
    if args.data:
        from prg_fast.data import load_data

        images = load_data(args.data, "train", augment=None)
        source = f"{args.data} train images ({'x'.join(map(str, images.shape))})"
    else:
        source = f"Gaussian data, dim {args.dim}"
    print(f"# OT pairing: {source}; {args.repeats} repeats; torch {torch.__version__} threads "
          f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| batch | cost matrix ms | assignment ms | total ms (ot_permutation) | IQR ms |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.batches:
        cost_t, lsa_t, total_t = [], [], []
        for r in range(args.repeats + 2):  # two warm-up rounds
            if images is None:
                x0 = torch.randn(n, args.dim, generator=gen)
            else:
                x0, _ = images.batch(torch.randint(0, len(images), (n,), generator=gen), augment=False)
            x1 = torch.randn(x0.shape, generator=gen)
            t0 = time.perf_counter()
            c = ot_cost_matrix(x0, x1).numpy()
            t1 = time.perf_counter()
            linear_sum_assignment(c)
            t2 = time.perf_counter()
            ot_permutation(x0, x1)
            t3 = time.perf_counter()
            if r >= 2:
                cost_t.append((t1 - t0) * 1e3)
                lsa_t.append((t2 - t1) * 1e3)
                total_t.append((t3 - t2) * 1e3)
        q1, med, q3 = quartiles(total_t)
        print(f"| {n} | {statistics.median(cost_t):.2f} | {statistics.median(lsa_t):.2f} | {med:.2f} | {q1:.2f}-{q3:.2f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
