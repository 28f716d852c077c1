"""The PRG paper's tables at our scale (arXiv 2412.01787): pretrain with GVP / ICFM / OTCFM, then

  1. PRG finetuned top-1 (head + flow, full trajectory t0 = 0 -> t = 1)        per path
  2. head only (flow frozen)                                                   per path
  3. linear probe / k-NN on the frozen pretrained features at t = 1 (sklearn)  per path
  4. from scratch (same architecture, no pretraining); PRG vs. scratch repeated over finetuning seeds
  5. trajectory segments: the image is the state at t0, t0 in {0, 1/4, 1/2}    one path
  6. step invariance: trained with one step count, evaluated with 4, 20, 100   per path

    python benchmarks/prg_tables.py                       # digits, tiny UNet, CPU (~30-40 min on 2 cores)
    python benchmarks/prg_tables.py --quick               # reduced smoke version (a few minutes)
    python benchmarks/prg_tables.py --data folder:../shared/data/cifar10 --preset cifar --device cuda \\
        --pretrain-steps 100000 --finetune-steps 20000 --batch-size 128 --ode-steps 20 --jobs 1

Every run is a prg_fast run directory under --out (pretrain-*, ft-*, ...), so an interrupted
invocation resumes where it stopped and a finished run is reused (delete --out to start over). The
runs are spread over --jobs worker processes (one torch thread each on the CPU: on a small shared
machine two one-thread processes beat one two-thread process by far, since OpenMP threads of tiny
networks mostly wait for each other). Writes OUT/results.json (every number, arguments, wall times)
and OUT/table.md (the tables in Markdown).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing


# -------------------------------------------------------------------------------------------------
# the jobs (run in worker processes)


def _setup_worker(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def job_pretrain(spec: Dict[str, Any]) -> Dict[str, Any]:
    from prg_fast.training.pretrain import pretrain

    t = time.perf_counter()
    r = pretrain(**spec)
    return {"loss": r.metrics["loss"], "loss_start": r.metrics["loss_start"], "step": r.step,
            "wall_time_s": time.perf_counter() - t, "train_time_total_s": r.metrics["train_time_total_s"]}


def job_finetune(spec: Dict[str, Any]) -> Dict[str, Any]:
    from prg_fast.training.finetune import finetune

    t = time.perf_counter()
    r = finetune(**spec)
    m = r.metrics
    return {"top1": m["top1"], "train_top1": m["train_top1"], "loss": m["loss"], "ce": m["ce"], "fm": m["fm"],
            "step": r.step, "wall_time_s": time.perf_counter() - t, "train_time_total_s": m["train_time_total_s"]}


def job_evaluate(spec: Dict[str, Any]) -> Dict[str, Any]:
    from prg_fast.training.finetune import evaluate

    out = {}
    t = time.perf_counter()
    for steps in spec["eval_steps"]:
        m = evaluate(spec["checkpoint"], spec["data"], ode_steps=steps, method=spec["method"],
                     device=spec["device"], out=os.path.join(spec["checkpoint"], f"evaluate-{spec['method']}-{steps}"))
        out[str(steps)] = m["top1"]
    return {"top1_by_steps": out, "wall_time_s": time.perf_counter() - t}


def job_probe(spec: Dict[str, Any]) -> Dict[str, Any]:
    from prg_fast.training.finetune import extract

    t = time.perf_counter()
    meta = extract(spec["checkpoint"], spec["data"], spec["out"], t=1.0, ode_steps=spec["ode_steps"],
                   method=spec["method"], device=spec["device"], probe=True)
    return {"linear_probe_top1": meta["linear_probe_top1"], "knn_top1": meta["knn_top1"],
            "wall_time_s": time.perf_counter() - t}


def job_probe_pixels(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The same probes on the raw images (the state at t = 0, no flow at all): the baseline that
    frozen trajectory features are compared with."""
    from prg_fast.data import load_data
    from prg_fast.training.evaluate import knn_accuracy, linear_probe

    t = time.perf_counter()
    train, test = load_data(spec["data"], "train", augment=None), load_data(spec["data"], "test", augment=None)
    xs = [d.to_float(d.images).flatten(1).numpy() for d in (train, test)]
    args = (xs[0], train.labels.numpy(), xs[1], test.labels.numpy())
    return {"linear_probe_top1": linear_probe(*args)["top1"], "knn_top1": knn_accuracy(*args)["top1"],
            "wall_time_s": time.perf_counter() - t}


