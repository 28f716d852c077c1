"""The headline: memory, time and gradient error of differentiating through a fixed-step reverse
solve, for K steps, one row per strategy on the same grid:

    backprop      prg_fast.reverse(adjoint=False): plain autograd through the solver
    auto          prg_fast.reverse(): the default, memory_budget="auto" (graphs kept within half the
                  memory free at the call; whole kept steps differentiated as one graph)
    budget_0      memory_budget=0: exact adjoint, every evaluation recomputed ("prg_fast" is
                  accepted as its old name)
    budget_half   memory_budget = half of the K*s evaluation graphs' bytes: the last half kept
    budget_inf    memory_budget=float("inf"): every evaluation's graph kept, nothing recomputed
    steps         store="steps": one state per step stored, stage inputs recomputed
    reversible    reversible=True: McCallum-Foster reversible scheme, nothing stored
    tdq           torchdiffeq.odeint: plain autograd through torchdiffeq's solver
    tdq_adjoint   torchdiffeq.odeint_adjoint: continuous adjoint re-integrated backwards

Memory: the peak above the baseline during forward+backward. CUDA: torch.cuda.max_memory_allocated
(reset before each run). CPU: the peak RSS of one fresh worker process that runs every cell in
turn, its high-water mark reset (/proc/self/clear_refs) before each cell, glibc told to return
freed memory at once (so RSS follows live memory) -- this counts every allocation, torch's and
Python's, not only saved tensors.

Time: forward+backward, relative to plain backprop *measured in the same run*: every repeat runs
all strategies back to back (order rotated per repeat), the ratio to that repeat's backprop is
taken, and the median over repeats is reported, so load changes on a shared machine hit both.

Gradient error: relative L2 error of the gradients (input and all parameters) against float64
plain backprop through the same solver; for `reversible` against float64 plain backprop through
the same reversible scheme (it is a different discretisation of the ODE).

    python benchmarks/adjoint_memory.py            # UNet "tiny" 16x16, K = 4, 8, 16 on the CPU (<= 5 min
                                                   # on 2 cores); "cifar" on a GPU
    python benchmarks/adjoint_memory.py --full     # adds K = 64 (plain backprop holds ~1.2 GB there)
    python benchmarks/adjoint_memory.py --quick    # the same claim at K = 2, 4 (~1.5 min)

Results go to --out (default runs/benchmarks/adjoint_memory/, which git ignores): every measurement
is appended to adjoint_memory_TAG.jsonl the moment it is taken (one line per strategy and K, per
measure: peak memory, gradient error, time), so an interrupted run keeps what it measured and the
same command resumes it, measuring only what is missing (--fresh starts over). At the end the table
is printed and adjoint_memory_TAG.json and adjoint_memory_TAG.png are written beside it.
"""
from __future__ import annotations

import argparse
import gc
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
from prg_fast.ode.solvers import SOLVERS

IMPLS = ("backprop", "auto", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq", "tdq_adjoint")
TDQ_METHOD = {"euler": "euler", "midpoint": "midpoint", "rk4_38": "rk4"}  # torchdiffeq's names
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "runs", "benchmarks", "adjoint_memory")  # git-ignored
MEASURES = ("peak_bytes", "grad_rel_err", "time_ratio")  # what a finished cell holds


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


_GRAPH_BYTES: dict = {}


def graph_bytes(model, x, steps, method) -> int:
    """Bytes of one evaluation's graph as the adjoint measures it (its first evaluation,
    saved-tensor hooks), read from the backward node of an unlimited-budget solve."""
    key = (id(model), tuple(x.shape), x.dtype, x.device, method)
    if key not in _GRAPH_BYTES:
        out = prg_fast.reverse(model, x, steps=1, method=method, memory_budget=float("inf"))
        node = out.grad_fn
        while node is not None and not hasattr(node, "evals"):
            node = node.next_functions[0][0]
        _GRAPH_BYTES[key] = node.evals.graph_bytes
        del out, node
    return _GRAPH_BYTES[key]


