"""PRG on Fashion-MNIST on a CPU (issue 33): label-scarce and all-label tables over three seeds. The
protocol, its scale and every row: benchmarks/RESULTS.md, "PRG on Fashion-MNIST on the CPU".

    python benchmarks/fashion_mnist.py            # the tables (hours on a shared 2-core machine; resumable)
    python benchmarks/fashion_mnist.py --quick    # every row at small scale (a few minutes)
    python benchmarks/fashion_mnist.py --report   # the Markdown tables and the figures from the results file

One pretrained flow (the `mnist28` preset, OT-CFM, seed 0), published as
weights/fashion_mnist_flow.pt, is shared by every pretrained row. Each step of the work is a
`prg-fast` command (or one of this script's --internal tasks) run as a subprocess, one torch thread
each, --jobs at a time, its CPU seconds and peak memory read from the kernel (os.wait4); a finished
cell is one JSON line of benchmarks/results/fashion_mnist[_quick].jsonl, and a rerun skips the cells
already there (run directories under runs/benchmarks/ resume an interrupted command). --quick: the
same rows on 6,000 / 1,000 images of the real files, fewer steps, two seeds.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, HERE)

import harness  # noqa: E402  (the figures, the results file's lines, the load average)

WEIGHTS = "weights/fashion_mnist_flow.pt"  # relative to the repository root
# The all-label scratch rows run at niceness +10: the kernel shares the CPU between sessions (autogroups)
# first, so the parallel cells only split this run's part of the machine, and the pretraining and
# the pretrained rows (which wait for it) take most of that; those long rows, needing nothing, fill in.
NICE = 10
LABELS = (10, 100, None)  # None: every training image

# The protocol (why this scale: RESULTS.md). The learning curve (test top-1 every quarter) only for
# all-label rows, and the step sweep (K/2, 4K) for PRG and scratch: each test evaluation costs
# 10,000 x steps forward passes.
SCALES: Dict[str, Dict[str, Any]] = {
    "full": dict(seeds=(0, 1, 2), ode_steps=2, method="euler", beta=0.1, lr=2e-3, model="mnist28",
                 pretrain=dict(steps=10000, batch_size=128, lr=2e-3, warmup=100, ema_decay=0.999),
                 finetune={10: dict(steps=200, batch_size=50), 100: dict(steps=400, batch_size=100),
                           None: dict(steps=940, batch_size=128)},
                 subset=None),
    "quick": dict(seeds=(0, 1), ode_steps=2, method="euler", beta=0.1, lr=2e-3, model="mnist28",
                  pretrain=dict(steps=150, batch_size=64, lr=2e-3, warmup=20, ema_decay=0.99),
                  finetune={10: dict(steps=20, batch_size=50), 100: dict(steps=20, batch_size=100),
                            None: dict(steps=30, batch_size=128)},
                  subset=(6000, 1000)),
}


def labels_name(n: Optional[int]) -> str:
    return "all" if n is None else str(n)


# -------------------------------------------------------------------------------------------------
# measuring one command


def run_command(argv: List[str], log: str, nice: int = 0) -> Dict[str, Any]:
    """Run `argv` (one torch thread, niceness +`nice`), stderr appended to `log`: its wall and CPU
    seconds, peak resident memory, and its last stdout line as JSON (a prg-fast command's metrics)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"$ {shlex.join(argv)}\n")
        err.flush()
        # nice execs the command in its own process: wait4 below still measures the command
        proc = subprocess.Popen((["nice", "-n", str(nice)] if nice else []) + argv, cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time and peak memory
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"command failed with status {rc} (log: {log}): {shlex.join(argv)}")
    lines = [s for s in out.splitlines() if s.strip()]
    return {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "metrics": json.loads(lines[-1]) if lines else {}}


def prg_fast_cmd(command: str, *args) -> List[str]:
    return [sys.executable, "-m", "prg_fast", command, *[str(a) for a in args]]


def internal_cmd(task: str, *args) -> List[str]:
    """This script's own small tasks, run as subprocesses: measured as the prg-fast commands are."""
    return [sys.executable, os.path.abspath(__file__), "--internal", task, *[str(a) for a in args]]


# -------------------------------------------------------------------------------------------------
# the cells


class Plan:
    """The cells of one scale, in the order they are started (dependencies permitting)."""

    def __init__(self, scale: str, run_root: str, jobs: int):
        self.scale, self.p = scale, SCALES[scale]
        self.root = run_root
        self.flow = os.path.join(ROOT, WEIGHTS) if scale == "full" else os.path.join(run_root, "flow.pt")
        self.data = ["--data", "fashion-mnist"]
        if self.p["subset"]:
            self.data += ["--data-dir", os.path.join(run_root, "data")]
        self.spec = "fashion-mnist" + (f":{os.path.join(run_root, 'data')}" if self.p["subset"] else "")
        self.cells: List[Dict[str, Any]] = []
        self._build()

    def add(self, key: str, after: List[str], run, **info) -> None:
        self.cells.append({"key": key, "after": after, "run": run, **info})

    def _build(self) -> None:
        """The cells in the order they start: the pretraining, the label-scarce scratch rows beside it,
        then the pretrained rows row by row (10 labels first, one all-label PRG seed early)."""
        seeds = self.p["seeds"]
        base = [] if not self.p["subset"] else ["data"]
        if self.p["subset"]:
            self.add("data", [], lambda: self.steps([internal_cmd("subset", *self.p["subset"], self.path("data"))]),
                     kind="data")
        self.add("pretrain", base, self.pretrain, kind="pretrain")
        ten, hundred, every = LABELS
        for s in seeds:
            self.add_finetune("scratch", ten, s, base)
        self.add("publish", ["pretrain"], lambda: self.steps([internal_cmd("publish", self.path("pretrain"), self.flow)]),
                 kind="publish")
        self.add("figure-flow", ["publish"], lambda: self.steps(
            [internal_cmd("figure-flow", self.flow, self.figure("fashion_mnist_flow.png"), self.spec)]), kind="figure")
        self.add("features", ["publish"], self.features, kind="features")
        order = ([("prg", ten, s) for s in seeds] + [("head", ten, s) for s in seeds] + [("probe", ten, s) for s in seeds]
                 + [("scratch", hundred, s) for s in seeds] + [("prg", every, seeds[0])]
                 + [(m, hundred, s) for m in ("prg", "head", "probe") for s in seeds]
                 + [("scratch", every, s) for s in seeds]
                 + [("probe", every, seeds[0])]  # all labels: the probe has nothing random, one run
                 + [("prg", every, s) for s in seeds[1:]] + [("head", every, s) for s in seeds])
        for method, n, s in order:
            if method == "probe":
                self.add(f"probe-{labels_name(n)}-s{s}", ["features"], lambda n=n, s=s: self.probe(n, s),
                         kind="probe", method="probe", labels_per_class=n, seed=s)
            else:
                self.add_finetune(method, n, s, ["publish"] if method != "scratch" else base)

    def path(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    def figure(self, name: str) -> str:
        return os.path.join(HERE, "figures", name) if self.scale == "full" else self.path(name)

    def steps(self, argvs: List[List[str]], nice: int = 0) -> Dict[str, Any]:
        """Run the commands one after the other; their measurements summed (peak: the largest)."""
        out = {"commands": [], "wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": 0.0, "metrics": []}
        for argv in argvs:
            r = run_command(argv, self.path("commands.log"), nice)
            out["commands"].append(shlex.join([os.path.relpath(a, ROOT) if a.startswith(ROOT) else a
                                               for a in (["python"] + argv[1:])]))
            out["wall_s"] += r["wall_s"]
            out["cpu_s"] += r["cpu_s"]
            out["peak_rss_mib"] = max(out["peak_rss_mib"], r["peak_rss_mib"])
            out["metrics"].append(r["metrics"])
        return out

    def pretrain(self) -> Dict[str, Any]:
        q = self.p["pretrain"]
        r = self.steps([prg_fast_cmd("pretrain", *self.data, "--model", self.p["model"], "--path", "otcfm",
                                     "--steps", q["steps"], "--batch-size", q["batch_size"], "--lr", q["lr"],
                                     "--warmup", q["warmup"], "--ema-decay", q["ema_decay"], "--seed", 0,
                                     "--ckpt-minutes", 5, "--no-progress", "--out", self.path("pretrain"))])
        m = r.pop("metrics")[0]
        return {**r, "loss": m.get("loss"), "loss_start": m.get("loss_start"), "steps": m.get("step"),
                "resumed_from_step": m.get("resumed_from_step"), "train_time_total_s": m.get("train_time_total_s")}

    def features(self) -> Dict[str, Any]:
        r = self.steps([prg_fast_cmd("extract", *self.data, "--checkpoint", self.flow, "--t", 1.0, "--ode-steps",
                                     self.p["ode_steps"], "--method", self.p["method"], "--batch-size", 500,
                                     "--no-progress", "--force", "--out", self.path("features"))])
        m = r.pop("metrics")[0]
        return {**r, "feature_shape": m.get("feature_shape"), "n_train": m.get("n_train"), "n_test": m.get("n_test")}

    def probe(self, n: Optional[int], seed: int) -> Dict[str, Any]:
        r = self.steps([internal_cmd("probe", self.path("features", "features.npz"), labels_name(n), seed)])
        return {**r, **r.pop("metrics")[0]}

    def add_finetune(self, method: str, n: Optional[int], seed: int, after: List[str]) -> None:
        self.add(f"{method}-{labels_name(n)}-s{seed}", after, lambda: self.finetune(method, n, seed), kind="finetune",
                 method=method, labels_per_class=n, seed=seed)

    def finetune(self, method: str, n: Optional[int], seed: int) -> Dict[str, Any]:
        p, f = self.p, self.p["finetune"][n]
        out = self.path(f"{method}-{labels_name(n)}-s{seed}")
        k = p["ode_steps"]
        argv = prg_fast_cmd("finetune", *self.data, "--steps", f["steps"], "--batch-size", f["batch_size"],
                            "--ode-steps", k, "--method", p["method"], "--lr", p["lr"], "--seed", seed,
                            "--eval-every", max(f["steps"] // 4, 1) if n is None else 0,  # the learning curve
                            "--log-every", max(f["steps"] // 20, 1),
                            "--ckpt-minutes", 5, "--no-progress", "--out", out)
        if n is not None:
            argv += ["--labels-per-class", str(n), "--labels-seed", str(seed)]
        argv += {"prg": ["--weights", self.flow, "--beta", str(p["beta"])],
                 "scratch": ["--from-scratch", "--model", p["model"], "--beta", str(p["beta"])],
                 "head": ["--weights", self.flow, "--freeze-flow"]}[method]
        evals = [prg_fast_cmd("evaluate", *self.data, "--checkpoint", out, "--ode-steps", steps, "--no-progress",
                              "--force", "--out", os.path.join(out, f"evaluate-{steps}"))
                 for steps in ((max(k // 2, 1), 4 * k) if method != "head" else ())]
        r = self.steps([argv] + evals, nice=NICE if (method, n) == ("scratch", None) else 0)
        ft, *ev = r.pop("metrics")
        by_steps = {str(k): ft["top1"], **{str(m["ode_steps"]): m["top1"] for m in ev}}
        return {**r, "top1": ft["top1"], "top1_by_steps": by_steps, "train_top1": ft.get("train_top1"),
                "train_size": ft.get("train_size"), "steps": ft.get("step"), "curve": learning_curve(out),
                "num_params_flow": ft.get("num_params_flow"), "num_params_head": ft.get("num_params_head"),
                "resumed_from_step": ft.get("resumed_from_step")}


def learning_curve(out: str) -> List[List[float]]:
    """[step, test top-1] of the evaluations during finetuning (log.csv), the final one included."""
    with open(os.path.join(out, "log.csv")) as f:
        rows = [[int(float(r["step"])), float(r["test_top1"])] for r in csv.DictReader(f) if r.get("test_top1")]
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    return rows + [[int(m["step"]), float(m["top1"])]]


# -------------------------------------------------------------------------------------------------
# the results file and the runner


def protocol_id(scale: str) -> str:
    text = repr(SCALES[scale])  # dicts keep their written order: the same settings give the same text
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def read_results(path: str) -> List[Dict[str, Any]]:
    return harness.read_lines(path)


def run_plan(plan: Plan, results: str, jobs: int) -> int:
    pid = protocol_id(plan.scale)
    done = {}
    for row in read_results(results):
        if row.get("protocol") != pid:
            raise SystemExit(f"{results} holds cells of another protocol ({row.get('protocol')}, this one is {pid}): "
                             f"the settings changed; name another --results file")
        done[row["cell"]] = row
    pending = [c for c in plan.cells if c["key"] not in done]
    print(f"fashion_mnist ({plan.scale}): {len(done)} cells done, {len(pending)} to run; results -> {results}",
          flush=True)
    os.makedirs(plan.root, exist_ok=True)
    load_at_start = {}

    def submit(c):
        load_at_start[c["key"]] = os.getloadavg()[0]
        print(f"  start {c['key']}  ({time.strftime('%H:%M:%S')}, load {load_at_start[c['key']]:.1f})", flush=True)
        return pool.submit(c["run"])

    def finished(c, r):
        harness.append_line(results, {
            "cell": c["key"], "protocol": pid, "scale": plan.scale,
            **{k: c[k] for k in ("kind", "method", "labels_per_class", "seed") if k in c},
            **{k: (round(v, 3) if k.endswith(("_s", "_mib")) else v) for k, v in r.items()},
            "load_avg_start": round(load_at_start[c["key"]], 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True)
        top = f" top-1 {r['top1']:.4f}" if isinstance(r.get("top1"), float) else ""
        print(f"  done  {c['key']}:{top} {r['cpu_s']:.0f} CPU s, {r['wall_s']:.0f} s wall, "
              f"{r['peak_rss_mib']:.0f} MiB", flush=True)

    def failed(c, e):  # reported, and the cells after it skipped; the rest go on
        print(f"  FAILED {c['key']}: {e}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        lost = harness.run_tasks(pending, jobs, submit, finished, failed, done=done, key="key")
    if lost:
        print(f"fashion_mnist: {len(lost)} cells failed or were skipped after a failure: {sorted(lost)}", flush=True)
        return 1
    return 0


# -------------------------------------------------------------------------------------------------
# internal tasks (each run as a subprocess by a cell)


def task_subset(n_train: str, n_test: str, folder: str) -> Dict[str, Any]:
    """The first n_train / n_test images of the real files as IDX files in `folder` (--quick's data)."""
    import gzip

    from prg_fast.data import load_data

    os.makedirs(folder, exist_ok=True)
    for split, prefix, n in (("train", "train", int(n_train)), ("test", "t10k", int(n_test))):
        d = load_data("fashion-mnist", split, augment=None)
        images, labels = d.images[:n, 0].numpy(), d.labels[:n].numpy().astype("uint8")
        for name, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            header = magic.to_bytes(4, "big") + b"".join(int(x).to_bytes(4, "big") for x in arr.shape)
            with gzip.open(os.path.join(folder, f"{prefix}-{name}-ubyte.gz"), "wb") as f:
                f.write(header + arr.tobytes())
    return {"n_train": int(n_train), "n_test": int(n_test)}


def task_publish(pretrain_dir: str, file: str) -> Dict[str, Any]:
    from prg_fast.training.checkpoints import save_flow_weights

    flow = save_flow_weights(pretrain_dir, file)
    return {"file": os.path.relpath(file, ROOT), "bytes": os.path.getsize(file), "step": flow["step"],
            "params": sum(v.numel() for v in flow["ema"].values())}


def task_probe(features: str, labels: str, seed: str) -> Dict[str, Any]:
    """Linear probe and 20-NN on the frozen features of the labelled training images (N per class
    drawn as finetune --labels-per-class N --labels-seed SEED draws them). The probe's C: 5-fold CV
    (linear_probe), or with every image one held-out split of 5,000 (five folds would cost more)."""
    import numpy as np
    import torch

    from prg_fast.data import class_balanced_subset, validation_split
    from prg_fast.training.evaluate import knn_accuracy, linear_probe, load_features

    f = load_features(features)
    tx, ty, vx, vy = f["train_features"], f["train_labels"], f["test_features"], f["test_labels"]
    if labels != "all":
        idx = class_balanced_subset(torch.from_numpy(ty), int(labels), int(seed), 10).numpy()
        tx, ty = tx[idx], ty[idx]
        lin = linear_probe(tx, ty, vx, vy, seed=int(seed))
    else:
        fit, held = (i.numpy() for i in validation_split(torch.from_numpy(ty), 5000, int(seed), 10))
        scores = {c: linear_probe(tx[fit], ty[fit], tx[held], ty[held], C=c)["top1"] for c in (0.01, 0.1, 1.0)}
        lin = linear_probe(tx, ty, vx, vy, C=max(scores, key=scores.get))
    knn = knn_accuracy(tx, ty, vx, vy, k=20)
    return {"linear_top1": lin["top1"], "linear_C": lin["C"], "knn_top1": knn["top1"], "train_size": int(len(ty)),
            "top1": lin["top1"], "dim": int(np.prod(tx.shape[1:]))}


def task_figure_flow(flow_file: str, png: str, spec: str) -> Dict[str, Any]:
    """Samples of the pretrained flow and test images along their reversed trajectory."""
    import torch

    import prg_fast
    from prg_fast.data import load_data
    from prg_fast.training.checkpoints import build_model, load_model_checkpoint

    plt = harness.pyplot()
    if plt is None:
        raise RuntimeError("the flow figure needs matplotlib")
    torch.manual_seed(0)
    flow = build_model(load_model_checkpoint(flow_file, ("flow",))[1]).eval()
    test = load_data(spec, "test", augment=None)
    with torch.no_grad():
        samples = prg_fast.generate(flow, torch.randn(40, 1, 28, 28), steps=20, method="rk4")
        picks = [int(torch.nonzero(test.labels == c)[0]) for c in range(0, 10, 2)]
        x, _ = test.batch(picks, augment=False)
        path = prg_fast.reverse(flow, x, save_at=[0.25, 0.5, 1.0], steps=20, method="euler")
    fig, axes = plt.subplots(5, 12, figsize=(12, 5.4))
    for ax in axes.flat:
        ax.axis("off")
    for i in range(40):
        r, c = divmod(i, 8)
        axes[r, c].imshow(samples[i, 0].clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
    for row, img in enumerate(picks[:5]):
        states = [x[row, 0]] + [path[j, row, 0] for j in range(3)]
        for j, s in enumerate(states):
            ax = axes[row, 8 + j]
            ax.imshow(s, cmap="gray", vmin=-1 if j == 0 else float(s.min()), vmax=1 if j == 0 else float(s.max()))
            if row == 0:
                ax.set_title(f"t = {[0, 0.25, 0.5, 1][j]:g}", fontsize=9)
    fig.suptitle("left: samples of the pretrained flow (20 rk4 steps from noise); right: test images along their "
                 "reversed trajectory (20 euler steps; panels at t > 0 contrast-stretched)", fontsize=10)
    harness.save_figure(fig, png, dpi=110)
    return {"figure": os.path.relpath(png, ROOT) if png.startswith(ROOT) else png}


PRESET_CANDIDATES = {  # what the mnist28 preset was chosen against (same widths, no patches; the digits preset)
    "mnist28": dict(preset="mnist28"),
    "mnist28 without patches (28x28 UNet)": dict(preset="mnist28", patch_size=1),
    "tiny at 28x28": dict(preset="tiny"),
}


def task_preset(name: str) -> Dict[str, Any]:
    """Parameters and one-thread images per CPU second of a candidate network on 28x28 grey images,
    forward without gradients (batch 256) and forward + backward (batch 128), best of 5 timings."""
    import torch

    from prg_fast.models import UNet

    torch.set_num_threads(1)
    kw = dict(PRESET_CANDIDATES[name])
    model = UNet.preset(kw.pop("preset"), in_channels=1, image_size=28, **kw)
    out = {"name": name, "params": sum(p.numel() for p in model.parameters())}
    steps = {"forward": (256, torch.no_grad()(lambda t, x: model(t, x))),
             "forward_backward": (128, lambda t, x: model(t, x).square().mean().backward())}
    for what, (batch, step) in steps.items():
        x, t = torch.randn(batch, 1, 28, 28), torch.rand(batch)
        times = timeit.repeat(lambda: step(t, x), timer=time.process_time, repeat=6, number=1)[1:]  # 1st: warm-up
        out[f"{what}_images_per_cpu_s"] = round(batch / min(times), 1)
    return out


def measure_presets() -> None:
    print("| network (28x28 grey, one thread) | parameters | forward, images / CPU s | forward + backward, "
          "images / CPU s | peak memory MiB |\n|---|---|---|---|---|")
    base = run_command([sys.executable, "-c", "import torch, prg_fast.models, json; print(json.dumps({}))"],
                       os.devnull)
    print(f"| (python with torch and prg_fast imported, no network) | -- | -- | -- | {base['peak_rss_mib']:.0f} |")
    for name in PRESET_CANDIDATES:
        r = run_command(internal_cmd("preset", name), os.devnull)
        m = r["metrics"]
        print(f"| {name} | {m['params'] / 1e6:.3f}M | {m['forward_images_per_cpu_s']:.0f} | "
              f"{m['forward_backward_images_per_cpu_s']:.0f} | {r['peak_rss_mib']:.0f} |", flush=True)
    print(f"(host load average {os.getloadavg()[0]:.1f}; CPU seconds, so the share of the cores the process got "
          f"does not enter, but a loaded host's caches do)")


TASKS = {"preset": task_preset, "subset": task_subset, "publish": task_publish, "probe": task_probe, "figure-flow": task_figure_flow}


# -------------------------------------------------------------------------------------------------
# the report: Markdown tables and the accuracy figure from the results file


METHODS = (("prg", "PRG finetuned"), ("scratch", "from scratch"), ("head", "head only (frozen flow)"),
           ("linear", "linear probe (frozen, t = 1)"), ("knn", "20-NN (frozen, t = 1)"))


def _fmt(values: List[float], scale: float = 100.0) -> str:
    """Mean ± sd over the seeds (n when not 3); -- for none."""
    if not values:
        return "--"
    (mean, sd), n = harness.mean_sd(values), len(values)
    return f"{mean * scale:.1f}" + ("" if sd != sd else f" ± {sd * scale:.1f}") + (f" (n={n})" if n != 3 else "")


def top1(row: Dict[str, Any]) -> float:
    """A finetuning cell's test top-1 at its training step count, unrounded (from top1_by_steps)."""
    by_steps = row.get("top1_by_steps") or {}
    return by_steps.get(str(SCALES[row["scale"]]["ode_steps"]), row["top1"])


def collect(rows: List[Dict[str, Any]]) -> Dict[tuple, List[float]]:
    """(method, labels) -> test top-1 per seed; linear / knn from the probe cells."""
    out: Dict[tuple, List[float]] = {}
    for r in rows:
        n = labels_name(r.get("labels_per_class"))
        if r.get("kind") == "finetune":
            out.setdefault((r["method"], n), []).append(top1(r))
        elif r.get("kind") == "probe":
            out.setdefault(("linear", n), []).append(r["linear_top1"])
            out.setdefault(("knn", n), []).append(r["knn_top1"])
    return out


def markdown(rows: List[Dict[str, Any]], scale: str) -> str:
    p, acc, cols = SCALES[scale], collect(rows), [labels_name(n) for n in LABELS]
    k, ft = p["ode_steps"], [r for r in rows if r.get("kind") == "finetune"]
    top = [dict(row=name, **{c: _fmt(acc.get((key, c), [])) for c in cols}) for key, name in METHODS]
    by_seed = {(r["method"], r.get("labels_per_class"), r["seed"]): top1(r) for r in ft}
    top.append(dict(row="PRG - scratch (paired by seed)", **{labels_name(n): _fmt(
        [by_seed["prg", n, s] - by_seed["scratch", n, s] for s in p["seeds"]
         if ("prg", n, s) in by_seed and ("scratch", n, s) in by_seed]) for n in LABELS}))
    steps = [max(k // 2, 1), k, 4 * k]
    sweep = [dict(row=name, n=labels_name(n), cells=cells) for key, name in METHODS[:2] for n in LABELS  # head: K only
             if (cells := [r for r in ft if r["method"] == key and r.get("labels_per_class") == n])]
    cost = []
    for r_kind, key, name in [("pretrain", None, "pretraining (shared)"), ("features", None, "feature extraction (shared)")] + \
            [("finetune", k_, n_) for k_, n_ in METHODS[:3]] + [("probe", "probe", "linear probe + 20-NN")]:
        for n in (LABELS if r_kind in ("finetune", "probe") else (None,)):
            cells = [r for r in rows if r.get("kind") == r_kind and (key is None or r.get("method") == key)
                     and (r_kind not in ("finetune", "probe") or r.get("labels_per_class") == n)]
            if cells:
                # a cell resumed after an interruption recorded only the commands after the resume
                whole = [r for r in cells if not r.get("resumed_from_step")]
                cpu = f"{sum(r['cpu_s'] for r in whole) / len(whole):.0f}" if whole else "--"
                wall = sum(r["wall_s"] for r in whole or cells) / len(whole or cells) / 60
                loads = [r["load_avg_start"] for r in cells] + [r["load_avg_end"] for r in cells]
                cost.append(dict(row=name, n=labels_name(n) if r_kind in ("finetune", "probe") else "--",
                                 cpu=cpu + (f" (n={len(whole)})" if whole and len(whole) < len(cells) else ""),
                                 wall=f"{wall:.1f}{'' if whole else ' (resumed)'}",
                                 peak=f"{max(r['peak_rss_mib'] for r in cells):.0f}",
                                 load=f"{min(loads):.1f}-{max(loads):.1f}"))
    resumed = [r["cell"] for r in rows if r.get("resumed_from_step")]
    return "\n".join([
        harness.table(top, [("labels per class", "row")] + [(c, c) for c in cols]), "",
        f"Step count at evaluation (trained with K = {k} {p['method']} steps; test top-1 %):", "",
        harness.table(sweep, [("row", "row"), ("labels per class", "n")] + [
            (f"{s} steps", lambda x, s=s: _fmt([r["top1_by_steps"][str(s)] for r in x["cells"]]))
            for s in steps]),
        "", "Cost per row (per seed: CPU seconds of its commands, user + system, and wall minutes on the shared "
        "machine; peak resident memory of its largest command):", "",
        harness.table(cost, [("row", "row"), ("labels per class", "n"), ("CPU s per seed", "cpu"),
                             ("wall min per seed", "wall"), ("peak MiB", "peak"), ("host load (1-min avg)", "load")]),
        "", f"All {len(rows)} cells: {sum(r['cpu_s'] for r in rows) / 3600:.2f} CPU hours, "
        f"{sum(r['wall_s'] for r in rows) / 3600:.2f} hours of command wall time (summed over the cells, several of "
        "which ran at a time)" + (f"; a lower bound: {len(resumed)} cells ({', '.join(resumed)}) resumed after an "
                                  "interruption, and their CPU time before it was not recorded (the per-seed figures "
                                  "above leave them out)." if resumed else ".")])


def figure_accuracy(rows: List[Dict[str, Any]], png: str) -> None:
    """Test top-1 vs labels per class (mean +- sd over seeds) and the all-label learning curves."""
    plt = harness.pyplot()
    if plt is None:
        return
    acc = collect(rows)
    xs = {"10": 10, "100": 100, "all": 6000}
    curves = [r for r in rows if r.get("kind") == "finetune" and r.get("labels_per_class") is None and r.get("curve")]
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(10.5 if curves else 5.6, 3.9), squeeze=False)
    ax = axes[0, 0]
    for key, name in METHODS[:3]:
        pts = [(xs[n], *harness.mean_sd(acc[key, n])) for n in xs if acc.get((key, n))]
        if pts:
            x, mean, sd = zip(*pts)
            ax.errorbar(x, [100 * m for m in mean], yerr=[0 if s != s else 100 * s for s in sd], marker="o",
                        capsize=3, label=name)
    ax.set(xscale="log", xticks=list(xs.values()), xticklabels=["10", "100", "all (6,000)"],
           xlabel="labelled training images per class", ylabel="test top-1 (%), 10,000 images")
    ax.set_title("Fashion-MNIST, mnist28 flow, mean ± sd over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if curves:
        ax = axes[0, 1]
        colors = {"prg": "C0", "scratch": "C1", "head": "C2"}
        for r in sorted(curves, key=lambda r: (r["method"], r["seed"])):
            steps, top = zip(*r["curve"])
            ax.plot(steps, [t * 100 for t in top], marker=".", color=colors[r["method"]], alpha=0.8,
                    label=dict(METHODS)[r["method"]] if r["seed"] == 0 else None)
        ax.axhline(91.6, color="gray", ls="--", lw=1)
        ax.text(min(r["curve"][0][0] for r in curves), 91.0, "goal 91.6%", fontsize=8, color="gray")
        ax.set(xlabel="finetuning step (batch 128; 470 steps = 1 epoch)", ylabel="test top-1 (%)")
        ax.set_title("all labels: learning curves, every seed", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    harness.save_figure(fig, png, dpi=120)


# -------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every row at small scale (minutes)")
    ap.add_argument("--jobs", type=int, default=2, help="cells run at a time (each one torch thread)")
    ap.add_argument("--results", default=None, help="JSON-lines results file (default benchmarks/results/"
                                                    "fashion_mnist[_quick].jsonl)")
    ap.add_argument("--out", default=None, help="run folder (default runs/benchmarks/fashion_mnist[_quick])")
    ap.add_argument("--report", action="store_true", help="only print the tables and redraw the accuracy figure")
    ap.add_argument("--presets", action="store_true", help="only measure the mnist28 preset against the candidates")
    ap.add_argument("--internal", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.internal:
        print(json.dumps(TASKS[a.internal[0]](*a.internal[1:])), flush=True)
        return 0
    if a.presets:
        measure_presets()
        return 0
    scale = "quick" if a.quick else "full"
    suffix = "_quick" if a.quick else ""
    results = a.results or os.path.join(HERE, "results", f"fashion_mnist{suffix}.jsonl")
    out = a.out or os.path.join(ROOT, "runs", "benchmarks", f"fashion_mnist{suffix}")
    plan = Plan(scale, os.path.abspath(out), a.jobs)
    rc = 0 if a.report else run_plan(plan, results, a.jobs)
    rows = [r for r in read_results(results) if r.get("protocol") == protocol_id(scale)]
    if any(r.get("kind") == "finetune" for r in rows):
        figure_accuracy(rows, plan.figure("fashion_mnist_accuracy.png"))
    print(markdown(rows, scale), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
