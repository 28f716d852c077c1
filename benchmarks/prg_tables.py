"""The PRG paper's tables at our scale (arXiv 2412.01787), the label-scarce table (issue 13) and two
ablations on the same machinery: learned t (issue 11) and the prediction target (issue 23). What
each row is and every recorded setting: benchmarks/RESULTS.md ("PRG on digits", "Label-scarce PRG
on digits", "Learning where to read", "PRG on digits with a diffusion-parametrised network").

    python benchmarks/prg_tables.py                         # digits, tiny UNet, CPU (~30-40 min on 2 cores)
    python benchmarks/prg_tables.py --quick                 # reduced smoke version (a few minutes)
    python benchmarks/prg_tables.py --table scarce          # N labelled images per class (~45 min), a PNG
    python benchmarks/prg_tables.py --table learn-t         # fixed t (1.0, 0.5) vs t learned from 0.5
    python benchmarks/prg_tables.py --table prediction      # GVP pretrained to predict velocity / epsilon / v

Every run is a prg_fast run directory under --out (pretrain-*, ft-*, ...), so an interrupted
invocation resumes where it stopped and a finished run is reused (delete --out to start over). The
runs are spread over --jobs worker processes (one torch thread each on the CPU: on a small shared
machine two one-thread processes beat one two-thread process by far, since OpenMP threads of tiny
networks mostly wait for each other). Every job's numbers go to OUT/prg_tables.jsonl as it finishes
(harness.Results), the tables to OUT/table.md.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Dict, List, Optional

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_ROOT = harness.OUT_ROOT


# -------------------------------------------------------------------------------------------------
# the jobs (run in worker processes)


FIELDS = {"pretrain": ("loss", "loss_start", "step", "train_time_total_s"),
          "finetune": ("top1", "train_top1", "loss", "ce", "fm", "t_final", "step", "train_time_total_s")}


def job_train(spec: Dict[str, Any], kind: str) -> Dict[str, Any]:
    """A run of prg_fast.training.pretrain / .finetune (`kind`): the numbers the tables read."""
    m = getattr(importlib.import_module(f"prg_fast.training.{kind}"), kind)(**spec).metrics
    return {k: m[k] for k in FIELDS[kind]}


def job_evaluate(spec: Dict[str, Any]) -> Dict[str, Any]:
    from prg_fast.training.evaluate import evaluate

    return {"top1_by_steps": {str(steps): evaluate(
        spec["checkpoint"], spec["data"], ode_steps=steps, method=spec["method"], device=spec["device"],
        out=os.path.join(spec["checkpoint"], f"evaluate-{spec['method']}-{steps}"))["top1"] for steps in spec["eval_steps"]}}


def job_features(spec: Dict[str, Any], probe: bool = False) -> Dict[str, Any]:
    """The frozen reversed features at t = 1 written to spec["out"]; with `probe` the linear probe
    and k-NN top-1 on them."""
    from prg_fast.training.evaluate import extract

    meta = extract(spec["checkpoint"], spec["data"], spec["out"], t=1.0, ode_steps=spec["ode_steps"],
                   method=spec["method"], device=spec["device"], probe=probe)
    return {k: meta[k] for k in (("linear_probe_top1", "knn_top1") if probe else ("feature_shape",))}


def pixels(data: str) -> list:
    """[train images, train labels, test images, test labels] as numpy, the images flattened."""
    from prg_fast.data import load_data

    out = []
    for split in ("train", "test"):
        d = load_data(data, split, augment=None)
        out += [d.to_float(d.images).flatten(1).numpy(), d.labels.numpy()]
    return out


def job_probe_pixels(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The same probes on the raw images (the state at t = 0, no flow at all): the baseline that
    frozen trajectory features are compared with."""
    from prg_fast.training.evaluate import knn_accuracy, linear_probe

    xy = pixels(spec["data"])
    return {"linear_probe_top1": linear_probe(*xy)["top1"], "knn_top1": knn_accuracy(*xy)["top1"]}


