"""DDIM inversion with prg_fast: reconstruction error vs steps, and the cost of its exact gradient
against autograd through diffusers' own DDIM inversion loop, side by side in one run (RESULTS.md,
"DDIM inversion with the diffusion adapter", has the method).

    python benchmarks/ddim_inversion.py            # needs diffusers (not a dependency of prg_fast)
    python benchmarks/ddim_inversion.py --quick    # smaller sizes (CI)

Network: GaussianDenoiserPlus on DDIMScheduler's linear schedule. 1. x -> reverse -> generate -> x'
for euler / heun / rk4 with N*m steps on the N-level flow: |x' - x| / |x|. 2. The exact gradient of
an inversion, prg_fast.reverse(adjoint=True) against autograd through DDIMInverseScheduler's loop:
peaks (on the CPU a fresh process per cell), time (harness.interleaved) and the gradients'
difference. Results: OUT/ddim_inversion.jsonl (harness.Results, resumable) and the two tables.
"""
import argparse
import sys

import torch

import harness
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
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(5)).to(device)
    return unet, DDIMScheduler(**CONFIG), DDIMInverseScheduler(**CONFIG), x


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


def reconstruction(args, log, unet, scheduler, x):
    with torch.no_grad():
        flow = prg_fast.from_diffusers(unet, scheduler, steps=args.levels)
        for method, evals in (("euler", 1), ("heun", 2), ("rk4", 4)):
            for m in args.refine:
                key = dict(table="reconstruction", method=method, steps=args.levels * m)
                if "rel_err" not in log.get(key):
                    k = key["steps"]
                    back = prg_fast.generate(flow, prg_fast.reverse(flow, x, steps=k, method=method), steps=k,
                                             method=method)
                    log.add(key, evaluations=2 * k * evals, rel_err=((back - x).norm() / x.norm()).item())
                print("  " + str(log.get(key)), flush=True)


def gradient_table(args, log, unet, scheduler, inverse, x, device):
    def fns(steps):
        return {impl: (lambda impl=impl: gradient(impl, unet, scheduler, inverse, x, steps))
                for impl in ("diffusers", "prg_fast")}

    for steps in args.levels_list:
        key = dict(table="gradient", steps=steps)
        if "time_ratio" in log.get(key):
            continue
        if device.type == "cuda":
            peak = harness.peaks(fns(steps), device)
        else:  # a fresh process per cell
            peak = {impl: harness.peaks_in_fresh_process(["--worker", f"{impl}:{steps}"])[impl]
                    for impl in ("diffusers", "prg_fast")}
        a, b = (torch.cat([g.flatten() for g in gradient(i, unet, scheduler, inverse, x, steps)])
                for i in ("prg_fast", "diffusers"))
        t = harness.interleaved(fns(steps), args.repeats, anchor="diffusers", device=device)
        log.add(key, peak_diffusers=peak["diffusers"], peak_prg_fast=peak["prg_fast"],
                time_ratio=t["prg_fast"]["ratio"], grad_rel_diff=((a - b).norm() / b.norm()).item())
        print("  " + str(log.get(key)), flush=True)


def parse(argv):
    ap = harness.parser("ddim_inversion", __doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grad-steps", type=int, nargs="+", default=None, help="N of the gradient table (default 10 25 50)")
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (default 5)")
    ap.add_argument("--skip-reconstruction", action="store_true", help="only the gradient table")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "impl:steps": one memory cell
    args = ap.parse_args(argv)
    args.size, args.width, args.batch = (16, 16, 1) if args.quick else (32, 32, 2)
    args.levels, args.refine = (5, (1, 2)) if args.quick else (10, (1, 2, 4))
    args.levels_list = tuple(args.grad_steps) if args.grad_steps else (5, 10) if args.quick else (10, 25, 50)
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
    if args.peak_worker:
        impl, steps = args.worker.split(":")
        harness.peak_worker({impl: lambda: gradient(impl, unet, scheduler, inverse, x, int(steps))})
        return 0
    print(f"DDIM inversion, UNet2DModel {args.size}x{args.size} width {args.width}, batch {args.batch}, float32; "
          f"{harness.machine(device)}; time: {harness.clock_name(device, torch.get_num_threads())}")
    config = dict(size=args.size, width=args.width, batch=args.batch, repeats=args.repeats, device=device.type)
    log = harness.Results(args, "ddim_inversion", config, key=("table", "method", "steps"), device=device)
    if not args.skip_reconstruction:
        reconstruction(args, log, unet, scheduler, x)
        print(f"\nReconstruction x -> reverse -> generate on the {args.levels}-level flow\n")
        print(harness.table([r for r in log.rows() if r["table"] == "reconstruction"], [
            ("method", "method"), ("solver steps", "steps"), ("network evaluations (both ways)", "evaluations"),
            ("rel. L2 error", "rel_err", ".2e")]))
    gradient_table(args, log, unet, scheduler, inverse, x, device)
    print("\nExact gradient of an inversion (euler, N steps): prg_fast adjoint vs autograd through diffusers' loop\n")
    print(harness.table([log.get(dict(table="gradient", steps=k)) for k in args.levels_list], [
        ("N", "steps"), ("peak, diffusers loop (MiB)", lambda r: r["peak_diffusers"] / 2 ** 20, ".1f"),
        ("peak, prg_fast adjoint (MiB)", lambda r: r["peak_prg_fast"] / 2 ** 20, ".1f"),
        ("memory ratio", lambda r: r["peak_prg_fast"] / r["peak_diffusers"], ".2f"),
        ("time ratio (prg/diffusers)", "time_ratio", ".2f"), ("grad rel. diff", "grad_rel_diff", ".1e")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
