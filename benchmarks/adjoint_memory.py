"""The headline: memory, time and gradient error of differentiating through a fixed-step reverse
solve, for K steps, one row per strategy of IMPLS on the same grid (plain backprop, the adjoint's
memory budgets, store="steps", reversible, torchdiffeq's odeint and odeint_adjoint): per (method,
K) the peak memory above the baseline during forward+backward (a fresh process per K on the CPU),
the time and its ratio to plain backprop in the same rounds (harness.interleaved), and the relative
L2 error of all gradients against float64 plain backprop through the same scheme. The UNet's
zero-initialised output layers get random weights (a fresh UNet's v = 0 is a trivial ODE); --velocity
mlp is a small MLP where the adjoint's per-call bookkeeping shows. RESULTS.md, "ODE engine: adjoint
strategies", has the rows and the method.

    python benchmarks/adjoint_memory.py            # UNet "tiny" 16x16, K = 4, 8, 16 on the CPU; "cifar" on a GPU
    python benchmarks/adjoint_memory.py --full     # adds K = 64 (plain backprop holds ~1.2 GB there)
    python benchmarks/adjoint_memory.py --quick    # the same claim at K = 2, 4
    python benchmarks/adjoint_memory.py --velocity mlp --reps 31   # the bookkeeping at small sizes

Results: OUT/adjoint_memory_TAG.jsonl (resumable), the tables, and OUT/adjoint_memory_TAG_METHOD.png.
"""
from __future__ import annotations

import os

import torch

import harness
import prg_fast
from prg_fast.models import UNet
from prg_fast.ode.solvers import SOLVERS

IMPLS = ("backprop", "auto", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq", "tdq_adjoint")
MLP_IMPLS = ("backprop", "auto", "budget_inf", "budget_0")
TDQ_METHOD = {"euler": "euler", "midpoint": "midpoint", "rk4_38": "rk4"}  # torchdiffeq's names (same tableaus)


class MLP(torch.nn.Module):
    """v(t, x) = W2 tanh(W1 x + w t + b1) + b2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        self.time = torch.nn.Parameter(torch.randn(hidden) * 0.1)

    def forward(self, t, x):
        return self.out(torch.tanh(self.inp(x) + t[:, None] * self.time))


class TorchdiffeqFunc(torch.nn.Module):
    """torchdiffeq calls func(t, y) with a 0-dim t; our models take t of shape (B,)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, t, y):
        return self.model(t.expand(y.shape[0]), y)


