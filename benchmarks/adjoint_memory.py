"""The headline: memory, time and gradient error of differentiating through a fixed-step reverse
solve, for K steps, four ways on the same grid:

    backprop      prg_fast.reverse(adjoint=False): plain autograd through the solver
    prg_fast      prg_fast.reverse(adjoint=True): exact discrete adjoint
    tdq           torchdiffeq.odeint: plain autograd through torchdiffeq's solver
    tdq_adjoint   torchdiffeq.odeint_adjoint: continuous adjoint re-integrated backwards

Memory is the peak above the baseline during forward+backward: torch.cuda.max_memory_allocated on
CUDA; on the CPU the peak RSS of a fresh subprocess per measurement (glibc told to return freed
memory at once, so RSS follows live memory). Gradient error is the relative L2 error of the
gradients (input and all parameters) against float64 plain backprop through the same solver.

    python benchmarks/adjoint_memory.py            # UNet "tiny" 32x32 on the CPU, "cifar" on a GPU
    python benchmarks/adjoint_memory.py --quick    # < 1 minute on a 2-core CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import prg_fast
from prg_fast.models import UNet

IMPLS = ("backprop", "prg_fast", "tdq", "tdq_adjoint")
TDQ_METHOD = {"euler": "euler", "midpoint": "midpoint", "rk4_38": "rk4"}  # torchdiffeq's names


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def build(args, device, dtype):
    torch.manual_seed(0)
    model = UNet.preset(args.model, in_channels=3, image_size=args.size, dropout=0.0)
    # A fresh UNet zero-initialises its output layers (v = 0: a trivial ODE whose every adjoint is
    # exact); give those weights values so the flow is non-trivial, like a trained network's.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    model = model.to(device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype, requires_grad=True)
    return model, x


def run_once(impl, model, x, steps, method):
    """Forward + backward; returns the output (detached) and the gradients."""
    params = list(model.parameters())
    if impl in ("backprop", "prg_fast"):
        out = prg_fast.reverse(model, x, steps=steps, method=method, adjoint=impl == "prg_fast")
    else:
        import torchdiffeq

        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).to(x.dtype).to(x.device)
        func = TorchdiffeqFunc(model)
        if impl == "tdq":
            out = torchdiffeq.odeint(func, x, grid, method=TDQ_METHOD[method])[-1]
        else:
            out = torchdiffeq.odeint_adjoint(func, x, grid, method=TDQ_METHOD[method], adjoint_params=params)[-1]
    # a fixed random cotangent, the same for every implementation
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [x] + params, g)
    return out.detach(), grads


class TorchdiffeqFunc(torch.nn.Module):
    """torchdiffeq calls func(t, y) with a 0-dim t; our models take t of shape (B,)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, t, y):
        return self.model(t.expand(y.shape[0]), y)


def measure(args, impl, steps, device):
    """(peak bytes above baseline, median seconds) of forward+backward, measured here."""
    model, x = build(args, device, torch.float32)
    run_once(impl, model, x, min(steps, 2), args.method)  # warm-up (library init, autotuning)
    times, peak = [], 0
    for _ in range(args.reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        run_once(impl, model, x, steps, args.method)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        times.append(time.perf_counter() - t0)
    return peak, statistics.median(times)


def measure_cpu_subprocess(args, impl, steps):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    cmd = [sys.executable, __file__, "--worker", impl, str(steps)] + args.passthrough
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {impl} K={steps} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args, impl, steps):
    """Runs in a fresh process: the peak RSS of forward+backward above the RSS after warm-up."""
    device = torch.device("cpu")
    model, x = build(args, device, torch.float32)
    run_once(impl, model, x, min(steps, 2), args.method)
    # reset the high-water mark to the live memory now (after warm-up), then read its growth
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    run_once(impl, model, x, steps, args.method)
    secs = time.perf_counter() - t0
    peak = (proc_status_kib("VmHWM") - base) * 1024
    print(json.dumps([peak, secs]))