def strategy_kwargs(impl, model, x, steps, method) -> dict:
    if impl == "backprop":
        return dict(adjoint=False)
    if impl == "auto":
        return {}
    if impl in ("prg_fast", "budget_0"):
        return dict(memory_budget=0)
    if impl == "budget_half":
        evals = steps * SOLVERS[method].stages
        return dict(memory_budget=(evals // 2) * graph_bytes(model, x, steps, method))
    if impl == "budget_inf":
        return dict(memory_budget=float("inf"))
    if impl == "steps":
        return dict(store="steps")
    if impl == "reversible":
        return dict(reversible=True)
    raise ValueError(f"unknown strategy {impl!r}")


def run_once(impl, model, x, steps, method, reference=False):
    """Forward + backward; returns the output (detached) and the gradients. `reference`: plain
    backprop through the scheme `impl` discretises (the reversible scheme for "reversible")."""
    params = list(model.parameters())
    if impl.startswith("tdq"):
        import torchdiffeq

        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).to(x.dtype).to(x.device)
        func = TorchdiffeqFunc(model)
        if impl == "tdq":
            out = torchdiffeq.odeint(func, x, grid, method=TDQ_METHOD[method])[-1]
        else:
            out = torchdiffeq.odeint_adjoint(func, x, grid, method=TDQ_METHOD[method], adjoint_params=params)[-1]
    else:
        kw = strategy_kwargs(impl, model, x, steps, method)
        if reference:
            kw = dict(adjoint=False, reversible=kw.get("reversible", False))
        out = prg_fast.reverse(model, x, steps=steps, method=method, **kw)
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ratios(args, impls, steps, device):
    """Median over interleaved repeats of (strategy time / backprop time of the same repeat), and
    the median seconds of each strategy."""
    model, x = build(args, device, torch.float32)
    for impl in impls:
        run_once(impl, model, x, min(steps, 2), args.method)  # warm-up
    secs = {impl: [] for impl in impls}
    for rep in range(args.reps):
        order = impls[rep % len(impls):] + impls[: rep % len(impls)]
        for impl in order:
            _sync(device)
            t0 = time.perf_counter()
            run_once(impl, model, x, steps, args.method)
            _sync(device)
            secs[impl].append(time.perf_counter() - t0)
    ratios = {i: statistics.median(a / b for a, b in zip(secs[i], secs["backprop"])) for i in impls}
    return ratios, {i: statistics.median(v) for i, v in secs.items()}


def cuda_peaks(args, impls, steps, device):
    model, x = build(args, device, torch.float32)
    peaks = {}
    for impl in impls:
        run_once(impl, model, x, min(steps, 2), args.method)
        gc.collect()
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(impl, model, x, steps, args.method)
        _sync(device)
        peaks[impl] = torch.cuda.max_memory_allocated() - base
    return peaks


def cpu_peaks_subprocess(args, impls, steps):
    """{(impl, K): peak bytes} at one K from one fresh worker process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    passthrough = ["--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
                   "--method", args.method, "--device", "cpu", "--steps", str(steps)]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(impls)] + passthrough
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{res.stderr[-3000:]}")
    return {(i, k): v for i, k, v in json.loads(res.stdout.strip().splitlines()[-1])}


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args, impls):
    """Runs in a fresh process: the peak RSS of forward+backward above the RSS before it, per cell."""
    device = torch.device("cpu")
    model, x = build(args, device, torch.float32)
    for impl in impls:
        run_once(impl, model, x, min(args.steps[0], 2), args.method)  # warm-up
    cells = []
    for steps in args.steps:
        for impl in impls:
            if impl == "budget_half":
                graph_bytes(model, x, steps, args.method)  # its measuring solve is not part of the cell
            gc.collect()
            # reset the high-water mark to the live memory now, then read its growth from that mark
            # (not from a later VmRSS read: RSS can move between the reset and the read, which gave
            # a peak of -0.05 MiB once at --quick sizes)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = proc_status_kib("VmHWM")
            run_once(impl, model, x, steps, args.method)
            cells.append((impl, steps, (proc_status_kib("VmHWM") - base) * 1024))
    print(json.dumps(cells))


def grad_errors(args, device, steps, impls=IMPLS):
    """Relative gradient error of each implementation against float64 plain backprop through the
    scheme it discretises."""
    model, x = build(args, device, torch.float64)
    x.data = x.data[: args.grad_batch]
    truth = {}
    errs = {}
    for impl in impls:
        ref_key = "reversible" if impl == "reversible" else "base"
        if ref_key not in truth:
            truth[ref_key] = run_once(impl if impl == "reversible" else "backprop", model, x, steps, args.method,
                                      reference=True)[1]
        _, grads = run_once(impl, model, x, steps, args.method)
        num = sum(((a - b) ** 2).sum() for a, b in zip(grads, truth[ref_key])).sqrt()
        den = sum((b**2).sum() for b in truth[ref_key]).sqrt()
        errs[impl] = (num / den).item()
    return errs


def plot(rows, impls, steps_list, title, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    by = {(r["impl"], r["steps"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "os^vDPX*"
    for j, impl in enumerate(impls):
        pts = [by[(impl, k)] for k in steps_list]
        ax.plot([p["time_ratio"] for p in pts], [p["peak_mib"] for p in pts], marker=markers[j % len(markers)],
                linestyle=":", label=impl)
        for p in pts:
            ax.annotate(f"K={p['steps']}", (p["time_ratio"], p["peak_mib"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.set(yscale="log", xlabel="forward+backward time / plain backprop (same run, median)",
           ylabel="peak memory above baseline (MiB, log)", title="adjoint strategies: memory against time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class CellLog:
    """The JSON-lines record of one configuration's measurements: a header line with the settings,
    then one line per (K, strategy, measure) appended -- and flushed -- as it is measured."""

    def __init__(self, path: str, config: dict, fresh: bool):
        self.path, self.cells = path, {}
        if fresh and os.path.exists(path):
            os.remove(path)
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if lines and lines[0].get("config") != config:
                raise SystemExit(f"{path} holds a run with other settings ({lines[0].get('config')}); pass --fresh "
                                 "to start over or another --out")
            for line in lines[1:]:
                self.cells.setdefault((line["steps"], line["impl"]), {}).update(line)
            print(f"resuming from {path}: {len(self.cells)} cells measured before")
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps(dict(config=config)) + "\n")

    def has(self, steps: int, impls, key: str) -> bool:
        return all(key in self.cells.get((steps, i), {}) for i in impls)

    def add(self, steps: int, values: dict) -> None:
        """values: {impl: {measure: value}} for one K, appended and flushed at once."""
        with open(self.path, "a") as f:
            for impl, fields in values.items():
                self.cells.setdefault((steps, impl), {}).update(dict(steps=steps, impl=impl, **fields))
                f.write(json.dumps(dict(steps=steps, impl=impl, **fields)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def measure_k(args, log, impls, steps, device):
    """Peak memory, gradient errors and time ratios at one K, each skipped when the log has it."""
    if not log.has(steps, impls, "peak_bytes"):
        if device.type == "cuda":
            peaks = cuda_peaks(args, impls, steps, device)
        else:
            peaks = {i: v for (i, k), v in cpu_peaks_subprocess(args, impls, steps).items()}
        log.add(steps, {i: dict(peak_bytes=peaks[i]) for i in impls})
    if not log.has(steps, impls, "grad_rel_err"):
        log.add(steps, {i: dict(grad_rel_err=e) for i, e in grad_errors(args, device, steps, impls).items()})
    if not log.has(steps, impls, "time_ratio"):
        ratios, secs = time_ratios(args, impls, steps, device)
        log.add(steps, {i: dict(time_ratio=ratios[i], seconds=secs[i]) for i in impls})
    rows = []
    for impl in impls:
        c = log.cells[(steps, impl)]
        rows.append(dict(impl=impl, steps=steps, peak_mib=c["peak_bytes"] / 2**20, seconds=c["seconds"],
                         time_ratio=c["time_ratio"], grad_rel_err=c["grad_rel_err"]))
        print(f"  K={steps:<3d} {impl:<12s} peak {rows[-1]['peak_mib']:9.1f} MiB  {c['seconds'] * 1e3:9.1f} ms  "
              f"x{c['time_ratio']:.3f} of backprop  grad rel err {c['grad_rel_err']:.2e}", flush=True)
    return rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K = 2, 4 at a size where activations still dominate (~1.5 min)")
    p.add_argument("--full", action="store_true", help="add K = 64 to the default K = 4, 8, 16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="UNet preset (default: cifar on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image size")
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--method", default="euler", choices=sorted(TDQ_METHOD))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--reps", type=int, default=None, help="interleaved timing repeats")
    p.add_argument("--grad-batch", type=int, default=2, help="batch for the float64 gradient check")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON lines, the JSON and the PNG")
    p.add_argument("--figures", default=None, help="folder for the PNG (default: --out)")
    p.add_argument("--fresh", action="store_true", help="discard the cells an earlier run of these settings measured")
    p.add_argument("--worker", metavar="IMPLS", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("cifar" if cuda else "tiny")
    # --quick keeps the default's image (activations well above the stored states and the
    # allocator's noise, so the adjoint's saving shows) and shortens K and the repeats
    args.batch = args.batch or (64 if cuda else 8)
    args.size = args.size or (32 if cuda else 16)
    args.steps = args.steps or ([2, 4] if args.quick else [4, 8, 16] + ([64] if args.full else []))
    args.reps = args.reps or (2 if args.quick else 3)
    args.figures = args.figures or args.out
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.worker:
        worker(args, args.worker.split(","))
        return
    impls = list(args.impls)
    if "backprop" not in impls:
        impls.insert(0, "backprop")  # the time reference
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        print("torchdiffeq not importable: its rows are left out")
        impls = [i for i in impls if not i.startswith("tdq")]

    print(f"device: {device_name(device)}; torch {torch.__version__}; prg_fast backend: "
          f"{prg_fast.ode.backends.resolve('auto', device)[0]}")
    print(f"model: UNet '{args.model}' ({sum(q.numel() for q in build(args, device, torch.float32)[0].parameters()) / 1e6:.2f}M params), "
          f"x: ({args.batch}, 3, {args.size}, {args.size}), method: {args.method}, "
          f"memory: {'max_memory_allocated' if cuda else 'peak RSS of a fresh worker process per K, reset per cell'}, "
          f"time: median of {args.reps} interleaved repeats")
    tag = f"{device.type}_{args.model}_{args.method}" + ("_quick" if args.quick else "")
    config = dict(device=device_name(device), model=args.model, batch=args.batch, size=args.size, method=args.method,
                  reps=args.reps, grad_batch=args.grad_batch, torch=torch.__version__)
    log = CellLog(os.path.join(args.out, f"adjoint_memory_{tag}.jsonl"), config, args.fresh)
    rows = []
    for steps in args.steps:
        rows += measure_k(args, log, impls, steps, device)

    print("\n| K | strategy | peak MiB | ms (median) | time / backprop | grad rel err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['impl']} | {r['peak_mib']:.1f} | {r['seconds'] * 1e3:.0f} | "
              f"{r['time_ratio']:.2f} | {r['grad_rel_err']:.1e} |")
    by = {(r["impl"], r["steps"]): r for r in rows}
    print("\nmemory, adjoint (budget_0) against plain backprop: " + ", ".join(
        f"K={k}: {by[('budget_0', k)]['peak_mib']:.1f} vs {by[('backprop', k)]['peak_mib']:.1f} MiB"
        for k in args.steps if ("budget_0", k) in by))

    with open(os.path.join(args.out, f"adjoint_memory_{tag}.json"), "w") as f:
        json.dump(dict(device=device_name(device), args={k: v for k, v in vars(args).items()}, rows=rows), f, indent=1)
    title = (f"{device_name(device)} | UNet {args.model}, batch {args.batch}, {args.size}x{args.size}, "
             f"{args.method}, K in {args.steps}")
    path = plot(rows, impls, args.steps, title, os.path.join(args.figures, f"adjoint_memory_{tag}.png"))
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
