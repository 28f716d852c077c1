"""One PRG finetuning step (cross-entropy + beta * flow-matching, K Euler steps; the finetune
command's loss), side by side: prg_fast.PRGClassifier with the default strategy (also under bf16
autocast), memory_budget=0, memory_budget=inf and adjoint=False, against the released PRG
pipeline's way (torchdiffeq's odeint_adjoint on linspace(0, 1, K + 1), float32: the continuous
adjoint). Time: harness.interleaved, over the released row of the same round; memory: harness
peaks; gradient error against float64 plain backprop, every row in float64 on a small batch.

--parts times the step's parts, F0 (an evaluation without a graph), F (with one), F+B (with its
VJP) and C (the rest: head, flow-matching term, AdamW), and the bound they put on any exact method
that recomputes nothing: (K*F0 + K*(F + B) + C) / (K*(F + B) + C) over the released pipeline. The
rows and the reasoning: RESULTS.md, "A PRG finetuning step".

    python benchmarks/finetune_step.py --quick               # seconds on a 2-core CPU
    python benchmarks/finetune_step.py                       # tiny preset, 32x32, CPU
    python benchmarks/finetune_step.py --parts               # that step's parts and the bound
    python benchmarks/finetune_step.py --device cuda         # cifar preset on a GPU
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

import harness
import prg_fast
from adjoint_memory import TorchdiffeqFunc, trained_like_unet
from prg_fast.models import ClassifierHead

IMPLS = ("default", "default_bf16", "budget_0", "budget_inf", "backprop", "released")
PRG_KWARGS = {"default": {}, "default_bf16": {}, "budget_0": dict(memory_budget=0),
              "budget_inf": dict(memory_budget=float("inf")), "backprop": dict(adjoint=False)}


class Released(torch.nn.Module):
    """The released pipeline's classifier: odeint_adjoint over the whole grid, head on the end."""

    def __init__(self, flow, head, steps):
        super().__init__()
        self.flow, self.head, self.steps = flow, head, steps

    def forward(self, x):
        import torchdiffeq

        grid = torch.linspace(0.0, 1.0, self.steps + 1, device=x.device, dtype=x.dtype)
        z = torchdiffeq.odeint_adjoint(TorchdiffeqFunc(self.flow), x, grid, method="euler",
                                       adjoint_params=tuple(self.flow.parameters()))[-1]
        return self.head(z)


class Setup:
    """The flow, the head, one batch, and a classifier per row sharing the flow and head."""

    def __init__(self, args, device, dtype=torch.float32, batch=None, impls=None):
        self.flow = trained_like_unet(args.preset, args.size).to(device, dtype)
        self.head = ClassifierHead((3, args.size, args.size), 10).to(device, dtype)
        batch = batch or args.batch
        self.x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.args, self.device = args, device
        self.params = list(self.flow.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-6, weight_decay=0.05)
        self.models = {impl: self.classifier(impl) for impl in (impls or args.impls)}

    def classifier(self, impl):
        if impl == "released":
            return Released(self.flow, self.head, self.args.steps)
        return prg_fast.PRGClassifier(self.flow, self.head, steps=self.args.steps, method="euler", **PRG_KWARGS[impl])

    def loss(self, impl):
        """The finetune command's loss; the flow-matching draw is seeded, the same for every row."""
        gen = torch.Generator(self.device).manual_seed(1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=impl == "default_bf16"):
            loss = F.cross_entropy(self.models[impl](self.x).float(), self.y)
            if self.args.beta > 0:
                loss = loss + self.args.beta * prg_fast.flow_matching_loss(self.flow, self.x, "otcfm", generator=gen)
        return loss

    def step(self, impl):
        self.opt.zero_grad(set_to_none=True)
        self.loss(impl).backward()
        self.opt.step()

    def grads(self, impl):
        return torch.autograd.grad(self.loss(impl), self.params)

    def fns(self):
        return {impl: (lambda impl=impl: self.step(impl)) for impl in self.args.impls}


def grad_errors(args, device):
    """Relative gradient error of each row against float64 plain backprop, every row in float64."""
    impls = [i for i in args.impls if i != "default_bf16"]
    setup = Setup(args, device, torch.float64, batch=2, impls=set(impls) | {"backprop"})
    truth = setup.grads("backprop")
    errs = {impl: harness.rel_err(setup.grads(impl), truth) for impl in impls}
    return [{"grad_rel_err": errs.get(i)} for i in args.impls]


def parts(args, device) -> dict:
    """{part: a callable running it once}, on the step's network and batch."""
    setup = Setup(args, device, impls=[])
    flow, x, flow_params = setup.flow, setup.x, list(setup.flow.parameters())
    t, g = torch.full((args.batch,), 0.5, device=device), torch.randn_like(x)

    def f0():
        with torch.no_grad():
            flow(t, x)

    def fb():
        xl = x.detach().requires_grad_(True)  # the state's cotangent is part of every step's VJP
        torch.autograd.grad(flow(t, xl), [xl] + flow_params, g)

    def common():
        setup.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(setup.head(x), setup.y)
        if args.beta > 0:
            loss = loss + args.beta * prg_fast.flow_matching_loss(flow, x, "otcfm")
        loss.backward()
        setup.opt.step()

    return {"F0": f0, "F": lambda: flow(t, x), "F+B": fb, "C": common}


