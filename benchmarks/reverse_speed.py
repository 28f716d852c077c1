"""Speed of reverse() against torchdiffeq (and torchode) on the same grid, and the integrator's own
cost over the network's (harness.interleaved, every function of a case in turn per round).

UNet case (--cases unet, per preset and batch), no-grad solves, rk4_38 (= torchdiffeq's "rk4"): the
network evaluations alone (the floor), prg_fast.reverse (with cuda_graph=True too on CUDA, and where
a captured graph stops paying: graph_crossover), torchdiffeq.odeint. Small-network case (--cases
mlp): an MLP velocity on a 1024 x 64 state, K = 100, where the integrator's own work shows: no-grad
solves (Heun with torchode too), the solvers alone on a velocity that costs nothing, and one training
step (prg_fast's discrete adjoint, torchdiffeq's odeint_adjoint, backprop through torchode).

    python benchmarks/reverse_speed.py            # GPU: tiny/cifar/prg32 x batch 1/8/128
    python benchmarks/reverse_speed.py --quick    # CPU smoke run
    python benchmarks/reverse_speed.py --presets cifar --batches 1 4 16 64   # where CUDA graphs stop paying
    OMP_NUM_THREADS=1 python benchmarks/reverse_speed.py --cases mlp --reps 5   # the MLP case
"""
from __future__ import annotations

import torch

import harness
import prg_fast
from adjoint_memory import TorchdiffeqFunc
from prg_fast.models import UNet

UNET_KEY, MLP_KEY = ("case", "preset", "batch"), ("case", "method")


def unet_fns(preset, batch, args, device):
    import torchdiffeq

    torch.manual_seed(0)
    model = UNet.preset(preset, in_channels=3, image_size=args.size, dropout=0.0).to(device).eval()
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    K, grid, func, t = args.steps, torch.linspace(0, 1, args.steps + 1, device=device), TorchdiffeqFunc(model), \
        torch.rand(batch, device=device)

    @torch.no_grad()
    def net():
        for _ in range(4 * K):
            model(t, x)

    fns = {"net": net, "prg": torch.no_grad()(lambda: prg_fast.reverse(model, x, steps=K, method="rk4_38")),
           "tdq": torch.no_grad()(lambda: torchdiffeq.odeint(func, x, grid, method="rk4"))}
    if device.type == "cuda":
        fns["prg_graph"] = torch.no_grad()(lambda: prg_fast.reverse(model, x, steps=K, method="rk4_38",
                                                                    cuda_graph=True))
        fns["prg_graph"]()  # captured on its first call
    return fns


class MLPVelocity(torch.nn.Module):
    """v(t, x) for x of shape (B, dim): (x, t) -> width -> width -> dim, SiLU."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, t, x):
        # x (B, dim) with t (B,) or 0-dim; also one sample x (dim,) with a 0-dim t (torchode's vmap)
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


def mlp_fns(method, args, device):
    """{column: a callable}: the MLP case's functions for one method."""
    import torchdiffeq

    torch.manual_seed(0)
    B, dim, K = args.mlp_batch, args.mlp_dim, args.mlp_steps
    model = MLPVelocity(dim, args.mlp_width).to(device)
    x = torch.randn(B, dim, device=device)
    grid, func = torch.linspace(0, 1, K + 1, device=device), TorchdiffeqFunc(model)
    span = dict(t_start=torch.zeros(B, device=device), t_end=torch.ones(B, device=device))
    dt0 = torch.full((B,), 1.0 / K, device=device)
    try:
        import torchode

        tode = torchode.AutoDiffAdjoint(torchode.Heun(term=torchode.ODETerm(model)), torchode.FixedStepController())
    except ImportError:
        tode = None
        print("torchode not importable: its columns are left out")
    fixed = ConstantVelocity(torch.randn(B, dim, device=device))
    tdq_method = "rk4" if method == "rk4_38" else "heun2"
    libs = ("prg", "tdq") if method == "rk4_38" or tode is None else ("prg", "tdq", "tode")

    @torch.no_grad()
    def nograd(lib, f=model):
        if lib == "prg":
            return prg_fast.reverse(f, x, steps=K, method=method)
        if lib == "tdq":
            return torchdiffeq.odeint(func if f is model else f, x, grid, method=tdq_method)
        return tode.solve(torchode.InitialValueProblem(y0=x, **span), dt0=dt0)

    def train(lib):
        xg = x.clone().requires_grad_(True)
        if lib == "prg":
            out = prg_fast.reverse(model, xg, steps=K, method=method)
        elif lib == "tdq":
            out = torchdiffeq.odeint_adjoint(func, xg, grid, method=tdq_method, adjoint_params=list(model.parameters()))[-1]
        else:  # backprop through torchode's solver (AutoDiffAdjoint)
            out = tode.solve(torchode.InitialValueProblem(y0=xg, **span), dt0=dt0).ys[:, -1]
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def net():
        for _ in range(K * {"rk4_38": 4, "heun": 2}[method]):
            model(grid[0].expand(B), x)

    fns = {"net": net, **{lib: (lambda lib=lib: nograd(lib)) for lib in libs}}
    fns.update({f"{lib}_solver": (lambda lib=lib: nograd(lib, fixed)) for lib in ("prg", "tdq")})
    fns.update({f"{lib}_train": (lambda lib=lib: train(lib)) for lib in libs})
    return fns


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


