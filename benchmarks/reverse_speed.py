"""Speed of reverse(): forward (no grad) and forward+backward, against torchdiffeq on the same grid,
and the integrator's overhead over the network's own time.

Per (preset, batch):
    net          K*s network evaluations alone (no solver): the floor
    prg          prg_fast.reverse, no grad              (+ cuda_graph=True on CUDA)
    tdq          torchdiffeq.odeint, no grad
    prg_adj_fb   prg_fast.reverse(adjoint=True) forward+backward
    prg_bp_fb    prg_fast.reverse(adjoint=False) forward+backward
    tdq_fb       torchdiffeq.odeint forward+backward
    tdq_adj_fb   torchdiffeq.odeint_adjoint forward+backward
Method: rk4_38 here = torchdiffeq's "rk4" (same tableau, so the same arithmetic).

    python benchmarks/reverse_speed.py            # GPU: tiny/cifar/prg32 x batch 1/8/128
    python benchmarks/reverse_speed.py --quick    # CPU smoke run
    python benchmarks/reverse_speed.py --no-backward --presets cifar --batches 1 4 16 64
                                                  # no-grad only: where CUDA graphs stop paying
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import prg_fast
from prg_fast.models import UNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adjoint_memory import TorchdiffeqFunc, device_name  # noqa: E402


def timer(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(preset, batch, args, device):
    import torchdiffeq

    torch.manual_seed(0)
    model = UNet.preset(preset, in_channels=3, image_size=args.size, dropout=0.0).to(device).eval()
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    K, s = args.steps, 4
    grid = torch.linspace(0, 1, K + 1, device=device)
    func = TorchdiffeqFunc(model)
    params = list(model.parameters())
    t = torch.rand(batch, device=device)
    res = {}

    def net():
        with torch.no_grad():
            for _ in range(K * s):
                model(t, x)

    def prg(**kw):
        with torch.no_grad():
            prg_fast.reverse(model, x, steps=K, method="rk4_38", **kw)

    def tdq():
        with torch.no_grad():
            torchdiffeq.odeint(func, x, grid, method="rk4")

    def fb(kind):
        xg = x.clone().requires_grad_(True)
        if kind == "prg_adj_fb":
            out = prg_fast.reverse(model, xg, steps=K, method="rk4_38")
        elif kind == "prg_bp_fb":
            out = prg_fast.reverse(model, xg, steps=K, method="rk4_38", adjoint=False)
        elif kind == "tdq_fb":
            out = torchdiffeq.odeint(func, xg, grid, method="rk4")[-1]
        else:
            out = torchdiffeq.odeint_adjoint(func, xg, grid, method="rk4", adjoint_params=params)[-1]
        out.square().mean().backward()

    res["net"] = timer(net, device, args.reps)
    res["prg"] = timer(prg, device, args.reps)
    if device.type == "cuda":
        res["prg_graph"] = timer(lambda: prg(cuda_graph=True), device, args.reps, warmup=2)
    res["tdq"] = timer(tdq, device, args.reps)
    for kind in () if args.no_backward else ("prg_adj_fb", "prg_bp_fb", "tdq_fb", "tdq_adj_fb"):
        res[kind] = timer(lambda: fb(kind), device, args.reps)
    model.zero_grad(set_to_none=True)
    return res


def graph_crossover(rows, threshold=0.95):
    """Per preset, where a captured CUDA graph stops paying over the eager no-grad solve:
    {preset: {"pays_up_to_numel": largest state size with prg_graph/prg < threshold (None: never),
    "stops_at_numel": smallest larger size where it does not (None: not reached)}}. The smallest
    "stops_at_numel" over presets bounds cuda_graph="auto" (PRG_FAST_CUDA_GRAPH_MAX_NUMEL)."""
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        cells = sorted((r["numel"], r["prg_graph"] / r["prg"]) for r in rows
                       if r["preset"] == preset and "prg_graph" in r)
        stops = next((n for n, ratio in cells if ratio >= threshold), None)
        pays = [n for n, ratio in cells if ratio < threshold and (stops is None or n < stops)]
        out[preset] = {"pays_up_to_numel": max(pays) if pays else None, "stops_at_numel": stops,
                       "graph/eager": {n: round(ratio, 3) for n, ratio in cells}}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-backward", action="store_true", help="time the no-grad solves only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.presets = args.presets or (["tiny", "cifar", "prg32"] if cuda else ["tiny"])
    args.batches = args.batches or ([1, 8, 128] if cuda else ([1, 8] if args.quick else [1, 8, 32]))
    args.steps = args.steps or (20 if cuda else (2 if args.quick else 5))
    args.size = args.size or (32 if cuda or not args.quick else 16)
    args.reps = args.reps or (5 if cuda else (1 if args.quick else 3))
    print(f"device: {device_name(device)}; torch {torch.__version__}; backend "
          f"{prg_fast.ode.backends.resolve('auto', device)[0]}; K={args.steps} rk4_38; image {args.size}x{args.size}")
    rows = []
    for preset in args.presets:
        for batch in args.batches:
            r = bench(preset, batch, args, device)
            r.update(preset=preset, batch=batch, numel=batch * 3 * args.size ** 2)
            rows.append(r)
            print(json.dumps({k: (round(v * 1e3, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print("\ntimes in ms; overhead = prg / net - 1 (integrator cost over the network's own evaluations)")
    fb_cols = [] if args.no_backward else ["prg_adj_fb", "prg_bp_fb", "tdq_fb", "tdq_adj_fb"]
    cols = ["net", "prg"] + (["prg_graph"] if cuda else []) + ["tdq"] + fb_cols
    print("| preset | batch | " + " | ".join(cols) + " | overhead | tdq/prg" + (" | tdq/prg_graph" if cuda else "")
          + ("" if args.no_backward else " | adj_fb/bp_fb | tdq_adj_fb/prg_adj_fb") + " |")
    print("|" + "---|" * (len(cols) + 4 + (1 if cuda else 0) + (0 if args.no_backward else 2)))
    for r in rows:
        line = f"| {r['preset']} | {r['batch']} | " + " | ".join(f"{r[c] * 1e3:.1f}" for c in cols)
        line += f" | {100 * (r['prg'] / r['net'] - 1):+.1f}% | {r['tdq'] / r['prg']:.2f}x"
        if cuda:
            line += f" | {r['tdq'] / r['prg_graph']:.2f}x"
        if not args.no_backward:
            line += f" | {r['prg_adj_fb'] / r['prg_bp_fb']:.2f} | {r['tdq_adj_fb'] / r['prg_adj_fb']:.2f}x"
        print(line + " |")
    if cuda:
        print(f"CUDA graph crossover (graphed/eager >= 0.95): {json.dumps(graph_crossover(rows))}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"reverse_speed_{device.type}.json"), "w") as f:
        json.dump(dict(device=device_name(device), args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