def trained_like_unet(preset: str, size: int) -> UNet:
    """A UNet preset (seed 0) whose zero-initialised layers are drawn like a trained network's: a fresh
    UNet's v = 0 is a trivial ODE whose every adjoint is exact."""
    torch.manual_seed(0)
    model = UNet.preset(preset, in_channels=3, image_size=size, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


def build(args, device, dtype):
    if args.velocity == "mlp":
        torch.manual_seed(0)
        model, shape = MLP(args.dim, args.hidden), (args.batch, args.dim)
    else:
        model, shape = trained_like_unet(args.model, args.size), (args.batch, 3, args.size, args.size)
    model = model.to(device, dtype)  # x drawn after the model, as the recorded tables were
    return model, torch.randn(shape, device=device, dtype=dtype, requires_grad=True)


_GRAPH_BYTES: dict = {}


def graph_bytes(model, x, method) -> int:
    """Bytes of one evaluation's graph as the adjoint measures it, read from an unlimited-budget solve."""
    key = (id(model), tuple(x.shape), x.dtype, x.device, method)
    if key not in _GRAPH_BYTES:
        node = prg_fast.reverse(model, x, steps=1, method=method, memory_budget=float("inf")).grad_fn
        while node is not None and not hasattr(node, "evals"):
            node = node.next_functions[0][0]
        _GRAPH_BYTES[key] = node.evals.graph_bytes
    return _GRAPH_BYTES[key]


def strategy_kwargs(impl, model, x, steps, method) -> dict:
    if impl == "budget_half":
        return dict(memory_budget=(steps * SOLVERS[method].stages // 2) * graph_bytes(model, x, method))
    return {"backprop": dict(adjoint=False), "auto": {}, "budget_0": dict(memory_budget=0),
            "budget_inf": dict(memory_budget=float("inf")), "steps": dict(store="steps"),
            "reversible": dict(reversible=True)}[impl]


def run_once(impl, model, x, steps, method, reference=False):
    """Forward + backward; the gradients of (x, parameters). `reference`: plain backprop through the
    scheme `impl` discretises (the reversible scheme for "reversible")."""
    params = list(model.parameters())
    if impl.startswith("tdq"):
        import torchdiffeq

        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).to(x.dtype).to(x.device)
        solve = torchdiffeq.odeint if impl == "tdq" else torchdiffeq.odeint_adjoint
        kw = {} if impl == "tdq" else dict(adjoint_params=params)
        out = solve(TorchdiffeqFunc(model), x, grid, method=TDQ_METHOD[method], **kw)[-1]
    else:
        kw = strategy_kwargs(impl, model, x, steps, method)
        if reference:
            kw = dict(adjoint=False, reversible=kw.get("reversible", False))
        out = prg_fast.reverse(model, x, steps=steps, method=method, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    return torch.autograd.grad(out, [x] + params, g)


def cell_fns(args, impls, steps, method, device, dtype=torch.float32):
    model, x = build(args, device, dtype)
    return {impl: (lambda impl=impl: run_once(impl, model, x, steps, method)) for impl in impls}


def grad_errors(args, impls, steps, method, device):
    """Relative gradient error of each strategy against float64 plain backprop through its scheme."""
    model, x = build(args, device, torch.float64)
    x.data = x.data[:2]  # a small batch: float64
    truth = {ref: run_once(ref, model, x, steps, method, reference=True) for ref in ("backprop", "reversible")
             if ref == "backprop" or "reversible" in impls}
    return [{"grad_rel_err": harness.rel_err(run_once(impl, model, x, steps, method),
                                             truth["reversible" if impl == "reversible" else "backprop"])}
            for impl in impls]


def measure_cell(args, log, impls, method, steps, device):
    keys = [dict(method=method, steps=steps, impl=i) for i in impls]
    if args.velocity == "unet":  # the MLP rows: time only
        def peak():
            got = harness.peaks_here_or_fresh(lambda: cell_fns(args, impls, steps, method, device), device,
                                              ["--methods", method, "--steps", steps, "--impls", *impls])
            return [{"peak_bytes": got[i]} for i in impls]
        log.measure(keys, "peak_bytes", peak)
        log.measure(keys, "grad_rel_err", lambda: grad_errors(args, impls, steps, method, device))

    def times():
        t = harness.interleaved(cell_fns(args, impls, steps, method, device), args.reps, anchor="backprop",
                                device=device, threads=torch.get_num_threads())
        return [{"seconds": t[i]["seconds"], "time_ratio": t[i]["ratio"]} for i in impls]

    log.measure(keys, "time_ratio", times)
    for r in log.rows(keys):
        print(f"  {method} K={steps:<3d} {r['impl']:<12s} " + ", ".join(
            f"{k} {r[k]:.4g}" for k in ("peak_bytes", "seconds", "time_ratio", "grad_rel_err") if k in r), flush=True)
    return log.rows(keys)


def plot(rows, impls, method, title, path):
    plt = harness.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for j, impl in enumerate(impls):
        pts = [r for r in rows if r["impl"] == impl and r["method"] == method]
        ax.plot([p["time_ratio"] for p in pts], [p["peak_bytes"] / 2 ** 20 for p in pts], marker="os^vDPX*"[j % 8],
                linestyle=":", label=impl)
        for p in pts:
            ax.annotate(f"K={p['steps']}", (p["time_ratio"], p["peak_bytes"] / 2 ** 20), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.set(yscale="log", xlabel="forward+backward time / plain backprop (same rounds, median)",
           ylabel="peak memory above baseline (MiB, log)", title="adjoint strategies: memory against time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=7)
    harness.save_figure(fig, path)
    print(f"wrote {path}")


def parse_args(argv=None):
    p = harness.parser("adjoint_memory", __doc__)
    p.add_argument("--velocity", choices=("unet", "mlp"), default="unet")
    p.add_argument("--quick", action="store_true", help="K = 2, 4 at the default image (activations still dominate)")
    p.add_argument("--full", action="store_true", help="add K = 64 to the default K = 4, 8, 16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="UNet preset (default: cifar on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image size")
    p.add_argument("--dim", type=int, default=64, help="--velocity mlp: state dimension")
    p.add_argument("--hidden", type=int, default=256, help="--velocity mlp: hidden width")
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--methods", "--method", nargs="+", default=None, choices=sorted(TDQ_METHOD) + ["rk4", "heun"])
    p.add_argument("--impls", "--rows", nargs="+", default=None, choices=IMPLS)
    p.add_argument("--reps", type=int, default=None, help="interleaved timing rounds")
    p.add_argument("--figures", default=None, help="folder for the PNG (default: --out)")
    args = p.parse_args(argv)
    cuda, mlp = args.device.startswith("cuda"), args.velocity == "mlp"
    args.model = None if mlp else args.model or ("cifar" if cuda else "tiny")
    args.batch = args.batch or (64 if cuda or mlp else 8)
    args.size = args.size or (32 if cuda else 16)
    args.methods = args.methods or (["euler", "rk4"] if mlp else ["euler"])
    args.steps = args.steps or ([20, 100] if mlp else [2, 4] if args.quick else [4, 8, 16] + [64] * args.full)
    args.impls = ["backprop"] + [i for i in (args.impls or (MLP_IMPLS if mlp else IMPLS)) if i != "backprop"]
    args.reps = args.reps or (15 if mlp else 2 if args.quick else 3)
    args.figures = args.figures or args.out
    if any(m in ("rk4", "heun") for m in args.methods) and any(i.startswith("tdq") for i in args.impls):
        p.error("the torchdiffeq rows take euler, midpoint or rk4_38 (torchdiffeq's rk4)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.peak_worker:
        harness.peak_worker(cell_fns(args, args.impls, args.steps[0], args.methods[0], device))
        return
    if not harness.importable("torchdiffeq", "its rows are"):
        args.impls = [i for i in args.impls if not i.startswith("tdq")]
    what = f"UNet '{args.model}', x ({args.batch}, 3, {args.size}, {args.size})" if args.model else \
        f"MLP {args.dim}->{args.hidden}->{args.dim}, batch {args.batch}"
    print(f"{harness.machine(device)}\nprg_fast backend {prg_fast.ode.backends.resolve('auto', device)[0]}; {what}; "
          f"time: {harness.clock_name(device, torch.get_num_threads())}, median of {args.reps} interleaved rounds")
    tag = f"{device.type}_{args.model or 'mlp'}" + ("_quick" if args.quick else "")
    config = dict(velocity=args.velocity, model=args.model, batch=args.batch, size=args.size, dim=args.dim,
                  hidden=args.hidden, reps=args.reps, grad_batch=2, device=device.type)
    log = harness.Results(args, f"adjoint_memory_{tag}", config, key=("method", "steps", "impl"), device=device)
    rows = [r for m in args.methods for k in args.steps for r in measure_cell(args, log, args.impls, m, k, device)]
    if args.velocity == "unet":
        for method in args.methods:
            print(f"\n{method}:\n" + harness.table([r for r in rows if r["method"] == method], [
                ("K", "steps"), ("strategy", "impl"), ("peak MiB", lambda r: r["peak_bytes"] / 2 ** 20, ".1f"),
                ("ms (median)", lambda r: 1e3 * r["seconds"], ".0f"), ("time / backprop", "time_ratio", ".2f"),
                ("grad rel err", "grad_rel_err", ".1e")]))
    cells = [dict(method=m, steps=k, by={i: log.get(dict(method=m, steps=k, impl=i)) for i in args.impls})
             for m in args.methods for k in args.steps]
    print("\n" + harness.table(cells, [("method", "method"), ("K", "steps")] + [
        (f"{i} ms", lambda c, i=i: 1e3 * c["by"][i]["seconds"], ".1f") for i in args.impls] + [
        (f"{i} / backprop", lambda c, i=i: c["by"][i]["time_ratio"], ".3f") for i in args.impls[1:]]))
    if args.velocity == "unet" and len(args.steps) > 1:
        for method in args.methods:
            plot(rows, args.impls, method, harness.machine(device) + f" | {what}, {method}, K in {args.steps}",
                 os.path.join(args.figures, f"adjoint_memory_{tag}_{method}.png"))


if __name__ == "__main__":
    main()