def ms(col):
    return lambda r: 1e3 * r[col]


def ratio(a, b):
    return lambda r: r[a] / r[b]


def print_mlp(rows, args):
    print(f"\nMLP velocity ({args.mlp_dim}+1 -> {args.mlp_width} -> {args.mlp_width} -> {args.mlp_dim}, SiLU) on a "
          f"{args.mlp_batch} x {args.mlp_dim} state, K = {args.mlp_steps}; ms")
    print(harness.table(rows, [("method", "method"), ("net alone", ms("net"), ".1f"), ("prg no-grad", ms("prg"), ".1f"),
                               ("tdq no-grad", ms("tdq"), ".1f"), ("tode no-grad", ms("tode"), ".1f"),
                               ("tdq/prg", ratio("tdq", "prg"), ".2f"), ("tode/prg", ratio("tode", "prg"), ".2f"),
                               ("prg solver alone", ms("prg_solver"), ".1f"),
                               ("tdq solver alone", ms("tdq_solver"), ".1f"),
                               ("tdq/prg with a free prg solver", lambda r: r["tdq"] / (r["prg"] - r["prg_solver"]),
                                ".2f"),
                               ("prg adjoint step", ms("prg_train"), ".1f"), ("tdq adjoint step", ms("tdq_train"), ".1f"),
                               ("tode backprop step", ms("tode_train"), ".1f"),
                               ("tdq/prg", ratio("tdq_train", "prg_train"), ".2f"),
                               ("tode/prg", ratio("tode_train", "prg_train"), ".2f")]))


def print_unet(rows, cuda):
    cols = ["net", "prg"] + (["prg_graph"] if cuda else []) + ["tdq"]
    print("\ntimes in ms; overhead = prg / net - 1 (integrator cost over the network's own evaluations)")
    print(harness.table(rows, [("preset", "preset"), ("batch", "batch")] + [(c, ms(c), ".1f") for c in cols] + [
        ("overhead", lambda r: f"{100 * (r['prg'] / r['net'] - 1):+.1f}%"), ("tdq/prg", ratio("tdq", "prg"), ".2f")]
        + ([("tdq/prg_graph", ratio("tdq", "prg_graph"), ".2f")] if cuda else [])))
    if cuda:
        print(f"CUDA graph crossover (graphed/eager >= 0.95): {graph_crossover(rows)}")


def main(argv=None):
    p = harness.parser("reverse_speed", __doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds")
    p.add_argument("--cases", nargs="+", default=["unet"], choices=["unet", "mlp"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.presets = args.presets or (["tiny", "cifar", "prg32"] if cuda else ["tiny"])
    args.batches = args.batches or ([1, 8, 128] if cuda else ([1, 8] if args.quick else [1, 8, 32]))
    args.steps = args.steps or (20 if cuda else (2 if args.quick else 5))
    args.size = args.size or (32 if cuda or not args.quick else 16)
    args.reps = args.reps or (5 if cuda else (1 if args.quick else 3))
    args.mlp_batch, args.mlp_dim, args.mlp_width, args.mlp_steps = 1024, 64, 64, (5 if args.quick else 100)
    print(f"{harness.machine(device)}\nbackend {prg_fast.ode.backends.resolve('auto', device)[0]}; time: "
          f"{harness.clock_name(device, torch.get_num_threads())}, median of {args.reps} interleaved rounds")
    config = {k: getattr(args, k) for k in ("steps", "size", "reps", "mlp_batch", "mlp_dim", "mlp_width", "mlp_steps")}
    log = harness.Results(args, f"reverse_speed_{device.type}", dict(config, device=device.type),
                          key=("case", "preset", "batch", "method"), device=device)
    if "mlp" in args.cases:
        for method in ("rk4_38", "heun"):
            key = dict(case="mlp", method=method)
            if "net" not in log.get(key):
                t = harness.interleaved(mlp_fns(method, args, device), args.reps, device=device)
                log.add(key, **{k: v["seconds"] for k, v in t.items()})
        print_mlp([log.get(dict(case="mlp", method=m)) for m in ("rk4_38", "heun")], args)
    if "unet" in args.cases:
        keys = [dict(case="unet", preset=p_, batch=b) for p_ in args.presets for b in args.batches]
        for key in keys:
            if "net" not in log.get(key):
                t = harness.interleaved(unet_fns(key["preset"], key["batch"], args, device), args.reps, device=device)
                log.add(key, numel=key["batch"] * 3 * args.size ** 2, **{k: v["seconds"] for k, v in t.items()})
            print(f"  {key['preset']} batch {key['batch']}: " + ", ".join(
                f"{k} {1e3 * v:.2f} ms" for k, v in log.get(key).items() if isinstance(v, float)), flush=True)
        print_unet(log.rows(keys), cuda)


if __name__ == "__main__":
    main()
