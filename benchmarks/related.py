"""PRG finetuning, RepFusion and GenRep side by side, on the same pretrained flow model and with a
matched training budget (the same number of optimizer steps of the same batch size per system).

    python benchmarks/related.py                      # digits, CPU: pretrains a tiny flow first
    python benchmarks/related.py --data folder:../shared/data/cifar10 --checkpoint RUNS/cifar_pretrain \
        --student resnet18 --encoder resnet18 --budget 20000 --batch-size 128 --device cuda   # GPU

The rows (systems() below, each a `prg-fast` command run as a subprocess and timed around it, plus
a linear probe on raw pixels) and their protocols: RESULTS.md, "Related systems on digits".
Results: a markdown table; with --results benchmarks/RESULTS.md it is also written there as the
section "Related systems on <data>" (only that section is replaced). Each finished run is cached in
its folder's row.json (the one record kept); --fresh reruns everything.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

import harness

ROOT = harness.ROOT


def run_row(name: str, argv: List[str], out: str, env: Dict[str, str], fresh: bool) -> Dict[str, Any]:
    """Run one system (a command writing OUT/metrics.json) unless OUT/row.json caches it."""
    row_file = os.path.join(out, "row.json")
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    if os.path.isfile(row_file):
        with open(row_file) as f:
            row = json.load(f)
        if row.get("argv") == argv[1:]:
            print(f"[related] {name}: cached ({row_file})", file=sys.stderr)
            return row
        shutil.rmtree(out)  # other arguments: rerun from scratch
    print(f"[related] {name}: {' '.join(shlex.quote(a) for a in argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"name": name, "error": f"exit status {proc.returncode}", "argv": argv[1:]}
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    row = {"name": name, "top1": metrics["top1"], "wall_s": round(wall, 1), "metrics": metrics, "argv": argv[1:],
           "load_average_after": harness.load_average()}
    with open(row_file, "w") as f:
        json.dump(row, f, indent=1)
    return row


def pixel_probe(data: str) -> Dict[str, Any]:
    from prg_fast.data import load_data
    from prg_fast.training.evaluate import linear_probe

    t0 = time.perf_counter()
    tr, te = load_data(data, "train", augment=None), load_data(data, "test", augment=None)
    res = linear_probe(tr.images.flatten(1).float(), tr.labels, te.images.flatten(1).float(), te.labels)
    return {"name": "raw pixels + linear probe", "top1": res["top1"], "wall_s": round(time.perf_counter() - t0, 1),
            "metrics": res}


def systems(args, ckpt: str) -> Dict[str, tuple]:
    """--rows key -> (table row, protocol, run folder, the prg-fast command line of one seed without
    its common flags): the matched budget, RepFusion's split in half."""
    half, rest, b = args.budget // 2, args.budget - args.budget // 2, str(args.batch_size)
    rep = ["repfusion", "--checkpoint", ckpt, "--finetune-steps", str(rest), "--batch-size", b, "--student",
           args.student]
    gen = ["genrep", "--checkpoint", ckpt, "--batch-size", b, "--encoder", args.encoder, "--sigma", str(args.sigma),
           "--pool", str(args.gen_pool), "--neighbors", "4", "--ode-steps", "10", "--method", "rk4"]
    return {
        "prg": ("PRG finetune (flow + head, reversed ODE)", f"{args.budget} CE steps through {args.ode_steps} euler "
                "steps, t 0 -> 1", "prg", ["finetune", "--checkpoint", ckpt, "--steps", str(args.budget), "--batch-size",
                                            b, "--ode-steps", str(args.ode_steps), "--method", "euler"]),
        "repfusion": ("RepFusion, fixed t = 0.1", f"{half} distillation + {rest} CE steps", "repfusion",
                      rep + ["--steps", str(half), "--t", "0.1"]),
        "repfusion-policy": ("RepFusion, REINFORCE policy over t", f"{half} distillation + {rest} CE steps",
                             "repfusion_policy", rep + ["--steps", str(half), "--policy"]),
        "student": ("control: same student, CE only", f"0 distillation + {rest} CE steps", "student",
                    rep + ["--steps", "0"]),
        "genrep": (f"GenRep, sigma = {args.sigma:g}", f"{args.budget} NT-Xent steps on {args.gen_pool} x (1 + 4) "
                   "generated images (10 rk4 steps), then linear probe", "genrep", gen + ["--steps", str(args.budget)]),
        "random": ("control: GenRep encoder untrained", "0 steps, linear probe", "random_encoder", gen + ["--steps", "0"]),
    }