def grad_errors(args, device, steps):
    """Relative gradient error of each implementation against float64 plain backprop."""
    model, x = build(args, device, torch.float64)
    x.data = x.data[: args.grad_batch]
    _, truth = run_once("backprop", model, x, steps, args.method)
    errs = {}
    for impl in IMPLS:
        _, grads = run_once(impl, model, x, steps, args.method)
        num = sum(((a - b) ** 2).sum() for a, b in zip(grads, truth)).sqrt()
        den = sum((b**2).sum() for b in truth).sqrt()
        errs[impl] = (num / den).item()
    return errs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute on a 2-core CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="UNet preset (default: cifar on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image size")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--method", default="euler", choices=sorted(TDQ_METHOD))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--grad-batch", type=int, default=2, help="batch for the float64 gradient check")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or ("cifar" if cuda else "tiny")
    args.batch = args.batch or (64 if cuda else (4 if args.quick else 16))
    args.size = args.size or (8 if args.quick else 32)
    args.reps = args.reps or (3 if cuda else 1)
    args.passthrough = ["--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
                        "--method", args.method, "--device", "cpu"]
    if args.worker:
        worker(args, args.worker[0], int(args.worker[1]))
        return

    import torchdiffeq  # noqa: F401  (fail early with a clear ImportError)

    torch.set_num_threads(torch.get_num_threads())
    print(f"device: {device_name(device)}; torch {torch.__version__}; prg_fast backend: "
          f"{prg_fast.ode.backends.resolve('auto', device)[0]}")
    print(f"model: UNet '{args.model}' ({sum(p.numel() for p in build(args, device, torch.float32)[0].parameters()) / 1e6:.2f}M params), "
          f"x: ({args.batch}, 3, {args.size}, {args.size}), method: {args.method}, "
          f"memory: {'max_memory_allocated' if cuda else 'peak RSS of a subprocess'}")
    rows = []
    for steps in args.steps:
        errs = grad_errors(args, device, steps)
        for impl in IMPLS:
            if cuda:
                peak, secs = measure(args, impl, steps, device)
            else:
                peak, secs = measure_cpu_subprocess(args, impl, steps)
            rows.append(dict(impl=impl, steps=steps, peak_mib=peak / 2**20, seconds=secs, grad_rel_err=errs[impl]))
            print(f"  K={steps:<3d} {impl:<12s} peak {peak / 2**20:9.1f} MiB  {secs * 1e3:9.1f} ms  "
                  f"grad rel err {errs[impl]:.2e}", flush=True)

    by = {(r["impl"], r["steps"]): r for r in rows}
    print("\n| K | " + " | ".join(f"{i} MiB" for i in IMPLS) + " | " + " | ".join(f"{i} ms" for i in IMPLS)
          + " | prg_fast/backprop time | " + " | ".join(f"{i} grad err" for i in IMPLS) + " |")
    print("|" + "---|" * (2 + 3 * len(IMPLS)))
    for steps in args.steps:
        r = [by[(i, steps)] for i in IMPLS]
        print(f"| {steps} | " + " | ".join(f"{x['peak_mib']:.1f}" for x in r) + " | "
              + " | ".join(f"{x['seconds'] * 1e3:.0f}" for x in r)
              + f" | {by[('prg_fast', steps)]['seconds'] / by[('backprop', steps)]['seconds']:.2f} | "
              + " | ".join(f"{x['grad_rel_err']:.1e}" for x in r) + " |")

    os.makedirs(args.out, exist_ok=True)
    tag = f"{device.type}_{args.model}_{args.method}"
    with open(os.path.join(args.out, f"adjoint_memory_{tag}.json"), "w") as f:
        json.dump(dict(device=device_name(device), args={k: v for k, v in vars(args).items() if k != "passthrough"},
                       rows=rows), f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for impl in IMPLS:
        a1.plot(args.steps, [by[(impl, k)]["peak_mib"] for k in args.steps], "o-", label=impl)
        a2.plot(args.steps, [max(by[(impl, k)]["grad_rel_err"], 1e-17) for k in args.steps], "o-", label=impl)
    a1.set(xscale="log", xlabel="steps K", ylabel="peak memory above baseline (MiB)", title="memory vs K")
    a2.set(xscale="log", yscale="log", xlabel="steps K", ylabel="relative gradient error (float64)",
           title="gradient error vs exact backprop")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"{device_name(device)} | UNet {args.model}, batch {args.batch}, {args.size}x{args.size}, {args.method}", fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, f"adjoint_memory_{tag}.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
