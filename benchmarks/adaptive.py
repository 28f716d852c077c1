"""Adaptive odeint against torchdiffeq (and torchode when installed), side by side in one run: Van
der Pol (mu 1 and 5), Lotka-Volterra, a neural ODE and a CNF-sized one (rows()), dopri5 at the same
tolerances for every solver. Per row and solver (COLUMNS; RESULTS.md, "Adaptive odeint against
torchdiffeq"): the error against scipy's DOP853 at 1e-13, the evaluations, the no-grad and training
step times and their ratios to torchdiffeq's odeint (harness.interleaved), the memory autograd holds
for the backward, and the gradient error against a tight-tolerance float64 reference.

    OMP_NUM_THREADS=1 python benchmarks/adaptive.py              # every row (the cnf row alone is long)
    OMP_NUM_THREADS=1 python benchmarks/adaptive.py --rows vdp1 mlp

Results: OUT/adaptive.jsonl (harness.Results: an interrupted run resumes).
"""
from __future__ import annotations

import copy
import json

import torch

import harness
import prg_fast

D = torch.float64


class Counting(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f, self.n = f, 0

    def forward(self, t, y):
        self.n += 1
        return self.f(t, y)


class MLP(torch.nn.Module):
    """A velocity MLP on [y, t]; `gain` scales the initial weights (livelier dynamics than at init)."""

    def __init__(self, dim, width, depth=2, gain=3.0):
        super().__init__()
        layers, d = [], dim + 1
        for _ in range(depth):
            layers += [torch.nn.Linear(d, width), torch.nn.Tanh()]
            d = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(d, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(gain if p.dim() > 1 else 1.0)

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(y.shape[0], 1).to(y.dtype)], 1))


def _vdp(mu):
    return lambda t, y: torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


def _lotka(t, y):
    return torch.stack([1.5 * y[..., 0] - y[..., 0] * y[..., 1], -3 * y[..., 1] + y[..., 0] * y[..., 1]], -1)


def rows():
    """name -> (velocity, y0, t, rtol, atol); a velocity module's parameters are trained. The rows named
    ..._t: t requires grad too (t[0] moves the grid, each later time its output)."""
    torch.manual_seed(0)
    lin = lambda n, a, b: torch.linspace(a, b, n, dtype=D)  # noqa: E731
    base = {
        "vdp1": (_vdp(1.0), torch.tensor([2.0, 0.0], dtype=D), lin(11, 0, 10), 1e-7, 1e-9),
        "vdp5": (_vdp(5.0), torch.tensor([2.0, 0.0], dtype=D), lin(11, 0, 10), 1e-7, 1e-9),
        "lotka": (_lotka, torch.tensor([1.0, 1.0], dtype=D), lin(21, 0, 10), 1e-7, 1e-9),
        "mlp": (MLP(2, 64), torch.randn(64, 2), torch.linspace(0, 10, 11), 1e-6, 1e-8),
        "cnf": (MLP(16, 256), torch.randn(512, 16), torch.linspace(0, 10, 5), 1e-6, 1e-8),
    }
    return {**base, **{n + "_t": (f, y0, t.clone().requires_grad_(), r, a) for n, (f, y0, t, r, a) in base.items()
                       if n in ("vdp1", "mlp")}}


def reference(f, y0, t):
    from scipy.integrate import solve_ivp

    f64 = copy.deepcopy(f).double() if isinstance(f, torch.nn.Module) else f
    shape = y0.shape

    def fun(s, y):
        with torch.no_grad():
            return f64(torch.tensor(s, dtype=D), torch.tensor(y, dtype=D).reshape(shape)).reshape(-1).numpy()

    sol = solve_ivp(fun, (float(t[0]), float(t[-1])), y0.double().reshape(-1).numpy(), method="DOP853", rtol=1e-13,
                    atol=1e-13, t_eval=t.detach().double().numpy())
    return torch.tensor(sol.y.T, dtype=D).reshape((len(t),) + tuple(shape))


def solvers(name, f, t):
    """solver name -> solve(velocity, y0) for one row (f, t: the row's velocity, whose parameters train, and times)."""
    import torchdiffeq

    _, _, _, rtol, atol = rows()[name]
    tol = dict(rtol=rtol, atol=atol)
    ours = lambda **kw: (lambda g, y: prg_fast.odeint(g, y, t, method="dopri5", **tol, **kw))  # noqa: E731
    return {
        "prg_fast": ours(),
        "prg_fast_budget0": ours(memory_budget=0),
        "prg_fast_backprop": ours(adjoint=False),
        "torchdiffeq": lambda g, y: torchdiffeq.odeint(g, y, t, method="dopri5", **tol),
        "torchdiffeq_adjoint": lambda g, y: torchdiffeq.odeint_adjoint(g, y, t, method="dopri5", **tol,
                                                                       adjoint_params=tuple(_params(f))),
        **(_torchode(t, tol) if not t.requires_grad else {}),  # (torchode's t_eval takes no gradient)
    }


