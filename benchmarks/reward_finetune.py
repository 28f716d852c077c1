"""Reward finetuning through the sampler, side by side: how much of the chain each method
differentiates, at what memory and time, how close its gradient is to the exact one, and what the
finetuned flow does after N steps. The flow, the reward, the sampler and every column: RESULTS.md,
"Reward finetuning through the sampler"; the methods (prg_fast.reward) in METHODS below:

    full_0 / full_auto / backprop   FullChain(memory_budget=0 / "auto" / adjoint=False): exact
    tdq_adjoint  torchdiffeq.odeint_adjoint, euler on the same grid: the continuous adjoint
    draft1/5     LastSteps(1 / 5): DRaFT-1 / DRaFT-5, backprop through the last 1 / 5 steps
    alignprop    RandomTruncation(): the last k ~ U{1..K} steps, checkpointed
    refl         OneStep(0.25): one Euler step to t = 0 from a random grid time in the last quarter

Peaks are measured in a fresh worker process per method (harness.peaks_in_fresh_process); the
training steps of all methods interleaved step by step (order rotated).

    OMP_NUM_THREADS=1 python benchmarks/reward_finetune.py           # 11 min of CPU (95 min wall at load 12-21)
    OMP_NUM_THREADS=1 python benchmarks/reward_finetune.py --quick   # K = 4, 8; 4 steps (a few minutes)

plus, on the first run, the flow's pretraining (2,000 steps: 6 min of CPU, 22 min wall at load ~10).
Writes --out/reward_finetune_TAG.json (every number) and .png (eval reward against step; samples
before / after) and prints the markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import harness  # benchmarks/harness.py: the machine line, peak memory
from adjoint_memory import TorchdiffeqFunc

from prg_fast.data import load_data
from prg_fast.models import ImageClassifier, add_lora, lora_disabled
from prg_fast.ode import generate
from prg_fast.reward import (ClassLogProb, FullChain, LastSteps, OneStep, RandomTruncation, RewardSample,
                             pairwise_distance, reward_loss, reward_values, step_generator, velocity_kl)
from prg_fast.training.checkpoints import build_model, load_checkpoint
from prg_fast.training.image_classifier import train_image_classifier

EXACT = ("full_0", "full_auto", "backprop")


class TorchdiffeqAdjoint:
    """torchdiffeq.odeint_adjoint on the sampler's grid (its continuous adjoint, integrated backwards
    with the same method on the same grid), as a gradient mode."""

    def sample(self, model, z, steps, method="euler", generator=None):
        import torchdiffeq

        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).to(z)
        params = [p for p in model.parameters() if p.requires_grad]
        func = TorchdiffeqFunc(model)
        x = torchdiffeq.odeint_adjoint(func, z, grid, method=method, adjoint_params=params)[-1]
        return RewardSample(x, steps, 1.0)


METHODS = {
    "full_0": lambda a: FullChain(memory_budget=0),
    "full_auto": lambda a: FullChain(memory_budget="auto"),
    "backprop": lambda a: FullChain(adjoint=False),
    "tdq_adjoint": lambda a: TorchdiffeqAdjoint(),
    "draft1": lambda a: LastSteps(1),
    "draft5": lambda a: LastSteps(5),
    "alignprop": lambda a: RandomTruncation(),
    "refl": lambda a: OneStep(0.25),
}


# -------------------------------------------------------------------------------------------------
# the pretrained flow, the reward, the networks


def ensure_flow(args) -> str:
    """The pretraining run directory: --checkpoint, or one made under --out by `prg-fast pretrain`."""
    if args.checkpoint:
        return args.checkpoint
    flow = os.path.join(args.out, f"flow_digits_{args.pretrain_steps}")
    done = os.path.join(flow, "samples.png")  # written when the run finished
    if not os.path.isfile(done):  # (an interrupted run is resumed by the same command)
        print(f"pretraining the flow: prg-fast pretrain --data digits --steps {args.pretrain_steps} --out {flow}",
              flush=True)
        subprocess.run([sys.executable, "-m", "prg_fast", "pretrain", "--data", "digits", "--path", "otcfm", "--model",
                        "tiny", "--steps", str(args.pretrain_steps), "--out", flow, "--no-progress"], check=True)
    return flow


def ensure_classifier(args):
    """(classifier, its test top-1), trained once on digits' training images and kept under --out."""
    path = os.path.join(args.out, "reward_classifier.pt")
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        net = ImageClassifier(**saved["config"])
        net.load_state_dict(saved["state"])
        return net.eval(), saved["top1"]
    net, top1 = train_image_classifier(load_data("digits", "train"), load_data("digits", "test", augment=None),
                                       steps=500, seed=0)
    os.makedirs(args.out, exist_ok=True)
    torch.save({"config": net.config, "state": net.state_dict(), "top1": top1}, path)
    return net, top1