def parse(argv=None):
    p = harness.parser("finetune_step", __doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a 2-core CPU (CI smoke)")
    p.add_argument("--parts", action="store_true", help="time the step's parts and print the bound instead")
    p.add_argument("--preset", default=None, help="UNet preset (default: cifar on CUDA, tiny on the CPU)")
    p.add_argument("--size", type=int, default=None, help="image size (default 32; 8 with --quick)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="Euler steps K (default: 31 on CUDA, as released)")
    p.add_argument("--beta", type=float, default=0.1, help="weight of the flow-matching term")
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS, help="rows (default: all; bf16 on CUDA only)")
    p.add_argument("--reps", type=int, default=None, help="interleaved timing rounds")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("cifar" if cuda else "tiny")
    args.size = args.size or (8 if args.quick else 32)
    args.batch = args.batch or (128 if cuda else (2 if args.quick else 8))
    args.steps = args.steps or (31 if cuda else (2 if args.quick else 10))
    args.reps = args.reps or (9 if args.parts else 5 if cuda else (2 if args.quick else 5))
    args.impls = args.impls or [i for i in IMPLS if cuda or i != "default_bf16"]
    if not harness.importable("torchdiffeq", "the released row is"):
        args.impls = [i for i in args.impls if i != "released"]
    return args


def main_parts(args, device):
    config = dict(preset=args.preset, size=args.size, batch=args.batch, beta=args.beta, reps=args.reps,
                  device=device.type)
    log = harness.Results(args, "finetune_parts", config, key=("part",), device=device)
    keys = [{"part": n} for n in ("F0", "F", "F+B", "C")]
    log.measure(keys, "seconds", lambda: [{"seconds": v["seconds"]} for v in
                                          harness.interleaved(parts(args, device), args.reps, device=device).values()])
    m = {r["part"]: r["seconds"] for r in log.rows(keys)}
    released, backprop = args.steps * (m["F0"] + m["F+B"]) + m["C"], args.steps * m["F+B"] + m["C"]
    print(harness.table(log.rows(keys) + [{"part": "B = (F+B) - F", "seconds": m["F+B"] - m["F"]}],
                        [("part", "part"), ("ms", lambda r: 1e3 * r["seconds"], ".1f")]))
    print(f"\nB / F = {(m['F+B'] - m['F']) / m['F']:.2f}; F / F0 = {m['F'] / m['F0']:.2f}")
    print(f"predicted step: released {released * 1e3:.0f} ms, backprop (= prg_fast default when every graph fits) "
          f"{backprop * 1e3:.0f} ms: at most {released / backprop:.2f}x faster than the released pipeline")


def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    if args.peak_worker:
        harness.peak_worker(Setup(args, device).fns())
        return
    a = args
    print(f"{harness.machine(device)}\nPRG finetuning step: UNet {a.preset} {a.size}x{a.size}, batch {a.batch}, "
          f"K={a.steps} Euler, beta={a.beta}; time: {harness.clock_name(device, torch.get_num_threads())}, median "
          f"of {a.reps} interleaved rounds", flush=True)
    if args.parts:
        return main_parts(args, device)
    from prg_fast.ode.description import OPTIONS  # reverse's options: what the default row runs

    config = dict(preset=a.preset, size=a.size, batch=a.batch, steps=a.steps, beta=a.beta, reps=a.reps,
                  grad_batch=2, device=device.type, default_memory_budget=repr(OPTIONS["memory_budget"]))
    log = harness.Results(args, "finetune_step", config, key=("impl",), device=device)
    keys = [{"impl": i} for i in args.impls]
    anchor = "released" if "released" in args.impls else args.impls[0]

    def times():
        t = harness.interleaved(Setup(args, device).fns(), args.reps, anchor=anchor, device=device)
        return [{"seconds": t[i]["seconds"], "images_per_s": args.batch / t[i]["seconds"],
                 "time_vs_released": t[i]["ratio"]} for i in args.impls]

    def memory():
        got = harness.peaks_here_or_fresh(lambda: Setup(args, device).fns(), device)
        return [{"peak_bytes": got[i]} for i in args.impls]

    log.measure(keys, "seconds", times)
    log.measure(keys, "peak_bytes", memory)
    log.measure(keys, "grad_rel_err", lambda: grad_errors(args, device))
    print(harness.table(log.rows(keys), [
        ("row", "impl"), ("ms / step", lambda r: 1e3 * r["seconds"], ".1f"), ("images/s", "images_per_s", ".1f"),
        ("time / released", "time_vs_released", ".2f"), ("peak MiB", lambda r: r["peak_bytes"] / 2 ** 20, ".1f"),
        ("grad rel err (float64)", "grad_rel_err", ".1e")]))


if __name__ == "__main__":
    main()
