"""DDIM inversion with prg_fast: reconstruction error vs steps, and the cost of its exact gradient
against autograd through diffusers' own DDIM inversion loop, side by side in one run.

    python benchmarks/ddim_inversion.py            # needs diffusers (not a dependency of prg_fast)
    python benchmarks/ddim_inversion.py --quick    # smaller sizes (CI)

Network: the exact noise estimate of Gaussian data plus 0.1 x a diffusers UNet2DModel (random
weights on top of its initialisation), on DDIMScheduler's linear schedule, "leading" spacing,
steps_offset=1 (see GaussianDenoiserPlus: no trained weights can be downloaded here).

1. Reconstruction: x -> reverse (inversion) -> generate (sampling) -> x', relative L2 error
   |x' - x| / |x| for euler / heun / rk4 with N*m solver steps on the N-level flow (euler with
   m = 1 is DDIM inversion then DDIM sampling, exactly).
2. Exact gradient of an inversion, d<w, z_T>/d(x, every parameter): prg_fast.reverse(adjoint=True)
   (euler, N steps: the same computation as DDIM inversion) against autograd through diffusers'
   DDIMInverseScheduler loop. Memory: peak above the baseline during forward + backward (CPU: peak
   RSS of one fresh worker process, its high-water mark reset before each cell, glibc returning freed
   memory at once; CUDA: max_memory_allocated). Time: forward + backward relative to diffusers' loop,
   median over repeats that run both back to back (thread CPU time on the CPU). The gradients'
   relative L2 difference says both compute the same thing (float32 rounding).
"""
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


CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, steps_offset=1)