def flow_net(args, lora: bool):
    """(the pretrained velocity network in eval mode, the pretrained reference velocity); with
    `lora` the network carries zero-initialised adapters and the reference is it with them off."""
    net = build_model(load_checkpoint(args.flow)).eval()
    if not lora:
        return net, net
    torch.manual_seed(args.seed)  # every method starts from the same adapter
    add_lora(net, args.lora_rank)

    def reference(t, x):
        with lora_disabled(net):
            return net(t, x)

    return net, reference


def train_step(net, reference, reward, opt, mode, z, steps, gen, kl_weight):
    out = reward_loss(net, reward, z, steps=steps, gradient=mode, reference=reference, kl_weight=kl_weight,
                      generator=gen)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return out


def noise(args, step, n=None):
    gen = step_generator(args.seed, step)
    return torch.randn((n or args.batch, 1, 8, 8), generator=gen), gen


# -------------------------------------------------------------------------------------------------
# memory: one training step in a fresh process per method


def memory_worker(args):
    """In the fresh process of harness.peaks_in_fresh_process: one method's training step, the
    median of 3 steps after a warm-up step (allocator, lazy initialisation, AdamW state)."""
    net, reference = flow_net(args, lora=True)
    reward = ClassLogProb(ensure_classifier(args)[0], args.target)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    mode, steps = METHODS[args.worker](args), itertools.count()

    def step():
        z, gen = noise(args, next(steps))
        train_step(net, reference, reward, opt, mode, z, args.ks[0], gen, args.kl_weight)

    harness.peak_worker({args.worker: step}, repeats=3)


# -------------------------------------------------------------------------------------------------
# gradients: cosine to the exact full chain's


def gradient_agreement(args, k, reward):
    """{method: (mean cosine to full_0's reward gradient, mean relative L2 distance to backprop's)}
    over --grad-batches batches, all network weights of the pretrained flow."""
    net, _ = flow_net(args, lora=False)
    params = [p for p in net.parameters() if p.requires_grad]
    cos = {m: [] for m in METHODS}
    err = {m: [] for m in METHODS}
    for b in range(args.grad_batches):
        grads = {}
        for m, make in METHODS.items():
            z, gen = noise(args, 10_000 + b)
            r = reward_values(reward, make(args).sample(net, z, k, "euler", gen).x)
            grads[m] = torch.cat([g.flatten() for g in torch.autograd.grad(r.mean(), params)]).double()
        for m, g in grads.items():
            cos[m].append(float(torch.nn.functional.cosine_similarity(g, grads["full_0"], dim=0)))
            err[m].append(float((g - grads["backprop"]).norm() / grads["backprop"].norm()))
    return {m: (statistics.mean(cos[m]), statistics.mean(err[m])) for m in METHODS}


# -------------------------------------------------------------------------------------------------
# training, timed interleaved, with the exact chain's parts


