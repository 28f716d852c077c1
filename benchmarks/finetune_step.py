"""One PRG finetuning step (cross-entropy + beta * flow-matching, K Euler steps), side by side:

    default       prg_fast.PRGClassifier, the adjoint's default strategy (memory_budget left unset)
    default_bf16  the same under torch.autocast(bfloat16) (state and accumulators stay float32)
    budget_0      memory_budget=0: every evaluation recomputed in the backward
    budget_inf    memory_budget=float("inf"): every evaluation's graph kept
    backprop      adjoint=False: plain autograd through the solver
    released      the released PRG pipeline's way (opendilab/PRG on GenerativeRL): torchdiffeq's
                  odeint_adjoint, fixed-grid Euler on linspace(0, 1, K + 1), float32 -- the
                  continuous adjoint, which is not the gradient of the discrete solve

A step is forward + backward + AdamW step on one batch, the loss exactly the finetune command's
(prg_fast.training.finetune: cross_entropy(head(z)) + beta * flow_matching_loss(flow, x, path)).

Time: every repeat runs all rows back to back (order rotated per repeat); each row's time over the
released row's time of the same repeat, median over repeats (so load on a shared machine hits all
rows alike). CPU: thread CPU time (one intra-op thread); CUDA: wall time around synchronisations.
Memory: peak above the baseline during a step. CUDA: torch.cuda.max_memory_allocated. CPU: the
peak RSS of one fresh worker process, its high-water mark reset before each row (as in
adjoint_memory.py). Gradient error: relative L2 error of all gradients (flow and head) against
float64 plain backprop through the same solver, every row computed in float64 on a small batch
(so the figure is the method's error, not rounding's; default_bf16 is left out there).

    python benchmarks/finetune_step.py --quick               # seconds on a 2-core CPU
    python benchmarks/finetune_step.py                       # tiny preset, 32x32, CPU
    python benchmarks/finetune_step.py --device cuda         # cifar preset on a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import prg_fast
from prg_fast.models import ClassifierHead, UNet

IMPLS = ("default", "default_bf16", "budget_0", "budget_inf", "backprop", "released")
PRG_KWARGS = {"default": {}, "default_bf16": {}, "budget_0": dict(memory_budget=0),
              "budget_inf": dict(memory_budget=float("inf")), "backprop": dict(adjoint=False)}
HERE = os.path.dirname(os.path.abspath(__file__))


class TorchdiffeqVelocity(torch.nn.Module):
    """torchdiffeq calls func(t, y) with a 0-dim t; the flow takes t of shape (B,)."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, t, y):
        return self.flow(t.expand(y.shape[0]), y)


class Released(torch.nn.Module):
    """The released pipeline's classifier: odeint_adjoint over the whole grid, head on the end."""

    def __init__(self, flow, head, steps):
        super().__init__()
        self.flow, self.head, self.steps = flow, head, steps

    def forward(self, x):
        import torchdiffeq

        grid = torch.linspace(0.0, 1.0, self.steps + 1, device=x.device, dtype=x.dtype)
        z = torchdiffeq.odeint_adjoint(TorchdiffeqVelocity(self.flow), x, grid, method="euler",
                                       adjoint_params=tuple(self.flow.parameters()))[-1]
        return self.head(z)


def trained_like_flow(preset: str, size: int) -> UNet:
    """The benchmark's flow (seed 0): a fresh UNet zero-initialises its output layer, so its zero
    parameters are drawn like a trained network's instead."""
    torch.manual_seed(0)
    flow = UNet.preset(preset, in_channels=3, image_size=size, dropout=0.0)
    with torch.no_grad():
        for p in flow.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return flow


class Setup:
    """The flow, the head, one batch, and a classifier per row sharing the flow and head."""

    def __init__(self, args, device, dtype=torch.float32, batch=None, impls=None):
        self.flow = trained_like_flow(args.preset, args.size).to(device, dtype)
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
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=impl == "default_bf16")
        with amp:
            logits = self.models[impl](self.x)
            loss = F.cross_entropy(logits.float(), self.y)
            if self.args.beta > 0:
                loss = loss + self.args.beta * prg_fast.flow_matching_loss(self.flow, self.x, "otcfm", generator=gen)
        return loss

    def step(self, impl):
        self.opt.zero_grad(set_to_none=True)
        self.loss(impl).backward()
        self.opt.step()

    def grads(self, impl):
        return torch.autograd.grad(self.loss(impl), self.params)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device):
    # thread CPU time on the CPU (robust to other processes), wall time around syncs on a GPU
    return time.perf_counter if device.type == "cuda" or torch.get_num_threads() > 1 else time.thread_time


def time_rows(setup, reps):
    """{impl: median seconds}, {impl: median of (impl / released) over interleaved repeats}."""
    impls, device = list(setup.args.impls), setup.device
    clock = _clock(device)
    for impl in impls:
        setup.step(impl)  # warm-up: library init, autotuning, Triton JIT
    secs = {impl: [] for impl in impls}
    for rep in range(reps):
        for impl in impls[rep % len(impls):] + impls[: rep % len(impls)]:
            _sync(device)
            t0 = clock()
            setup.step(impl)
            _sync(device)
            secs[impl].append(clock() - t0)
    anchor = "released" if "released" in impls else impls[0]
    ratios = {i: statistics.median(a / b for a, b in zip(secs[i], secs[anchor])) for i in impls}
    return {i: statistics.median(v) for i, v in secs.items()}, ratios