def pretrained(args, env) -> tuple:
    """The shared pretrained flow: --checkpoint, or one pretrained into OUT/pretrain (reused)."""
    if args.checkpoint is not None:
        return os.path.abspath(args.checkpoint), None
    ckpt = os.path.join(args.out, "pretrain")
    argv = [sys.executable, "-m", "prg_fast", "pretrain", "--data", args.data, "--path", "otcfm", "--model", "tiny",
            "--steps", str(args.pretrain_steps), "--batch-size", "128", "--out", ckpt, "--seed",
            "0", "--device", args.device, "--ckpt-every", "250", "--num-samples", "64"] + \
        (["--no-progress"] if args.no_progress else [])
    if not os.path.isfile(os.path.join(ckpt, "metrics.json")):
        subprocess.run(argv, env=env, cwd=ROOT, check=True)
    with open(os.path.join(ckpt, "metrics.json")) as f:
        pm = json.load(f)
    return os.path.abspath(ckpt), {"argv": argv[1:], "loss": pm["loss"], "step": pm["step"],
                                   "train_time_total_s": pm.get("train_time_total_s")}


def run_seeds(args, env, name: str, folder: str, command: List[str], seeds: List[int]) -> Dict[str, Any]:
    """One table row: the command once per seed (seed s > 0 in OUT/FOLDER_seed<s>)."""
    runs = []
    for seed in seeds:
        out = os.path.join(args.out, folder if seed == 0 else f"{folder}_seed{seed}")
        common = ["--data", args.data, "--seed", str(seed), "--device", args.device] + \
            (["--no-progress"] if args.no_progress else [])
        run = run_row(name, [sys.executable, "-m", "prg_fast", *command[:1], *common, *command[1:], "--out", out], out,
                      env, args.fresh)
        if "error" in run:
            return run
        runs.append(run)
    top = [r["top1"] for r in runs]
    return {"name": name, "top1": statistics.mean(top), "top1_std": statistics.stdev(top) if len(top) > 1 else None,
            "top1_runs": top, "seeds": seeds, "wall_s": round(statistics.mean(r["wall_s"] for r in runs), 1),
            "metrics": runs[0]["metrics"], "runs": runs}