class GaussianDenoiserPlus(torch.nn.Module):
    """A stand-in for a trained epsilon network, called as diffusers models are (net(x, t).sample):
    the exact noise estimate for data ~ N(0, I) at timestep t, E[eps | x_t] = sqrt(1 - a) x_t (a + 1 - a
    = 1), plus 0.1 x a random UNet's output. A purely random UNet's noise estimate is inconsistent from
    level to level (no data distribution behind it), which makes reconstruction errors meaningless."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())

    def forward(self, x, timestep, return_dict=False):
        a = self.alphas_cumprod.to(x.device)[torch.as_tensor(timestep, device=x.device).long()].reshape(-1, 1, 1, 1)
        out = (1 - a).sqrt() * x + 0.1 * self.unet(x, timestep).sample
        return (out,) if not return_dict else type("Output", (), {"sample": out})()


def build(args, device):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=args.size, in_channels=3, out_channels=3, block_out_channels=(args.width, 2 * args.width),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    unet = GaussianDenoiserPlus(unet.to(device).eval(), DDIMScheduler(**CONFIG).alphas_cumprod)
    config = CONFIG
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(5)).to(device)
    return unet, DDIMScheduler(**config), DDIMInverseScheduler(**config), x


def invert_diffusers(unet, inverse, x, steps):
    inverse.set_timesteps(steps)
    z = x
    for t in inverse.timesteps:
        z = inverse.step(unet(z, t)[0], t, z).prev_sample
    return z


def invert_prg(unet, scheduler, x, steps):
    flow = prg_fast.from_diffusers(unet, scheduler, steps=steps)
    return flow.from_state(prg_fast.reverse(flow, x, steps=steps, method="euler", adjoint=True), 1.0)


def gradient(impl, unet, scheduler, inverse, x, steps):
    xx = x.detach().clone().requires_grad_(True)
    z = invert_prg(unet, scheduler, xx, steps) if impl == "prg_fast" else invert_diffusers(unet, inverse, xx, steps)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.device)
    return torch.autograd.grad((z * w).sum(), [xx] + list(unet.parameters()))


def reconstruction(args, unet, scheduler, x):
    rows = []
    with torch.no_grad():
        flow = prg_fast.from_diffusers(unet, scheduler, steps=args.levels)
        for method, evals in (("euler", 1), ("heun", 2), ("rk4", 4)):
            for m in args.refine:
                k = args.levels * m
                z = prg_fast.reverse(flow, x, steps=k, method=method)
                back = prg_fast.generate(flow, z, steps=k, method=method)
                rows.append((method, k, 2 * k * evals, ((back - x).norm() / x.norm()).item()))
                print(f"| {method} | {k} | {2 * k * evals} | {rows[-1][3]:.2e} |", flush=True)
    return rows


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.thread_time()


def time_ratio(args, unet, scheduler, inverse, x, steps, device):
    ratios = []
    for r in range(args.repeats):
        seconds = {}
        for impl in (("diffusers", "prg_fast") if r % 2 == 0 else ("prg_fast", "diffusers")):
            start = _clock(device)
            gradient(impl, unet, scheduler, inverse, x, steps)
            seconds[impl] = _clock(device) - start
        ratios.append(seconds["prg_fast"] / seconds["diffusers"])
    return statistics.median(ratios)


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peaks(args, unet, scheduler, inverse, x, device):
    """{(impl, steps): peak bytes}, measured here on CUDA, on the CPU in a fresh worker process per
    cell (memory one cell freed and the allocator kept would hide the next cell's growth)."""
    if device.type == "cpu" and args.worker is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
        cells = {}
        for steps in args.levels_list:
            for impl in ("diffusers", "prg_fast"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{impl}:{steps}"] + sys.argv[1:]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    raise RuntimeError(f"memory worker failed:\n{res.stderr[-3000:]}")
                cells.update({(i, k): v for i, k, v in json.loads(res.stdout.strip().splitlines()[-1])})
        return cells
    cells = []
    todo = [(i, k) for k in args.levels_list for i in ("diffusers", "prg_fast")]
    if args.worker is not None:
        impl, steps = args.worker.split(":")
        todo = [(impl, int(steps))]
    for impl, steps in todo:
        gradient(impl, unet, scheduler, inverse, x, steps)  # warm-up: one-time allocations are not the cell's
    for impl, steps in todo:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            gradient(impl, unet, scheduler, inverse, x, steps)
            cells.append((impl, steps, torch.cuda.max_memory_allocated() - base))
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = proc_status_kib("VmHWM")
            gradient(impl, unet, scheduler, inverse, x, steps)
            cells.append((impl, steps, (proc_status_kib("VmHWM") - base) * 1024))
    if args.worker is not None:
        print(json.dumps(cells))
    return {(i, k): v for i, k, v in cells}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grad-steps", type=int, nargs="+", default=None, help="N of the gradient table (default 10 25 50)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5)")
    ap.add_argument("--skip-reconstruction", action="store_true", help="only the gradient table")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "impl:steps": one memory cell
    args = ap.parse_args(argv)
    args.size, args.width, args.batch = (16, 16, 1) if args.quick else (32, 32, 2)
    args.levels, args.refine = (5, (1, 2)) if args.quick else (10, (1, 2, 4))
    args.levels_list = (5, 10) if args.quick else (10, 25, 50)
    args.levels_list = tuple(args.grad_steps) if args.grad_steps else args.levels_list
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        unet, scheduler, inverse, x = build(args, device)
    except ImportError as e:
        print(f"diffusers is not installed ({e}): nothing to compare against")
        return 0
    if args.worker is not None:
        peaks(args, unet, scheduler, inverse, x, device)
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, one thread"
    print(f"DDIM inversion, UNet2DModel {args.size}x{args.size} width {args.width}, batch {args.batch}, float32; "
          f"torch {torch.__version__}, {name}")
    if not args.skip_reconstruction:
        print(f"\nReconstruction x -> reverse -> generate on the {args.levels}-level flow\n")
        print("| method | solver steps | network evaluations (both ways) | rel. L2 error |\n|---|---|---|---|")
        reconstruction(args, unet, scheduler, x)
    print("\nExact gradient of an inversion (euler, N steps): prg_fast adjoint vs autograd through diffusers' loop\n")
    print("| N | peak, diffusers loop (MiB) | peak, prg_fast adjoint (MiB) | memory ratio | time ratio (prg/diffusers) | grad rel. diff |")
    print("|---|---|---|---|---|---|")
    peak = peaks(args, unet, scheduler, inverse, x, device)
    for steps in args.levels_list:
        a = gradient("prg_fast", unet, scheduler, inverse, x, steps)
        b = gradient("diffusers", unet, scheduler, inverse, x, steps)
        diff = (torch.cat([u.flatten() for u in a]) - torch.cat([v.flatten() for v in b])).norm() / torch.cat(
            [v.flatten() for v in b]).norm()
        ratio = time_ratio(args, unet, scheduler, inverse, x, steps, device)
        mem_d, mem_p = peak[("diffusers", steps)] / 2 ** 20, peak[("prg_fast", steps)] / 2 ** 20
        print(f"| {steps} | {mem_d:.1f} | {mem_p:.1f} | {mem_p / mem_d:.2f} | {ratio:.2f} | {diff.item():.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