def _torchode(t, tol) -> dict:
    """torchode's dopri5 (backprop through its solver: AutoDiffAdjoint), when it imports. Its problems
    are per batch row: the whole state is one row, so its error norm is torchdiffeq's and ours."""
    try:
        import torchode
    except ImportError:
        print("torchode not importable: its rows are left out")
        return {}

    def solve(g, y):
        term = torchode.ODETerm(lambda s, z: g(s[0], z.reshape(y.shape)).reshape(1, -1))
        method = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), torchode.IntegralController(term=term, **tol))
        sol = method.solve(torchode.InitialValueProblem(y0=y.reshape(1, -1), t_eval=t[None].to(y.dtype)))
        return sol.ys[0].reshape(len(t), *y.shape)
    return {"torchode": solve}


def _params(f, t=None):
    """What a training step differentiates besides y0: t when it requires grad, a velocity module's parameters."""
    return ([t] if t is not None and t.requires_grad else []) + (list(f.parameters()) if isinstance(f, torch.nn.Module)
                                                                 else [])


def train_step(solve, f, y0, t):
    y = y0.clone().requires_grad_()
    wrapped = f if isinstance(f, torch.nn.Module) else Counting(f)
    return torch.autograd.grad((solve(wrapped, y) ** 2).sum(), [y] + _params(f, t))


def grad_reference(f, y0, t):
    """The training step's gradient (train_step's) in float64 by dopri8 at 1e-12."""
    f = copy.deepcopy(f).double() if isinstance(f, torch.nn.Module) else f
    y, t = y0.double().requires_grad_(), t.detach().double().requires_grad_(t.requires_grad)
    # the recomputing adjoint (equal to plain backprop: test_adaptive), so memory stays flat in the steps
    ys = prg_fast.odeint(f, y, t, method="dopri8", rtol=1e-12, atol=1e-12, memory_budget=0,
                         options=dict(max_num_steps=10 ** 6))
    return torch.autograd.grad((ys ** 2).sum(), [y] + _params(f, t))


def held_mb(solve, f, y0):
    """MB that autograd holds for the backward at the end of the forward: the unique storages saved
    (saved-tensor hooks see autograd's saved tensors and save_for_backward alike), the memory a
    training step keeps between forward and backward, independent of the allocator."""
    seen = {}

    def pack(x):
        seen[(x.untyped_storage().data_ptr(), x.device)] = x.untyped_storage().nbytes()
        return x

    y = y0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = solve(f, y)
    del ys
    return sum(seen.values()) / 2 ** 20


def bench_row(name, args, log):
    """One row's cells, each solver a line of the results file (already measured ones are kept)."""
    f, y0, t, _, _ = rows()[name]
    fns = solvers(name, f, t)
    keys = [dict(row=name, solver=solver) for solver in fns]

    def accuracy():
        exact, cells = reference(f, y0, t), []
        for solve in fns.values():
            counted = Counting(f)
            with torch.no_grad():
                ys = solve(counted, y0)
            cells.append(dict(err=(ys.double() - exact).abs().max().item(), nfe=counted.n))
        return cells

    def gradients():
        g_ref, cells = grad_reference(f, y0, t), []
        for solve in fns.values():
            cells.append(dict(grad_err=harness.rel_err(train_step(solve, f, y0, t), g_ref),
                              held_mb=held_mb(solve, f, y0)))
        return cells

    def times(field, make):
        timed = harness.interleaved({s: make(solve) for s, solve in fns.items()}, args.reps, anchor="torchdiffeq",
                                    min_run_time=args.min_run_time)
        return [{field: timed[s]["seconds"], field + "_ratio": timed[s]["ratio"]} for s in fns]

    log.measure(keys, "err", accuracy)
    log.measure(keys, "nograd", lambda: times("nograd", lambda solve: torch.no_grad()(lambda: solve(f, y0))))
    log.measure(keys, "grad_err", gradients)
    log.measure(keys, "train", lambda: times("train", lambda solve: lambda: train_step(solve, f, y0, t)))
    for key in keys:
        print(json.dumps(log.get(key)), flush=True)
    return log.rows(keys)


COLUMNS = [("row", "row"), ("solver", "solver"), ("error vs DOP853", "err", ".3g"), ("evaluations", "nfe"),
           ("no-grad s", "nograd", ".3g"), ("/ torchdiffeq", "nograd_ratio", ".2f"),
           ("training step s", "train", ".3g"), ("/ torchdiffeq", "train_ratio", ".2f"),
           ("held MB", "held_mb", ".3g"), ("gradient error", "grad_err", ".3g")]


def main(argv=None):
    p = harness.parser("adaptive", __doc__)
    p.add_argument("--rows", nargs="+", default=list(rows()), choices=list(rows()))  # (every row: ~an hour)
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed block (harness.interleaved)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"{harness.machine()}\ntime: {harness.clock_name(torch.device('cpu'), threads)}, median of {args.reps} "
          "interleaved rounds; ratios: median of the per-round ratios to torchdiffeq's odeint", flush=True)
    log = harness.Results(args, "adaptive", dict(reps=args.reps, min_run_time=args.min_run_time, threads=threads),
                          key=("row", "solver"))
    results = [cell for name in args.rows for cell in bench_row(name, args, log)]
    print(harness.table(results, COLUMNS))


if __name__ == "__main__":
    main()