def cuda_peaks(setup):
    peaks = {}
    for impl in setup.args.impls:
        setup.step(impl)
        gc.collect()
        _sync(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        base = torch.cuda.memory_allocated(setup.device)
        setup.step(impl)
        _sync(setup.device)
        peaks[impl] = torch.cuda.max_memory_allocated(setup.device) - base
    return peaks


def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peaks_worker(args):
    """In a fresh process: per row, the peak RSS of one step above the RSS before it."""
    setup = Setup(args, torch.device("cpu"))
    for impl in args.impls:
        setup.step(impl)  # warm-up, and the optimizer's state exists before any cell
    peaks = {}
    for impl in args.impls:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the live memory now
        base = _kib("VmHWM")
        setup.step(impl)
        peaks[impl] = (_kib("VmHWM") - base) * 1024
    print(json.dumps(peaks))


def cpu_peaks(args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + args.passthrough
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def grad_errors(args, device):
    """Relative gradient error of each row against float64 plain backprop, every row in float64."""
    impls = [i for i in args.impls if i != "default_bf16"]
    setup = Setup(args, device, torch.float64, batch=args.grad_batch, impls=set(impls) | {"backprop"})
    truth = setup.grads("backprop")
    errs = {}
    for impl in impls:
        grads = setup.grads(impl)
        num = sum(((a - b) ** 2).sum() for a, b in zip(grads, truth)).sqrt()
        errs[impl] = (num / sum((b ** 2).sum() for b in truth).sqrt()).item()
    return errs


def default_memory_budget():
    """What the default row runs: the solve options' default memory_budget ("auto"; before issue 25
    None, recompute all), from prg_fast.ode.description.OPTIONS, which names reverse's **options."""
    from prg_fast.ode.description import OPTIONS

    return OPTIONS["memory_budget"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a 2-core CPU (CI smoke)")
    p.add_argument("--preset", default=None, help="UNet preset (default: cifar on CUDA, tiny on the CPU)")
    p.add_argument("--size", type=int, default=None, help="image size (default 32; 8 with --quick)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="Euler steps K (default: 31 on CUDA, as released for CIFAR-10)")
    p.add_argument("--beta", type=float, default=0.1, help="weight of the flow-matching term")
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                   help="rows (default: all; default_bf16 on CUDA only)")
    p.add_argument("--reps", type=int, default=None, help="interleaved timing repeats")
    p.add_argument("--grad-batch", type=int, default=2, help="batch of the float64 gradient check (0: skip it)")
    p.add_argument("--json", default=None, help="write the results here (JSON)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("cifar" if cuda else "tiny")
    args.size = args.size or (8 if args.quick else 32)
    args.batch = args.batch or (128 if cuda else (2 if args.quick else 8))
    args.steps = args.steps or (31 if cuda else (2 if args.quick else 10))
    args.reps = args.reps or (5 if cuda else (2 if args.quick else 5))
    args.impls = args.impls or [i for i in IMPLS if cuda or i != "default_bf16"]
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        print("torchdiffeq not importable: the released row is left out")
        args.impls = [i for i in args.impls if i != "released"]
    args.passthrough = ["--device", "cpu", "--preset", args.preset, "--size", str(args.size), "--batch",
                        str(args.batch), "--steps", str(args.steps), "--beta", str(args.beta), "--impls", *args.impls]
    return args


def measure(args, save=lambda result: None):
    """Times, then peaks, then gradient errors; `save` gets the result after each phase (a caller
    with a deadline keeps what was measured)."""
    from adjoint_memory import device_name

    device = torch.device(args.device)
    result = dict(device=device_name(device), torch=torch.__version__,
                  default_memory_budget=repr(default_memory_budget()),
                  args={k: v for k, v in vars(args).items() if k not in ("passthrough", "worker", "json")})
    setup = Setup(args, device)
    secs, ratios = time_rows(setup, args.reps)
    result["rows"] = [dict(impl=i, seconds=secs[i], images_per_s=args.batch / secs[i], time_vs_released=ratios[i],
                           peak_mib=None, grad_rel_err=None) for i in args.impls]
    save(result)
    peaks = cuda_peaks(setup) if device.type == "cuda" else cpu_peaks(args)
    del setup
    for r in result["rows"]:
        r["peak_mib"] = peaks[r["impl"]] / 2 ** 20
    save(result)
    errs = grad_errors(args, device) if args.grad_batch > 0 else {}
    for r in result["rows"]:
        r["grad_rel_err"] = errs.get(r["impl"])
    return result


def save_json(path):
    def save(result):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"saved: {path}", flush=True)

    return save


def table(result) -> str:
    lines = ["| row | ms / step | images/s | time / released | peak MiB | grad rel err (float64) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        err = f"{r['grad_rel_err']:.1e}" if r["grad_rel_err"] is not None else \
            "n/a (bf16)" if r["impl"] == "default_bf16" else "not measured"
        lines.append(f"| {r['impl']} | {r['seconds'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['time_vs_released']:.2f} | "
                     f"{r['peak_mib']:.1f} | {err} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        cpu_peaks_worker(args)
        return
    a = args
    print(f"PRG finetuning step: UNet {a.preset} {a.size}x{a.size}, batch {a.batch}, K={a.steps} Euler, beta={a.beta}, "
          f"{a.device}; default memory_budget={default_memory_budget()!r}; median of {a.reps} interleaved repeats",
          flush=True)
    save = save_json(args.json) if args.json else (lambda result: None)
    result = measure(args, save)
    save(result)
    print(f"device: {result['device']}; torch {result['torch']}")
    print(table(result))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