def parse(argv=None):
    p = harness.parser("related", __doc__)
    p.add_argument("--data", default="digits")
    p.add_argument("--checkpoint", default=None, help="pretraining run directory (default: pretrain one into OUT)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--budget", type=int, default=200, help="optimizer steps per system (RepFusion: half + half)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ode-steps", type=int, default=20, help="PRG finetune: reversed-ODE steps (euler)")
    p.add_argument("--student", default="resnet-small")
    p.add_argument("--encoder", default="resnet-small")
    p.add_argument("--sigma", type=float, default=0.2)
    p.add_argument("--gen-pool", type=int, default=512)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every row is run once per seed")
    p.add_argument("--prg-seeds", default=None, help="seeds of the PRG row (default: --seeds; it is the slow one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per run (OMP_NUM_THREADS; 1 is fastest on a shared 2-core machine)")
    p.add_argument("--results", default="",
                   help="markdown file whose 'Related systems on DATA' section is (re)written, for example "
                        "benchmarks/RESULTS.md (default: none; the table is printed)")
    p.add_argument("--rows", default="prg,repfusion,repfusion-policy,student,genrep,random,pixels",
                   help="comma-separated subset of prg,repfusion,repfusion-policy,student,genrep,random,pixels")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.budget < 2:
        p.error("--budget must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load_start = harness.load_average()
    ckpt, pretrain_row = pretrained(args, env)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    prg_seeds = [int(x) for x in args.prg_seeds.split(",") if x.strip()] if args.prg_seeds else seeds
    rows: List[Dict[str, Any]] = []
    protocol: Dict[str, str] = {"raw pixels + linear probe": "linear probe on the raw pixels (deterministic)"}
    wanted = args.rows.split(",")
    for key, (name, proto, folder, command) in systems(args, ckpt).items():
        if key in wanted:
            protocol[name] = proto
            rows.append(run_seeds(args, env, name, folder, command, prg_seeds if key == "prg" else seeds))
    if "pixels" in wanted:
        rows.append(dict(pixel_probe(args.data), seeds=[0]))

    from prg_fast.data import load_data

    # the runs' own wall times (cached rows keep the time they took when they ran)
    total = sum(sum(run["wall_s"] for run in row.get("runs", [row])) for row in rows if "error" not in row)
    report = {"data": args.data, "checkpoint": ckpt, "pretrain": pretrain_row, "budget": args.budget,
              "batch_size": args.batch_size, "rows": rows, "protocol": protocol,
              "n_test": len(load_data(args.data, "test", augment=None)), "machine": harness.machine(),
              "threads": args.threads, "load_average_start": load_start, "load_average_end": harness.load_average(),
              "total_wall_s": round(total, 1),
              "command": "python benchmarks/related.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    table = markdown(report)
    print(table)
    if args.results:
        write_section(args.results, section_title(args.data), table)
    return 0


def section_title(data: str) -> str:
    name = data.split(":", 1)[0] if data == "digits" or ":" not in data else os.path.basename(data.rstrip("/"))
    return f"Related systems on {name}"


def _rel(text: str) -> str:
    """Paths under the repository shown relative to it."""
    return text.replace(ROOT + os.sep, "")


def markdown(r: Dict[str, Any]) -> str:
    n = r["n_test"]
    loads = [run.get("load_average_after") for row in r["rows"] for run in row.get("runs", [])]
    if loads and all(loads):
        first = [float(x.split()[0]) for x in loads]
        load_text = f"; 1-minute load average after each run {min(first):.1f}-{max(first):.1f}"
    else:
        load_text = ""
    lines = [f"Command: `{r['command']}`", "",
             f"Machine: {r['machine']}; {r['threads']} intra-op thread(s) per run{load_text}"
             + (" (a 2-core machine shared with other jobs: wall times are indicative only)."
                if os.cpu_count() and os.cpu_count() <= 4 else "."),
             f"Wall time of all runs together {r['total_wall_s']:.0f} s. Same pretrained "
             f"flow for every row: `{_rel(r['checkpoint'])}`"]
    if r["pretrain"]:
        pre = r["pretrain"]
        lines[-1] += (f" (`prg-fast {_rel(' '.join(pre['argv'][2:]))}`: {pre['step']} steps, final flow-matching loss "
                      f"{pre['loss']:.4f}, {pre['train_time_total_s']:.0f} s, not counted below)")
    lines[-1] += "."
    lines += [f"Matched budget: {r['budget']} optimizer steps of batch {r['batch_size']} per system (RepFusion splits "
              f"them between distillation and finetuning). Top-1 on the {n} test images (mean ± standard deviation "
              f"over seeds where there are several); at 95% accuracy one run's binomial standard error is about "
              f"{100 * math.sqrt(0.95 * 0.05 / n):.1f} points, so differences of 1-2 points are not resolved.", ""]
    def top1(row):
        if "error" in row:
            return row["error"]
        std = f" ± {100 * row['top1_std']:.1f}" if row.get("top1_std") is not None else ""
        return f"{100 * row['top1']:.1f}%{std}"

    lines.append(harness.table(r["rows"], [
        ("system", "name"), ("protocol", lambda row: r["protocol"].get(row["name"], "")), ("test top-1", top1),
        ("seeds (runs)", lambda row: f"{len(row.get('seeds', [0]))} (" + ", ".join(
            f"{100 * t:.1f}" for t in row.get("top1_runs", [row["top1"]])) + ")"),
        ("wall time per run (s)", "wall_s", ".0f")]))
    extra = []
    for row in r["rows"]:
        m, seed = row.get("metrics") or {}, row.get("seeds", [0])[0]
        if "policy_t_mean" in m:
            extra.append(f"RepFusion policy (seed {seed}): expected t under the learned policy "
                         f"{m['policy_t_mean']:.2f} on the test images (candidates {', '.join(m['policy_probs'])}).")
        if "generation_time_s" in m and m.get("step"):
            extra.append(f"GenRep (seed {seed}): {m['generated_images']} images generated in "
                         f"{m['generation_time_s']:.0f} s, NT-Xent {m['nt_xent_first']:.3f} -> {m['nt_xent']:.3f}; "
                         f"k-NN (k=20) top-1 {100 * m['knn_top1']:.1f}%.")
        if "distill_loss_first" in m and m.get("distill_loss") is not None:
            extra.append(f"{row['name']} (seed {seed}): distillation MSE (standardised teacher features) "
                         f"{m['distill_loss_first']:.3f} -> {m['distill_loss']:.3f}.")
    extra += comparisons(r)
    if extra:
        lines += [""] + [f"- {e}" for e in extra]
    if r["data"] == "digits":
        lines += ["", "Not run here (no GPU): the same comparison on CIFAR-10, e.g. `python benchmarks/related.py --data "
                  "folder:../shared/data/cifar10 --checkpoint CIFAR_PRETRAIN_DIR --student resnet18 --encoder resnet18 "
                  "--batch-size 128 --budget 20000 --gen-pool 10000 --device cuda --threads 8 --out "
                  "benchmarks/out/related_cifar10`, which writes its own section \"Related systems on cifar10\"."]
    return "\n".join(lines) + "\n"


def comparisons(r: Dict[str, Any]) -> List[str]:
    """Differences between each system and its control, and whether they exceed twice their
    standard error (seed spread / sqrt(runs), or the binomial error of a single run)."""
    n = r["n_test"]
    by_key = {row["name"]: row for row in r["rows"] if "error" not in row}

    def se(row):
        k = len(row.get("top1_runs", [row["top1"]]))
        if k > 1 and row.get("top1_std") is not None:
            return row["top1_std"] / math.sqrt(k)
        p = row["top1"]
        return math.sqrt(max(p * (1 - p), 1.0 / n) / n)

    def find(prefix):
        return next((row for name, row in by_key.items() if name.startswith(prefix)), None)

    pairs = [("RepFusion, fixed", "control: same student"), ("RepFusion, REINFORCE", "control: same student"),
             ("GenRep", "control: GenRep encoder"), ("GenRep", "raw pixels"), ("PRG finetune", "RepFusion, fixed")]
    out = []
    for a_name, b_name in pairs:
        a, b = find(a_name), find(b_name)
        if a is None or b is None:
            continue
        d = a["top1"] - b["top1"]
        err = 2 * math.sqrt(se(a) ** 2 + se(b) ** 2)
        verdict = "resolved" if abs(d) > err else "not resolved"
        out.append(f"{a['name']} vs {b['name']}: {100 * d:+.1f} points (2 standard errors {100 * err:.1f}: {verdict}).")
    return out


def write_section(path: str, title: str, body: str) -> None:
    """Replace (or append, after a blank line) the section `## title` of a markdown file, leaving the
    rest untouched; written atomically."""
    lines = (open(path).read() if os.path.isfile(path) else "# Measured results\n").split("\n")
    header = f"## {title}"
    start = next((i for i, l in enumerate(lines) if l.strip() == header), None)
    if start is None:
        lines += [""] if lines[-1] != "" else []
        start = len(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = "\n".join(lines[:start] + [header, ""] + body.rstrip("\n").split("\n") + [""] + lines[end:])
    with open(path + ".tmp", "w") as f:
        f.write(new if new.endswith("\n") else new + "\n")
    os.replace(path + ".tmp", path)

if __name__ == "__main__":
    sys.exit(main())
