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

Small-network case (--cases mlp): an MLP velocity on a 2^16-element state (1024 x 64), K = 100,
where the integrator's own work (stage arithmetic, per-call overhead) is a visible share:
    no grad      prg_fast.reverse vs torchdiffeq.odeint (rk4_38 = torchdiffeq's rk4), and, with
                 Heun's method (the highest order torchode has on a fixed grid), all three
    solver alone prg_fast and torchdiffeq with a velocity that returns a fixed tensor: the solver's
                 own cost (stage arithmetic, Python per step), and from it the largest ratio a
                 solver costing nothing could reach against torchdiffeq, tdq / (prg - prg solver)
    training     one forward+backward: prg_fast (discrete adjoint), torchdiffeq odeint_adjoint,
                 torchode AutoDiffAdjoint (backprop through its solver; its BacksolveAdjoint
                 vmaps a VJP per sample and is about 70x slower)

    python benchmarks/reverse_speed.py            # GPU: tiny/cifar/prg32 x batch 1/8/128, and the MLP case
    python benchmarks/reverse_speed.py --quick    # CPU smoke run
    python benchmarks/reverse_speed.py --no-backward --presets cifar --batches 1 4 16 64
                                                  # no-grad only: where CUDA graphs stop paying
    OMP_NUM_THREADS=1 python benchmarks/reverse_speed.py --cases mlp --reps 5   # the MLP case alone
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


class MLPVelocity(torch.nn.Module):
    """v(t, x) for x of shape (B, dim): (x, t) -> width -> width -> dim, SiLU."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, t, x):
        # x (B, dim) with t (B,) or 0-dim; also one sample x (dim,) with a 0-dim t (torchode's
        # backsolve adjoint vmaps over samples)
        xb = x.reshape(-1, x.shape[-1])
        t = t.reshape(-1, 1).to(x.dtype).expand(xb.shape[0], 1)
        return self.net(torch.cat([xb, t], 1)).reshape(x.shape)


class ConstantVelocity(torch.nn.Module):
    """A velocity that costs nothing: returns the same tensor for every (t, x)."""

    def __init__(self, k: torch.Tensor):
        super().__init__()
        self.k = k

    def forward(self, t, x):
        return self.k


def bench_mlp(args, device):
    """The small-network case: rows of (method, what, times per library)."""
    import torchdiffeq
    import torchode

    torch.manual_seed(0)
    B, dim, K = args.mlp_batch, args.mlp_dim, args.mlp_steps
    model = MLPVelocity(dim, args.mlp_width).to(device)
    x = torch.randn(B, dim, device=device)
    grid = torch.linspace(0, 1, K + 1, device=device)
    func = TorchdiffeqFunc(model)
    params = list(model.parameters())
    term = torchode.ODETerm(model)
    span = dict(t_start=torch.zeros(B, device=device), t_end=torch.ones(B, device=device))
    dt0 = torch.full((B,), 1.0 / K, device=device)
    tode = torchode.AutoDiffAdjoint(torchode.Heun(term=term), torchode.FixedStepController())
    evals = {"rk4_38": 4, "heun": 2}

    def net(method):
        with torch.no_grad():
            for _ in range(K * evals[method]):
                model(grid[0].expand(B), x)

    fixed = ConstantVelocity(torch.randn(B, dim, device=device))

    def solver(lib, method):
        with torch.no_grad():
            if lib == "prg":
                prg_fast.reverse(fixed, x, steps=K, method=method)
            else:
                torchdiffeq.odeint(fixed, x, grid, method="rk4" if method == "rk4_38" else "heun2")

    def nograd(lib, method):
        with torch.no_grad():
            if lib == "prg":
                prg_fast.reverse(model, x, steps=K, method=method)
            elif lib == "tdq":
                torchdiffeq.odeint(func, x, grid, method="rk4" if method == "rk4_38" else "heun2")
            else:
                tode.solve(torchode.InitialValueProblem(y0=x, **span), dt0=dt0)

    def train(lib, method):
        xg = x.clone().requires_grad_(True)
        if lib == "prg":
            out = prg_fast.reverse(model, xg, steps=K, method=method)
        elif lib == "tdq":
            out = torchdiffeq.odeint_adjoint(func, xg, grid, method="rk4" if method == "rk4_38" else "heun2",
                                             adjoint_params=params)[-1]
        else:
            # backprop through torchode's solver (AutoDiffAdjoint): its BacksolveAdjoint vmaps one
            # vector-Jacobian product per sample, about 70x slower than this at K = 5
            out = tode.solve(torchode.InitialValueProblem(y0=xg, **span), dt0=dt0).ys[:, -1]
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)

    rows = []
    for method, libs in (("rk4_38", ("prg", "tdq")), ("heun", ("prg", "tdq", "tode"))):
        fns = {"net": lambda: net(method)}
        fns.update({lib: (lambda lib=lib: nograd(lib, method)) for lib in libs})
        fns.update({f"{lib}_solver": (lambda lib=lib: solver(lib, method)) for lib in ("prg", "tdq")})
        fns.update({f"{lib}_train": (lambda lib=lib: train(lib, method)) for lib in libs})
        times = interleaved(fns, device, args.reps)
        rows.append(dict(method=method, **times))
        print("mlp " + json.dumps({k: (round(v * 1e3, 1) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
              flush=True)
    return rows


def interleaved(fns, device, reps):
    """Median seconds per call of each function, timed in turn within every repetition; on a CPU
    with one thread the calling thread's CPU time (robust to other processes on the machine)."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cpu" and torch.get_num_threads() == 1:
                t0 = time.thread_time()
                fn()
                samples[name].append(time.thread_time() - t0)
            else:
                samples[name].append(timer(fn, device, 1, warmup=0))
    return {name: statistics.median(xs) for name, xs in samples.items()}


def print_mlp(rows, args):
    print(f"\nMLP velocity ({args.mlp_dim}+1 -> {args.mlp_width} -> {args.mlp_width} -> {args.mlp_dim}, SiLU) on a "
          f"{args.mlp_batch} x {args.mlp_dim} state, K = {args.mlp_steps}; ms, median of {args.reps} interleaved runs"
          + (" (thread CPU time)" if args.device == "cpu" and torch.get_num_threads() == 1 else ""))
    print("| method | net alone | prg no-grad | tdq no-grad | tode no-grad | tdq/prg | tode/prg | "
          "prg solver alone | tdq solver alone | tdq/prg with a free prg solver | "
          "prg adjoint step | tdq adjoint step | tode backprop step | tdq/prg | tode/prg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def ms(k):
            return f"{r[k] * 1e3:.1f}" if k in r else "-"

        def ratio(a, b):
            return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"

        free = f"{r['tdq'] / (r['prg'] - r['prg_solver']):.2f}x" if r.get("prg", 0) > r.get("prg_solver", 0) else "-"
        print(f"| {r['method']} | {ms('net')} | {ms('prg')} | {ms('tdq')} | {ms('tode')} | {ratio('tdq', 'prg')} | "
              f"{ratio('tode', 'prg')} | {ms('prg_solver')} | {ms('tdq_solver')} | {free} | "
              f"{ms('prg_train')} | {ms('tdq_train')} | {ms('tode_train')} | "
              f"{ratio('tdq_train', 'prg_train')} | {ratio('tode_train', 'prg_train')} |")


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


def print_unet(rows, args, cuda):
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
    p.add_argument("--cases", nargs="+", default=["unet"], choices=["unet", "mlp"],
                   help="unet: the UNet presets (default); mlp: the small-network case")
    p.add_argument("--mlp-batch", type=int, default=1024)
    p.add_argument("--mlp-dim", type=int, default=64)
    p.add_argument("--mlp-width", type=int, default=64)
    p.add_argument("--mlp-steps", type=int, default=100)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "benchmarks"))  # git-ignored
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
    mlp_rows = []
    if "mlp" in args.cases:
        if args.quick:
            args.mlp_steps = min(args.mlp_steps, 5)
        mlp_rows = bench_mlp(args, device)
        print_mlp(mlp_rows, args)
    rows = []
    for preset in (args.presets if "unet" in args.cases else []):
        for batch in args.batches:
            r = bench(preset, batch, args, device)
            r.update(preset=preset, batch=batch, numel=batch * 3 * args.size ** 2)
            rows.append(r)
            print(json.dumps({k: (round(v * 1e3, 2) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    if rows:
        print_unet(rows, args, cuda)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"reverse_speed_{device.type}.json"), "w") as f:
        json.dump(dict(device=device_name(device), args=vars(args), rows=rows, mlp=mlp_rows), f, indent=1)


if __name__ == "__main__":
    main()
