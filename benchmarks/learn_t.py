"""Learn where on the reversed trajectory to read features (issue 11 item 3): PRG finetuning on
digits with the segment's end t fixed (1.0, the paper's choice, and 0.5) against t learned jointly
with the flow and head (`finetune --learn-t`, starting from 0.5), same budget, several seeds.

    python benchmarks/learn_t.py                 # digits, tiny UNet, CPU (~10 min on 2 cores)
    python benchmarks/learn_t.py --quick         # a smoke version (about a minute)

One OTCFM pretraining run, then every finetuning run (rows x seeds) in a fresh worker process with
one thread (prg_fast run directories under --out: an interrupted invocation resumes, a finished run
is read back). Prints a Markdown table (top-1 mean +- sd over seeds, the learned t per seed, wall
time) and writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

ROWS = {  # name -> finetune arguments that differ between rows
    "fixed t = 1.0 (PRG)": dict(t=1.0),
    "fixed t = 0.5": dict(t=0.5),
    "learned t (from 0.5)": dict(t=0.5, learn_t=True),
}


def _job(args):
    """One finetuning run (in a fresh process): returns its metrics.json."""
    import torch

    torch.set_num_threads(1)
    from prg_fast.training.finetune import finetune

    kwargs, out = args
    metrics_file = os.path.join(out, "metrics.json")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            done = json.load(f)
        if done.get("step") == kwargs["steps"]:
            return done
    return finetune(out=out, progress=False, **kwargs).metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "runs", "benchmarks", "learn_t"))  # git-ignored
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pretrain-steps", type=int, default=750)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--ode-steps", type=int, default=4)
    p.add_argument("--t-lr", type=float, default=0.05)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny step counts, one seed (a smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.pretrain_steps, a.finetune_steps, a.ode_steps = 1, 20, 4, 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from prg_fast.training.pretrain import pretrain

    t_start = time.perf_counter()
    pre_dir = os.path.join(a.out, "pretrain-otcfm")
    pretrain(data="digits", path="otcfm", model="tiny", steps=a.pretrain_steps, batch_size=128, out=pre_dir,
             progress=False, seed=0)
    common = dict(data="digits", checkpoint=pre_dir, steps=a.finetune_steps, batch_size=64, ode_steps=a.ode_steps,
                  method="euler", t_lr=a.t_lr)
    jobs = []
    for row, extra in ROWS.items():
        for seed in range(a.seeds):
            name = f"ft-{row.split()[0]}-t{extra['t']:g}-s{seed}"
            jobs.append((row, seed, ({**common, **extra, "seed": seed}, os.path.join(a.out, name))))
    # a fresh process per job: a long-lived worker would carry one run's allocations into the next
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        results = list(pool.map(_job, [j[2] for j in jobs]))
    wall = time.perf_counter() - t_start

    table = {row: [] for row in ROWS}
    for (row, seed, _), m in zip(jobs, results):
        table[row].append({"seed": seed, "top1": m["top1"], "t_final": m["t_final"], "train_time_s": m.get("wall_time_s")})
    lines = ["| finetuning | top-1 % (mean +- sd) | per seed | t where features are read |", "|---|---|---|---|"]
    for row, runs in table.items():
        accs = [100 * r["top1"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        ts = ", ".join(f"{r['t_final']:.3f}" for r in runs)
        lines.append(f"| {row} | {statistics.mean(accs):.1f} +- {sd:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in accs)} | {ts} |")
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    print("\n".join(lines))
    print(f"\n{len(jobs)} finetuning runs + 1 pretraining, wall time {wall / 60:.1f} min ({device}; "
          f"{a.jobs} worker process(es) x 1 thread)")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "rows": table, "wall_time_s": wall, "device": device}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