def chain_parts(net, reference, reward, args, k):
    """Seconds of the parts of a full-chain step: (K evaluations without a graph, K evaluations
    with a graph, K VJPs of those, the rest: reward + KL term forward and backward + AdamW)."""
    params = [p for p in net.parameters() if p.requires_grad]
    z, gen = noise(args, 0)
    ts = [torch.full((args.batch,), 1.0 - i / k) for i in range(k)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in ts:
            net(t, z)
    f0, f, b = time.perf_counter() - t0, 0.0, 0.0
    g = torch.randn_like(z)
    for t in ts:
        x = z.clone().requires_grad_(True)
        t1 = time.perf_counter()
        y = net(t, x)
        t2 = time.perf_counter()
        torch.autograd.grad(y, [x, *params], g)
        t3 = time.perf_counter()
        f, b = f + t2 - t1, b + t3 - t2
    scratch = copy.deepcopy(params)
    opt = torch.optim.AdamW(scratch, lr=args.lr)
    x = z.clone().requires_grad_(True)
    t4 = time.perf_counter()
    loss = -reward_values(reward, x).mean() + args.kl_weight * velocity_kl(net, reference, x, z, torch.rand(
        args.batch, generator=gen))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for p, s in zip(params, scratch):
        s.grad = p.grad
    opt.step()
    rest = time.perf_counter() - t4
    for p in params:
        p.grad = None
    return f0, f, b, rest


@torch.no_grad()
def evaluate(net, reference, reward, args, k, n):
    gen = torch.Generator().manual_seed(12345)
    z = torch.randn((n, 1, 8, 8), generator=gen)
    x = generate(net, z, steps=k, method="euler")
    r = reward_values(reward, x)
    frac = float((reward.classifier(x).argmax(1) == reward.target).float().mean())
    kl = float(velocity_kl(net, reference, x, z, torch.rand(n, generator=gen))) if reference is not net else 0.0
    return dict(reward=float(r.mean()), target_fraction=frac, kl=kl, diversity=float(pairwise_distance(x)),
                samples=x[:8].clamp(-1, 1))


def train_interleaved(args, k, reward):
    """Every method trains N steps from the same LoRA start on the same noise per step, the steps
    interleaved (order rotated); the full chain's parts are timed in the same rotation."""
    runs = {}
    for m, make in METHODS.items():
        net, reference = flow_net(args, lora=True)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr)
        runs[m] = dict(net=net, reference=reference, opt=opt, mode=make(args), secs=[], curve=[])
    before = evaluate(runs["full_0"]["net"], runs["full_0"]["reference"], reward, args, k, args.eval_samples)
    start = evaluate(runs["full_0"]["net"], runs["full_0"]["reference"], reward, args, k, 16)["reward"]
    for run in runs.values():
        run["curve"].append((0, start))
    parts, names = [], list(METHODS) + ["parts"]
    every = max(1, args.train_steps // 4)
    for step in range(args.train_steps):
        order = names[step % len(names):] + names[:step % len(names)]
        for m in order:
            if m == "parts":
                parts.append(chain_parts(runs["full_0"]["net"], runs["full_0"]["reference"], reward, args, k))
                continue
            run = runs[m]
            z, gen = noise(args, step)
            t0 = time.perf_counter()
            train_step(run["net"], run["reference"], reward, run["opt"], run["mode"], z, k, gen, args.kl_weight)
            run["secs"].append(time.perf_counter() - t0)
        if (step + 1) % every == 0 or step + 1 == args.train_steps:
            for m, run in runs.items():
                run["curve"].append((step + 1, evaluate(run["net"], run["reference"], reward, args, k, 16)["reward"]))
        print(f"  K={k}: step {step + 1}/{args.train_steps}", flush=True)
    after = {m: evaluate(r["net"], r["reference"], reward, args, k, args.eval_samples) for m, r in runs.items()}
    skip = 1 if args.train_steps > 2 else 0  # the first step warms up
    secs = {m: statistics.median(r["secs"][skip:]) for m, r in runs.items()}
    p = [statistics.median(col) for col in zip(*parts[skip:])]  # f0, f, b, rest
    floors = {"full_0": p[0] + p[1] + p[2] + p[3], "full_auto": p[1] + p[2] + p[3], "backprop": p[1] + p[2] + p[3]}
    curves = {m: r["curve"] for m, r in runs.items()}
    return before, after, secs, floors, dict(zip(("f0", "f", "b", "rest"), p)), curves


# -------------------------------------------------------------------------------------------------
# report


def plot(results, path, ks):
    plt = harness.pyplot()
    if plt is None:
        return
    k = ks[-1]
    res = results[str(k)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw=dict(width_ratios=[1.2, 1]))
    for m, curve in res["curves"].items():
        steps, rewards = zip(*curve)
        axes[0].plot(steps, rewards, marker="o", label=m, linestyle="-" if m in EXACT else "--")
    axes[0].set(xlabel="optimizer step", ylabel=f"mean log p(class {res['target']}) of 16 samples",
                title=f"reward vs step, K = {k} euler steps")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    rows = [("pretrained", res["before"]["samples"])] + [(m, res["after"][m]["samples"]) for m in
                                                         ("full_0", "draft1", "draft5", "alignprop", "refl")]
    framed = [torch.nn.functional.pad(torch.as_tensor(s)[:, 0], (1, 1, 1, 1), value=1.0) for _, s in rows]
    grid = torch.cat([torch.cat(list(f), dim=1) for f in framed], dim=0)  # 10x10 cells, white borders
    axes[1].imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
    axes[1].set_yticks([5 + 10 * i for i in range(len(rows))], [r[0] for r in rows])
    axes[1].set(xticks=[], title=f"samples from the same noise after {res['train_steps']} steps")
    harness.save_figure(fig, path)


def table(res, k):
    print(f"\nK = {k} (euler), batch {res['batch']}, {res['train_steps']} steps; pretrained: reward "
          f"{res['before']['reward']:.2f}, target {res['before']['target_fraction']:.2f}, diversity "
          f"{res['before']['diversity']:.3f}")
    rows = [dict(res["after"][m], method=m, peak=res["peak_mib"][m], secs=res["secs"][m], floor=res["floors"].get(m),
                 cos=res["cos"][m][0], err=res["cos"][m][1]) for m in METHODS]
    print(harness.table(rows, [
        ("method", "method"), ("peak MiB", "peak", ".1f"), ("s/step", "secs", ".3f"),
        ("floor s", lambda r: f"{r['floor']:.3f}" if r["floor"] else ""),
        ("/ floor", lambda r: f"{r['secs'] / r['floor']:.2f}" if r["floor"] else ""), ("cos to exact", "cos", ".4f"),
        ("err vs backprop", "err", ".1e"), ("reward", "reward", ".2f"), ("target", "target_fraction", ".2f"),
        ("KL", "kl", ".4f"), ("diversity", "diversity", ".3f")]))


def parse_args():
    p = harness.parser("reward_finetune", __doc__, resumable=False)
    p.add_argument("--quick", action="store_true", help="K = 4, 8, 4 training steps (a smoke run)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="sampler steps (default 20 50)")
    p.add_argument("--checkpoint", default=None,
                   help="a pretraining run directory on digits (default: made under --out)")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps per method (default 8)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=10.0)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--target", type=int, default=3, help="the class whose log-probability is the reward")
    p.add_argument("--grad-batches", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the method of a --peak-worker process
    args = p.parse_args()
    args.ks = args.ks or ([4, 8] if args.quick else [20, 50])
    args.train_steps = args.train_steps or (4 if args.quick else 8)
    return args


def main():
    args = parse_args()
    args.flow = os.path.abspath(ensure_flow(args))
    if args.peak_worker:
        memory_worker(args)
        return
    if not harness.importable("torchdiffeq", "its row is"):
        METHODS.pop("tdq_adjoint")
    t_start = time.perf_counter()
    classifier, top1 = ensure_classifier(args)
    reward = ClassLogProb(classifier, args.target)
    print(f"flow: {args.flow}; reward: log p(class {args.target}) under a classifier of test top-1 {top1:.4f}\n"
          f"machine: {harness.machine()}", flush=True)
    t_bench = time.perf_counter()
    results = {}
    for k in args.ks:
        peaks = {m: harness.peaks_in_fresh_process(["--worker", m, "--ks", k, "--checkpoint", args.flow])[m] / 2**20
                 for m in METHODS}
        print(f"  K={k}: peak MiB {({m: round(v, 1) for m, v in peaks.items()})}", flush=True)
        cos = gradient_agreement(args, k, reward)
        print(f"  K={k}: cos to exact {({m: round(v[0], 4) for m, v in cos.items()})}", flush=True)
        before, after, secs, floors, parts, curves = train_interleaved(args, k, reward)
        results[str(k)] = dict(peak_mib=peaks, cos=cos, before=before, after=after, secs=secs, floors=floors,
                               parts=parts, curves=curves, batch=args.batch, train_steps=args.train_steps,
                               target=args.target)
        table(results[str(k)], k)
    tag = "quick" if args.quick else "default"
    os.makedirs(args.out, exist_ok=True)
    plot(results, os.path.join(args.out, f"reward_finetune_{tag}.png"), args.ks)
    with open(os.path.join(args.out, f"reward_finetune_{tag}.json"), "w") as f:  # the sample tensors as lists
        json.dump(dict(args=vars(args), machine=harness.machine(), classifier_top1=top1, results=results), f,
                  default=lambda t: t.tolist())
    print(f"\nbenchmark wall time {time.perf_counter() - t_bench:.0f} s (total with set-up "
          f"{time.perf_counter() - t_start:.0f} s); wrote {args.out}/reward_finetune_{tag}.json and .png")


if __name__ == "__main__":
    main()