JOBS = {"probe_pixels": job_probe_pixels, "pretrain": functools.partial(job_train, kind="pretrain"),
        "finetune": functools.partial(job_train, kind="finetune"), "evaluate": job_evaluate,
        "probe": functools.partial(job_features, probe=True), "features": job_features}


def finished_result(kind: str, spec: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The result of a pretraining or finetuning job whose run directory already holds a finished
    run with these very arguments (its metrics.json), without starting a process; else None."""
    if kind not in FIELDS:
        return None
    file = os.path.join(spec["out"], "metrics.json")
    try:
        with open(file) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    ignore = {"progress", "device", "out"}  # how a run was shown or where it ran does not change what it is
    same = all(m.get(k) == (os.path.abspath(v) if k == "checkpoint" and v else v)
               for k, v in spec.items() if k not in ignore)
    if not same or m.get("step") != spec["steps"]:
        return None
    return {**{k: m[k] for k in FIELDS[kind]}, "wall_time_s": 0.0, "reused": True}


def _run_job(kind: str, spec: Dict[str, Any], threads: int) -> Dict[str, Any]:
    """In a worker process: the job's numbers and its wall time."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    return {**JOBS[kind](spec), "wall_time_s": time.perf_counter() - t}


# -------------------------------------------------------------------------------------------------
# the plan


class Plan(list):
    """Jobs with names and dependencies: [{"name", "kind", "spec", "after": [names]}]. A pretraining
    or finetuning job runs in OUT/NAME unless its spec names its folder."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def add(self, name: str, kind: str, spec: Dict[str, Any], after=()) -> None:
        if kind in ("pretrain", "finetune"):
            spec = {"out": os.path.join(self.out, name), **spec}
        self.append({"name": name, "kind": kind, "spec": spec, "after": list(after)})


def pretrain_spec(a: argparse.Namespace, path: str, **kw) -> Dict[str, Any]:
    """The tables' pretraining run on `path`."""
    return dict(dict(data=a.data, path=path, model=a.preset, steps=a.pretrain_steps, batch_size=a.pretrain_batch_size,
                     lr=a.pretrain_lr, warmup=a.pretrain_warmup, device=a.device, seed=a.seed, progress=False,
                     num_samples=16, log_every=max(1, a.pretrain_steps // 20), ckpt_every=max(1, a.pretrain_steps // 4)),
                **kw)


def finetune_spec(a: argparse.Namespace, **kw) -> Dict[str, Any]:
    """Table 1's finetuning run (every table's but the learned-t ablation's), `kw` on top."""
    return dict(dict(data=a.data, batch_size=a.batch_size, ode_steps=a.ode_steps, method=a.method, lr=a.lr,
                     weight_decay=0.05, label_smoothing=0.1, steps=a.finetune_steps, device=a.device, seed=a.seed,
                     progress=False, log_every=max(1, a.finetune_steps // 20),
                     ckpt_every=max(1, a.finetune_steps // 4)), **kw)


def build_plan(a: argparse.Namespace) -> Plan:
    plan = Plan(a.out)
    if a.probes:
        plan.add("probe-pixels", "probe_pixels", dict(data=a.data))
    # from scratch needs no pretraining: it starts at once (from the preset's architecture)
    for seed in a.seeds:
        plan.add("scratch" if seed == a.seed else f"scratch-seed{seed}", "finetune", finetune_spec(
            a, from_scratch=True, model=a.preset, beta=a.beta, path=SEGMENT_PATH, seed=seed))
    for path in a.paths:
        pre, after = os.path.join(a.out, f"pretrain-{path}"), [f"pretrain-{path}"]
        plan.add(f"pretrain-{path}", "pretrain", pretrain_spec(a, path))
        plan.add(f"ft-{path}", "finetune", finetune_spec(a, checkpoint=pre, beta=a.beta), after)
        plan.add(f"head-{path}", "finetune", finetune_spec(a, checkpoint=pre, freeze_flow=True, beta=0.0), after)
        if a.probes:
            plan.add(f"probe-{path}", "probe", dict(checkpoint=pre, data=a.data, out=os.path.join(
                a.out, f"features-{path}.npz"), ode_steps=a.ode_steps, method=a.method, device=a.device), after)
        plan.add(f"eval-{path}", "evaluate", dict(checkpoint=os.path.join(a.out, f"ft-{path}"), data=a.data,
                                                  eval_steps=a.eval_steps, method=a.method, device=a.device),
                 [f"ft-{path}"])
        if path == SEGMENT_PATH:
            for seed in a.seeds:  # the PRG vs. from-scratch comparison, repeated over finetuning seeds
                if seed != a.seed:
                    plan.add(f"ft-{path}-seed{seed}", "finetune", finetune_spec(a, checkpoint=pre, beta=a.beta,
                                                                                seed=seed), after)
            for t0 in T0S:
                if t0 != 0.0:  # t0 = 0, the full trajectory, is ft-{path} itself
                    plan.add(f"ft-{path}-t0={t0:g}", "finetune", finetune_spec(
                        a, checkpoint=pre, out=os.path.join(a.out, f"ft-{path}-t0_{t0:g}"), beta=a.beta, t0=t0), after)
    return plan


# -------------------------------------------------------------------------------------------------
# two ablations: --table learn-t, --table prediction

LEARN_T_ROWS = {"fixed t = 1.0 (PRG)": dict(t=1.0), "fixed t = 0.5": dict(t=0.5),
                "learned t (from 0.5)": dict(t=0.5, learn_t=True)}
PREDICTIONS = ("velocity", "epsilon", "v")


def learn_t_job(row: str, seed: int) -> str:
    return f"ft-{row.split()[0]}-t{LEARN_T_ROWS[row]['t']:g}-s{seed}"


def build_learn_t_plan(a: argparse.Namespace) -> Plan:
    """One OTCFM pretraining run, then a finetuning run per row and seed."""
    plan, pre = Plan(a.out), os.path.join(a.out, "pretrain-otcfm")
    plan.add("pretrain-otcfm", "pretrain", dict(data=a.data, path="otcfm", model=a.preset, steps=a.pretrain_steps,
                                                batch_size=128, progress=False, seed=a.seed))
    for row, extra in LEARN_T_ROWS.items():
        for seed in a.seeds:
            plan.add(learn_t_job(row, seed), "finetune", dict(
                data=a.data, checkpoint=pre, steps=a.finetune_steps, batch_size=a.batch_size, ode_steps=a.ode_steps,
                method=a.method, t_lr=a.t_lr, seed=seed, progress=False, device=a.device, **extra),
                ["pretrain-otcfm"])
    return plan


def learn_t_table(a: argparse.Namespace, r: Dict[str, Dict[str, Any]], wall: float) -> str:
    runs = {row: [r[learn_t_job(row, s)] for s in a.seeds] for row in LEARN_T_ROWS}
    rows = [dict(row=row, runs=x, top1=[100 * run["top1"] for run in x]) for row, x in runs.items()]
    return harness.table(rows, [
        ("finetuning", "row"),
        ("top-1 % (mean +- sd)", lambda x: "{:.1f} +- {:.1f}".format(*harness.mean_sd(x["top1"]))),
        ("per seed", lambda x: ", ".join(f"{v:.1f}" for v in x["top1"])),
        ("t where features are read", lambda x: ", ".join(f"{run['t_final']:.3f}" for run in x["runs"]))]) + \
        f"\n\n{len(a.seeds) * len(LEARN_T_ROWS)} finetuning runs + 1 pretraining, wall time {wall / 60:.1f} min\n"


def build_prediction_plan(a: argparse.Namespace) -> Plan:
    """Per prediction target: a GVP pretraining run, then Table 1's PRG finetuning of it."""
    plan = Plan(a.out)
    for prediction in PREDICTIONS:
        pre = f"pretrain-gvp-{prediction}"
        plan.add(pre, "pretrain", pretrain_spec(a, "gvp", prediction=prediction,
                                                warmup=min(a.pretrain_warmup, a.pretrain_steps // 2)))
        plan.add(f"ft-gvp-{prediction}", "finetune", finetune_spec(a, checkpoint=os.path.join(a.out, pre), beta=a.beta),
                 [pre])
    return plan


def prediction_table(a: argparse.Namespace, r: Dict[str, Dict[str, Any]], wall: float) -> str:
    return harness.table([dict(p=p, pre=r[f"pretrain-gvp-{p}"], ft=r[f"ft-gvp-{p}"]) for p in PREDICTIONS], [
        ("pretrained to predict", "p"), ("PRG finetuned top-1 (%)", lambda x: 100 * x["ft"]["top1"], ".2f"),
        ("pretrain loss (own target; not comparable across rows)", lambda x: x["pre"]["loss"], ".4f"),
        ("wall, pretrain + finetune (min)",
         lambda x: (x["pre"]["train_time_total_s"] + x["ft"]["train_time_total_s"]) / 60, ".1f")]) + \
        f"\n\npretraining {a.pretrain_steps} steps, finetuning {a.finetune_steps} steps; wall time {wall / 60:.1f} min\n"


# -------------------------------------------------------------------------------------------------
# the label-scarce table (--table scarce): N labelled images per class, the rest unlabelled


def level_name(n: Optional[int]) -> str:
    return "all" if n is None else str(n)


def job_probe_scarce(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Linear probes (scikit-learn LogisticRegression, prg_fast.training.evaluate.linear_probe) on N labelled
    training images per class, for every level and seed, on raw pixels (spec["features"] None)
    or on a feature file written by `extract`. The test split is always whole."""
    import numpy as np
    import torch

    from prg_fast.data import class_balanced_subset
    from prg_fast.training.evaluate import linear_probe, load_features

    if spec["features"] is None:
        tx, ty, vx, vy = pixels(spec["data"])
    else:
        f = load_features(spec["features"])
        tx, ty = np.asarray(f["train_features"]).reshape(len(f["train_labels"]), -1), np.asarray(f["train_labels"])
        vx, vy = np.asarray(f["test_features"]).reshape(len(f["test_labels"]), -1), np.asarray(f["test_labels"])
    out: Dict[str, Any] = {}
    for n in spec["levels"]:
        for seed in spec["seeds"]:
            idx = np.arange(len(ty)) if n is None else class_balanced_subset(torch.as_tensor(ty), n, seed).numpy()
            out[f"{level_name(n)}/{seed}"] = linear_probe(tx[idx], ty[idx], vx, vy, seed=seed)["top1"]
    return {"top1": out}


JOBS["probe_scarce"] = job_probe_scarce


def build_scarce_plan(a: argparse.Namespace, num_classes: int) -> Plan:
    """The label-scarce jobs: pretraining on every training image (no labels) per path, then per
    level N and seed s (the seed picks the labelled subset and the finetuning randomness, so every
    row at (N, s) sees the same labelled images): PRG finetuned per path, from scratch, head only
    per path, linear probes on raw pixels and on frozen reversed features (t = 1) per path."""
    plan = Plan(a.out)

    def ft(n, seed, **kw):
        # the batch: the whole labelled subset when smaller (N = 1 on 10 classes: 10 images)
        return finetune_spec(a, batch_size=a.batch_size if n is None else min(a.batch_size, n * num_classes),
                             seed=seed, labels_per_class=n, labels_seed=None if n is None else seed,
                             log_every=max(1, a.finetune_steps // 10), ckpt_every=max(1, a.finetune_steps // 2), **kw)

    if a.probes:
        plan.add("probe-pixels", "probe_scarce", dict(data=a.data, features=None, levels=a.levels, seeds=a.seeds))
    for path in a.paths:
        plan.add(f"pretrain-{path}", "pretrain", pretrain_spec(a, path))
        if a.probes:
            feats = os.path.join(a.out, f"features-{path}.npz")
            plan.add(f"features-{path}", "features", dict(checkpoint=os.path.join(a.out, f"pretrain-{path}"),
                                                          data=a.data, out=feats, ode_steps=a.ode_steps,
                                                          method=a.method, device=a.device), [f"pretrain-{path}"])
            plan.add(f"probe-{path}", "probe_scarce", dict(data=a.data, features=feats, levels=a.levels, seeds=a.seeds),
                     [f"features-{path}"])
    for n in a.levels:
        for seed in a.seeds:
            tag = f"n{level_name(n)}-s{seed}"
            for path in a.paths:
                pre, after = os.path.join(a.out, f"pretrain-{path}"), [f"pretrain-{path}"]
                plan.add(f"ft-{path}-{tag}", "finetune", ft(n, seed, checkpoint=pre, beta=a.beta), after)
                plan.add(f"head-{path}-{tag}", "finetune", ft(n, seed, checkpoint=pre, freeze_flow=True, beta=0.0),
                         after)
            plan.add(f"scratch-{tag}", "finetune", ft(n, seed, from_scratch=True, model=a.preset, beta=a.beta,
                                                      path=a.paths[0]))
    return plan


def paired_difference(a_vals: List[float], b_vals: List[float]):
    """Mean of the paired differences a - b (same seed = same labelled subset), its standard error
    (sd of the differences / sqrt(n)), and whether |mean| > 2 standard errors."""
    d = [x - y for x, y in zip(a_vals, b_vals)]
    m, sd = harness.mean_sd(d)
    se = sd / math.sqrt(len(d))  # NaN for one seed: then never resolved
    return m, se, bool(abs(m) > 2 * se)


def scarce_rows(a: argparse.Namespace, r: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per table row: label, per level the top-1 of every seed (in --seeds order)."""
    rows = []

    def runs(prefix):
        return {level_name(n): [r[f"{prefix}-n{level_name(n)}-s{s}"]["top1"] for s in a.seeds] for n in a.levels}

    for p in a.paths:
        rows.append({"key": f"ft-{p}", "label": f"PRG finetuned ({NAMES[p]} pretraining)", "values": runs(f"ft-{p}")})
    rows.append({"key": "scratch", "label": "from scratch (same network)", "values": runs("scratch")})
    for p in a.paths:
        rows.append({"key": f"head-{p}", "label": f"head only ({NAMES[p]}, flow frozen)",
                     "values": runs(f"head-{p}")})
    if a.probes:
        for key, label in [("probe-pixels", "linear probe, raw pixels")] + [
                (f"probe-{p}", f"linear probe, frozen x_1 ({NAMES[p]})") for p in a.paths]:
            got = r[key]["top1"]
            rows.append({"key": key, "label": label,
                         "values": {level_name(n): [got[f"{level_name(n)}/{s}"] for s in a.seeds] for n in a.levels}})
    return rows


def scarce_tables(a: argparse.Namespace, r: Dict[str, Dict[str, Any]], wall: float, n_train: int,
                  n_test: int) -> str:
    rows = scarce_rows(a, r)
    scratch = next(row for row in rows if row["key"] == "scratch")
    L = [f"Data `{a.data}` ({n_train} training images, all used unlabelled for pretraining; test split "
         f"{n_test} images, always whole), UNet preset `{a.preset}`; pretraining {a.pretrain_steps} steps (batch "
         f"{a.pretrain_batch_size}); finetuning {a.finetune_steps} steps (batch min({a.batch_size}, labelled "
         f"images)), {a.ode_steps} `{a.method}` steps, beta = {a.beta:g}; seeds {a.seeds} (seed s picks the "
         "labelled subset and the finetuning randomness; every row at (N, s) sees the same labelled images)."]

    def cell(row, k):
        m, sd = harness.mean_sd(row["values"][k])
        text = f"{100 * m:.1f}" + (f" +- {100 * sd:.1f}" if sd == sd else "")
        if row is scratch:
            return text
        d, se, ok = paired_difference(row["values"][k], scratch["values"][k])
        return text + f" ({100 * d:+.1f}{'*' if ok and len(a.seeds) > 1 else ''})"

    L += ["", "**Label-scarce top-1 %** (mean +- sd over seeds; in brackets: paired difference to from scratch, "
          "`*` = resolved at two standard errors of the paired difference)", "",
          harness.table(rows, [("labels per class", "label")] + [
              (level_name(n), lambda row, k=level_name(n): cell(row, k)) for n in a.levels]), ""]
    times = [v.get("train_time_total_s", v["wall_time_s"]) for v in r.values()]
    L.append(f"Wall time: {wall / 60:.1f} min in total with {a.jobs} worker process(es) x {a.threads} thread(s) "
             f"({len(r)} jobs, {sum(times) / 60:.1f} worker-min).")
    return "\n".join(L) + "\n"


def scarce_figure(a: argparse.Namespace, r: Dict[str, Dict[str, Any]], n_train: int, num_classes: int, file: str) -> None:
    """Top-1 against labels per class (log axis; 'all' at the mean class size), mean +- sd."""
    plt = harness.pyplot()
    if plt is None:
        return
    xs = [n if n is not None else n_train / num_classes for n in a.levels]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in scarce_rows(a, r):
        stats = [harness.mean_sd(row["values"][level_name(n)]) for n in a.levels]
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * (sd if sd == sd else 0) for _, sd in stats],
                    marker="o", capsize=3, label=row["label"], linestyle="--" if "probe" in row["key"] or
                    "head" in row["key"] else "-")
    ax.set(xscale="log", xticks=xs, xticklabels=[level_name(n) for n in a.levels],
           xlabel="labelled training images per class", ylabel="test top-1 (%)",
           title=f"{a.data}: label-scarce finetuning ({len(a.seeds)} seeds, mean +- sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    harness.save_figure(fig, file, dpi=120)


def run_plan(plan: Plan, jobs: int, threads: int, log: harness.Results) -> Dict[str, Dict[str, Any]]:
    import multiprocessing as mp

    results: Dict[str, Dict[str, Any]] = {}
    priority = {"pretrain": 0, "features": 1, "finetune": 2, "evaluate": 3, "probe": 4, "probe_pixels": 4,
                "probe_scarce": 4}

    def submit(j) -> Future:
        reused = finished_result(j["kind"], j["spec"])
        if reused is None:
            print(f"[prg_tables] start {j['name']}", flush=True)
            return pool.submit(_run_job, j["kind"], j["spec"], threads)
        done = Future()  # finished earlier with the same arguments: read back, not re-run
        done.set_result(reused)
        return done

    def finish(j, result):
        results[j["name"]] = result
        log.add({"job": j["name"]}, **result)
        if not result.get("reused"):
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
            print(f"[prg_tables] done  {j['name']}: {shown}", flush=True)

    # a fresh process per job: whatever a run leaves allocated (the adjoint currently keeps about one
    # network evaluation's activations per finetuning step alive, see RESULTS.md) goes with it; a
    # failed job stops the table with its error
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        harness.run_tasks(sorted(plan, key=lambda j: (priority[j["kind"]], plan.index(j))), jobs, submit, finish)
    return results


# -------------------------------------------------------------------------------------------------
# the tables


NAMES = {"gvp": "GVP", "icfm": "ICFM", "otcfm": "OTCFM"}


def tables(a: argparse.Namespace, r: Dict[str, Dict[str, Any]], wall: float) -> str:
    pct, sp, n_test = ".2f", SEGMENT_PATH, 360 if a.data == "digits" else None
    L = [f"Data `{a.data}`, UNet preset `{a.preset}`; pretraining {a.pretrain_steps} steps (batch "
         f"{a.pretrain_batch_size}); finetuning {a.finetune_steps} steps (batch {a.batch_size}), {a.ode_steps} "
         f"`{a.method}` steps from t0 to t = 1, beta = {a.beta:g}. Top-1 on the test split"
         + (f" ({n_test} images: one image = {100 / n_test:.2f} points)." if n_test else "."), "",
         "**Table 1: pretraining path vs. what is trained** (top-1 %)", ""]
    rows = [dict(label=NAMES[p], ft=r[f"ft-{p}"]["top1"], head=r[f"head-{p}"]["top1"], loss=r[f"pretrain-{p}"]["loss"],
                 **r.get(f"probe-{p}", {})) for p in a.paths]
    rows += [dict(label="none (from scratch, same architecture)", ft=r["scratch"]["top1"]),
             dict(label="none (raw pixels, t = 0: no flow)", **r.get("probe-pixels", {}))]
    L += [harness.table(rows, [("pretraining", "label"), ("PRG finetuned (head + flow)", lambda x: 100 * x["ft"], pct),
                               ("head only (flow frozen)", lambda x: 100 * x["head"], pct),
                               ("linear probe, frozen x_1", lambda x: 100 * x["linear_probe_top1"], pct),
                               ("20-NN, frozen x_1", lambda x: 100 * x["knn_top1"], pct),
                               ("pretrain loss", "loss", ".4f")]), ""]
    if len(a.seeds) > 1:
        runs = [dict(label=label, v=[100 * r[prefix if s == a.seed else f"{prefix}-seed{s}"]["top1"] for s in a.seeds])
                for label, prefix in ((f"PRG finetuned ({NAMES[sp]})", f"ft-{sp}"), ("from scratch", "scratch"))]
        L += [f"**Table 1b: PRG ({NAMES[sp]}) vs. from scratch over finetuning seeds** (head init, data order, "
              "noise; same pretrained checkpoint) (top-1 %)", "",
              harness.table(runs, [("run", "label")] + [(f"seed {s}", lambda x, i=i: x["v"][i], pct)
                                                        for i, s in enumerate(a.seeds)] + [
                  ("mean", lambda x: statistics.fmean(x["v"]), pct),
                  ("range", lambda x: f"{min(x['v']):.2f}-{max(x['v']):.2f}")]), ""]
    segment = {f"{t0:g}": 100 * r[f"ft-{sp}" if t0 == 0.0 else f"ft-{sp}-t0={t0:g}"]["top1"] for t0 in T0S}
    L += [f"**Table 2: trajectory segment** ({NAMES[sp]}; the image is the state at t0, reversed to t = 1; "
          f"{a.ode_steps} steps over the segment)", "",
          harness.table([dict(segment, label="top-1 %")], [("t0", "label")] + [(t, t, pct) for t in segment]), "",
          f"**Table 3: step invariance** (trained with {a.ode_steps} `{a.method}` steps, evaluated with others; "
          "`prg-fast evaluate --ode-steps K`)", "",
          harness.table([dict(label=NAMES[p], **r[f"eval-{p}"]["top1_by_steps"]) for p in a.paths],
                        [("pretraining", "label")] + [(f"{k} steps", lambda x, k=k: 100 * x[str(k)], pct)
                                                      for k in a.eval_steps]), ""]
    times = {k: v.get("train_time_total_s", v["wall_time_s"]) for k, v in r.items()}
    L.append(f"Wall time: {wall / 60:.1f} min in total with {a.jobs} worker process(es) x {a.threads} thread(s); "
             "per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".")
    return "\n".join(L) + "\n"


# paths, step counts, batch and solver steps per table (each flag overrides its entry)
ALL_PATHS = ["gvp", "icfm", "otcfm"]
SEGMENT_PATH, T0S = "otcfm", (0.0, 0.25, 0.5)  # the trajectory-segment table's path and start times
TABLE_DEFAULTS = {
    "main": dict(paths=ALL_PATHS, pretrain_steps=1500, finetune_steps=250, batch_size=64, ode_steps=4),
    "scarce": dict(paths=["otcfm", "gvp"], pretrain_steps=750, finetune_steps=80, batch_size=32, ode_steps=2),
    "learn-t": dict(paths=ALL_PATHS, pretrain_steps=750, finetune_steps=150, batch_size=64, ode_steps=4),
    "prediction": dict(paths=ALL_PATHS, pretrain_steps=1500, finetune_steps=250, batch_size=64, ode_steps=4),
}


def parse(argv=None) -> argparse.Namespace:
    """The arguments, with each table's defaults and the --quick sizes filled in."""
    p = harness.parser("prg_tables", __doc__)
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
    p.add_argument("--preset", default="tiny", help="UNet preset (tiny | cifar | prg32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--quick", action="store_true", help="reduced smoke version (few steps; numbers not meaningful)")
    p.add_argument("--table", choices=tuple(TABLE_DEFAULTS), default="main",
                   help="main: the paper's tables; scarce: the label-scarce table (1, 2, 5, 10, all labelled images "
                        "per class); learn-t, prediction: the two ablations (see the module doc)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="(default 1500; --table scarce, learn-t: 750)")
    p.add_argument("--pretrain-batch-size", type=int, default=64)
    p.add_argument("--pretrain-lr", type=float, default=5e-4)
    p.add_argument("--pretrain-warmup", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=None, help="(default 250; scarce: 80; learn-t: 150)")
    p.add_argument("--t-lr", type=float, default=0.05, help="--table learn-t: learning rate of the learned t")
    p.add_argument("--batch-size", type=int, default=None, help="finetuning batch (default 64; --table scarce: 32)")
    p.add_argument("--ode-steps", type=int, default=None, help="finetuning solver steps (default 4; --table scarce: 2)")
    p.add_argument("--method", default="euler")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="finetuning seeds of the PRG vs. from-scratch comparison "
                   "(the OTCFM run and the scratch run; the first is --seed's run)")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the sklearn linear-probe / k-NN columns (slow on 50,000 CIFAR-size feature vectors)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: 1 on the CPU, "
                   "unchanged on a GPU)")
    a = p.parse_args(argv)
    for name, value in TABLE_DEFAULTS[a.table].items():
        if getattr(a, name, None) is None:
            setattr(a, name, value)
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    if a.seed not in a.seeds:
        a.seeds = [a.seed] + a.seeds
    a.eval_steps, a.levels = [4, 20, 100], [1, 2, 5, 10, None]  # labelled images per class (None: all)
    if a.quick:  # a smoke test of the whole pipeline: the numbers mean little
        a.pretrain_steps, a.finetune_steps, a.pretrain_warmup, a.ode_steps = 40, 8, 5, 2
        a.eval_steps, a.levels, a.seeds = [1, 2, 10], [1, None], a.seeds[:2]
        if a.table == "scarce":
            a.finetune_steps, a.paths = 6, a.paths[:1]
        if a.table == "learn-t":
            a.seeds, a.pretrain_steps, a.finetune_steps = a.seeds[:1], 20, 4
        if a.table == "prediction":
            a.pretrain_steps, a.finetune_steps, a.ode_steps = 4, 2, 4
    if a.out == os.path.join(OUT_ROOT, "prg_tables"):  # each table its own default folder
        folder = {"scarce": "prg_scarce", "learn-t": "learn_t",
                  "prediction": "prediction_prg"}.get(a.table, "prg_tables")
        a.out = os.path.join(OUT_ROOT, folder + ("_quick" if a.quick else ""))
    # --table scarce's PNG (the recorded figure is copied into benchmarks/figures by hand)
    a.figure = None if a.quick else os.path.join(a.out, "label_scarce.png")
    if a.threads is None:
        a.threads = 1 if a.device == "cpu" else 0
    if a.table == "prediction":
        a.seeds = [a.seed]
    return a


def main(argv=None) -> int:
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    t = time.perf_counter()
    config = {k: getattr(a, k) for k in ("table", "data", "preset", "pretrain_steps", "finetune_steps", "batch_size",
                                         "ode_steps", "method", "lr", "beta", "seed", "seeds", "paths")}
    log = harness.Results(a, "prg_tables", config, key=("job",))
    if a.table == "scarce":
        from prg_fast.data import load_data

        train, test = load_data(a.data, "train", augment=None), load_data(a.data, "test", augment=None)
        results = run_plan(build_scarce_plan(a, train.num_classes), a.jobs, a.threads, log)
        md = scarce_tables(a, results, time.perf_counter() - t, len(train), len(test))
        if a.figure:
            scarce_figure(a, results, len(train), train.num_classes, a.figure)
            md += f"\nFigure: {os.path.relpath(a.figure, os.path.dirname(HERE))}\n"
    else:
        build, render = {"main": (build_plan, tables), "learn-t": (build_learn_t_plan, learn_t_table),
                         "prediction": (build_prediction_plan, prediction_table)}[a.table]
        results = run_plan(build(a), a.jobs, a.threads, log)
        md = render(a, results, time.perf_counter() - t)
    md += f"\nMachine: {harness.machine()}; {a.jobs} worker process(es) x {a.threads} thread(s).\n"
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"[prg_tables] wrote {log.path} and {a.out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