JOBS = {"probe_pixels": job_probe_pixels, "pretrain": job_pretrain, "finetune": job_finetune, "evaluate": job_evaluate, "probe": job_probe}


def _run_job(kind: str, spec: Dict[str, Any], threads: int) -> Dict[str, Any]:
    _setup_worker(threads)
    return JOBS[kind](spec)


# -------------------------------------------------------------------------------------------------
# the plan


def build_plan(a: argparse.Namespace) -> List[Dict[str, Any]]:
    """Jobs with names and dependencies: [{"name", "kind", "spec", "after": [names]}]."""
    out = a.out
    common_ft = dict(data=a.data, batch_size=a.batch_size, ode_steps=a.ode_steps, method=a.method, lr=a.lr,
                     weight_decay=0.05, label_smoothing=0.1, steps=a.finetune_steps, device=a.device, seed=a.seed,
                     progress=a.progress, log_every=max(1, a.finetune_steps // 20),
                     ckpt_every=max(1, a.finetune_steps // 4))
    plan: List[Dict[str, Any]] = []

    def add(name, kind, spec, after=()):
        plan.append({"name": name, "kind": kind, "spec": spec, "after": list(after)})

    if a.probes:
        add("probe-pixels", "probe_pixels", dict(data=a.data))
    # from scratch needs no pretraining: it starts at once (from the preset's architecture)
    for seed in a.seeds:
        name = "scratch" if seed == a.seed else f"scratch-seed{seed}"
        add(name, "finetune", dict(common_ft, out=os.path.join(out, name), from_scratch=True, model=a.preset,
                                   beta=a.beta, path=a.segment_path, seed=seed))
    for path in a.paths:
        pre = os.path.join(out, f"pretrain-{path}")
        add(f"pretrain-{path}", "pretrain", dict(
            data=a.data, path=path, model=a.preset, steps=a.pretrain_steps, batch_size=a.pretrain_batch_size,
            lr=a.pretrain_lr, warmup=a.pretrain_warmup, out=pre, device=a.device, seed=a.seed, progress=a.progress,
            num_samples=16, log_every=max(1, a.pretrain_steps // 20), ckpt_every=max(1, a.pretrain_steps // 4)))
        ft = os.path.join(out, f"ft-{path}")
        add(f"ft-{path}", "finetune", dict(common_ft, checkpoint=pre, out=ft, beta=a.beta), after=[f"pretrain-{path}"])
        add(f"head-{path}", "finetune", dict(common_ft, checkpoint=pre, out=os.path.join(out, f"head-{path}"),
                                             freeze_flow=True, beta=0.0, lr=a.head_lr),
            after=[f"pretrain-{path}"])
        if a.probes:
            add(f"probe-{path}", "probe", dict(checkpoint=pre, data=a.data, out=os.path.join(out, f"features-{path}.npz"),
                                               ode_steps=a.ode_steps, method=a.method, device=a.device),
                after=[f"pretrain-{path}"])
        add(f"eval-{path}", "evaluate", dict(checkpoint=ft, data=a.data, eval_steps=a.eval_steps, method=a.method,
                                             device=a.device), after=[f"ft-{path}"])
        if path == a.segment_path:
            for seed in a.seeds:  # the PRG vs. from-scratch comparison, repeated over finetuning seeds
                if seed != a.seed:
                    add(f"ft-{path}-seed{seed}", "finetune",
                        dict(common_ft, checkpoint=pre, out=os.path.join(out, f"ft-{path}-seed{seed}"), beta=a.beta,
                             seed=seed), after=[f"pretrain-{path}"])
            for t0 in a.t0s:
                if t0 == 0.0:
                    continue  # the full trajectory: ft-{path} itself
                add(f"ft-{path}-t0={t0:g}", "finetune",
                    dict(common_ft, checkpoint=pre, out=os.path.join(out, f"ft-{path}-t0_{t0:g}"), beta=a.beta, t0=t0),
                    after=[f"pretrain-{path}"])
    return plan


def run_plan(plan: List[Dict[str, Any]], jobs: int, threads: int) -> Dict[str, Dict[str, Any]]:
    import multiprocessing as mp

    results: Dict[str, Dict[str, Any]] = {}
    pending = {j["name"]: j for j in plan}
    priority = {"pretrain": 0, "finetune": 1, "evaluate": 2, "probe": 3, "probe_pixels": 3}
    running = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        while pending or running:
            ready = [j for j in pending.values() if all(d in results for d in j["after"])]
            ready.sort(key=lambda j: (priority[j["kind"]], plan.index(j)))
            for j in ready[:max(0, jobs - len(running))]:
                del pending[j["name"]]
                print(f"[prg_tables] start {j['name']}", flush=True)
                running[pool.submit(_run_job, j["kind"], j["spec"], threads)] = j
            if not running:
                raise RuntimeError(f"jobs with unmet dependencies: {sorted(pending)}")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                j = running.pop(fut)
                results[j["name"]] = fut.result()  # a failed job stops the table with its error
                r = results[j["name"]]
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                print(f"[prg_tables] done  {j['name']}: {shown}", flush=True)
    return results


# -------------------------------------------------------------------------------------------------
# the tables


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def tables(a: argparse.Namespace, r: Dict[str, Dict[str, Any]], wall: float) -> str:
    L: List[str] = []
    names = {"gvp": "GVP", "icfm": "ICFM", "otcfm": "OTCFM"}
    n_test = 360 if a.data == "digits" else None
    L.append(f"Data `{a.data}`, UNet preset `{a.preset}`; pretraining {a.pretrain_steps} steps (batch "
             f"{a.pretrain_batch_size}); finetuning {a.finetune_steps} steps (batch {a.batch_size}), "
             f"{a.ode_steps} `{a.method}` steps from t0 to t = 1, beta = {a.beta:g}. Top-1 on the test split"
             + (f" ({n_test} images: one image = {100 / n_test:.2f} points)." if n_test else "."))
    L.append("")
    L.append("**Table 1: pretraining path vs. what is trained** (top-1 %)")
    L.append("")
    L.append("| pretraining | PRG finetuned (head + flow) | head only (flow frozen) | linear probe, frozen x_1 | "
             "20-NN, frozen x_1 | pretrain loss |")
    L.append("|---|---|---|---|---|---|")
    none = {"linear_probe_top1": None, "knn_top1": None}
    for p in a.paths:
        pr = r.get(f"probe-{p}", none)
        L.append(f"| {names[p]} | {_pct(r[f'ft-{p}']['top1'])} | {_pct(r[f'head-{p}']['top1'])} | "
                 f"{_pct(pr['linear_probe_top1'])} | {_pct(pr['knn_top1'])} | {r[f'pretrain-{p}']['loss']:.4f} |")
    L.append(f"| none (from scratch, same architecture) | {_pct(r['scratch']['top1'])} | - | - | - | - |")
    px = r.get("probe-pixels", none)
    L.append(f"| none (raw pixels, t = 0: no flow) | - | - | {_pct(px['linear_probe_top1'])} | "
             f"{_pct(px['knn_top1'])} | - |")
    L.append("")
    sp = a.segment_path
    if len(a.seeds) > 1:
        def seeds_row(label, prefix):
            vals = [r[prefix if seed == a.seed else f"{prefix}-seed{seed}"]["top1"] for seed in a.seeds]
            mean = sum(vals) / len(vals)
            return f"| {label} | " + " | ".join(_pct(v) for v in vals) + f" | {_pct(mean)} | {_pct(min(vals))}-{_pct(max(vals))} |"

        L.append(f"**Table 1b: PRG ({names[sp]}) vs. from scratch over finetuning seeds** (head init, data order, "
                 f"noise; same pretrained checkpoint) (top-1 %)")
        L.append("")
        L.append("| run | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean | range |")
        L.append("|---|" + "---|" * (len(a.seeds) + 2))
        L.append(seeds_row(f"PRG finetuned ({names[sp]})", f"ft-{sp}"))
        L.append(seeds_row("from scratch", "scratch"))
        L.append("")
    L.append(f"**Table 2: trajectory segment** ({names[sp]}; the image is the state at t0, reversed to t = 1; "
             f"{a.ode_steps} steps over the segment)")
    L.append("")
    L.append("| t0 | " + " | ".join(f"{t0:g}" for t0 in a.t0s) + " |")
    L.append("|---|" + "---|" * len(a.t0s))
    row = [r[f"ft-{sp}"]["top1"] if t0 == 0.0 else r[f"ft-{sp}-t0={t0:g}"]["top1"] for t0 in a.t0s]
    L.append("| top-1 % | " + " | ".join(_pct(v) for v in row) + " |")
    L.append("")
    L.append(f"**Table 3: step invariance** (trained with {a.ode_steps} `{a.method}` steps, evaluated with others; "
             "`prg-fast evaluate --ode-steps K`)")
    L.append("")
    L.append("| pretraining | " + " | ".join(f"{k} steps" for k in a.eval_steps) + " |")
    L.append("|---|" + "---|" * len(a.eval_steps))
    for p in a.paths:
        by = r[f"eval-{p}"]["top1_by_steps"]
        L.append(f"| {names[p]} | " + " | ".join(_pct(by[str(k)]) for k in a.eval_steps) + " |")
    L.append("")
    times = {k: v.get("train_time_total_s", v["wall_time_s"]) for k, v in r.items()}
    L.append(f"Wall time: {wall / 60:.1f} min in total with {a.jobs} worker process(es) x {a.threads} thread(s); "
             "per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".")
    return "\n".join(L) + "\n"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
    p.add_argument("--preset", default="tiny", help="UNet preset (tiny | cifar | prg32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--out", default=os.path.join(HERE, "out", "prg_tables"))
    p.add_argument("--quick", action="store_true", help="reduced smoke version (few steps; numbers not meaningful)")
    p.add_argument("--paths", default="gvp,icfm,otcfm")
    p.add_argument("--segment-path", default="otcfm", help="the path of the trajectory-segment table")
    p.add_argument("--t0s", default="0,0.25,0.5")
    p.add_argument("--eval-steps", default="4,20,100")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-batch-size", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=5e-4)
    p.add_argument("--pretrain-warmup", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ode-steps", type=int, default=4)
    p.add_argument("--method", default="euler")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--head-lr", type=float, default=None, help="head-only runs (default: --lr)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="finetuning seeds of the PRG vs. from-scratch comparison "
                   "(the --segment-path run and the scratch run; the first is --seed's run)")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the sklearn linear-probe / k-NN columns (slow on 50,000 CIFAR-size feature vectors)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: 1 on the CPU, "
                   "unchanged on a GPU)")
    p.add_argument("--progress", action="store_true", help="progress bars of every run (interleaved)")
    a = p.parse_args(argv)
    a.paths = [s for s in a.paths.split(",") if s]
    a.t0s = [float(s) for s in a.t0s.split(",") if s]
    a.eval_steps = [int(s) for s in a.eval_steps.split(",") if s]
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    if a.seed not in a.seeds:
        a.seeds = [a.seed] + a.seeds
    if a.quick:  # a smoke test of the whole pipeline: the numbers mean little
        a.pretrain_steps, a.finetune_steps, a.pretrain_warmup, a.ode_steps = 40, 8, 5, 2
        a.eval_steps = sorted({max(1, k // 10) for k in a.eval_steps})
        a.seeds = a.seeds[:2]
        a.out = a.out.rstrip("/") + "_quick" if a.out == os.path.join(HERE, "out", "prg_tables") else a.out
    if a.threads is None:
        a.threads = 1 if a.device == "cpu" else 0
    if a.head_lr is None:
        a.head_lr = a.lr
    if a.segment_path not in a.paths:
        p.error(f"--segment-path {a.segment_path} must be one of --paths {a.paths}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    t = time.perf_counter()
    results = run_plan(build_plan(a), a.jobs, a.threads)
    wall = time.perf_counter() - t
    md = tables(a, results, wall)
    info = {"args": vars(a), "results": results, "wall_time_s": wall, "machine": machine(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"[prg_tables] {info['machine']}; wrote {a.out}/results.json and table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
