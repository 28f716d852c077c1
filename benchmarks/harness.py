"""The one harness every benchmark script runs on (docs/benchmarks.md says how, with a new benchmark in
a few lines): time through torch.utils.benchmark in interleaved rounds, peak memory, the machine,
the resumable results file OUT/NAME.jsonl, the tables of benchmarks/RESULTS.md, and the job runner
of the scripts that train (prg_tables.py, fashion_mnist.py).

Beyond docs/benchmarks.md: a row faster than min_run_time is timed from its second round on with
Timer.timeit over a block of about min_run_time (warm-up: 1% of the block, at least 2 calls), so its
rounds stay about min_run_time long. On the CPU the peak is the growth of the high-water mark of a
fresh process's RSS, reset (/proc/self/clear_refs) before each row, glibc told to return freed
memory at once: everything allocated counts, not only saved tensors.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

# torch is imported where it is used: the GPU report's supervisor reads results files and renders
# tables with this module without paying torch's import
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_ROOT = os.path.join(ROOT, "runs", "benchmarks")  # git-ignored: nothing lands in the source tree
PEAK_FLAG = "--peak-worker"
MALLOC_ENV = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")


# -------------------------------------------------------------------------------------------------
# the machine


def machine(device=None) -> str:
    """One line: CPU model and cores, the GPU (when `device` is CUDA or any is visible), torch and
    Python versions, torch's thread count, the load average."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0) if cuda else "no GPU"
    return (f"{cpu} ({os.cpu_count()} cores), {gpu}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{torch.get_num_threads()} torch thread(s); load average {load_average() or 'unknown'}")


def load_average() -> Optional[str]:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return None


# -------------------------------------------------------------------------------------------------
# time


def clock(device, threads: int) -> Dict[str, Any]:
    """Timer keyword arguments: the thread's CPU time on a one-thread CPU, else the default clock."""
    return {"timer": time.thread_time} if device.type == "cpu" and threads == 1 else {}


def clock_name(device, threads: int) -> str:
    kind = "thread CPU time" if clock(device, threads) else "wall time" + (" (CUDA synchronised)" if
                                                                           device.type == "cuda" else "")
    return f"{kind}, {threads} torch thread(s), torch.utils.benchmark blocked_autorange"


def interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, *, anchor: Optional[str] = None, device=None,
                threads: Optional[int] = None, min_run_time: float = 0.0,
                before_round: Optional[Callable[[int], None]] = None) -> Dict[str, dict]:
    """{row: {"seconds": median per call, "ratio": median over rounds of row / anchor, "spread":
    interquartile range / median over rounds}}; each round runs blocked_autorange(min_run_time) on
    every row (device: the CPU unless given), the order rotated by one per round; before_round(r)
    may change the rows' inputs."""
    import torch
    import torch.utils.benchmark as tub

    device = device or torch.device("cpu")
    threads = threads or torch.get_num_threads()
    timers = {name: tub.Timer("fn()", globals={"fn": fn}, num_threads=threads, **clock(device, threads))
              for name, fn in fns.items()}
    names = list(fns)
    secs: Dict[str, List[float]] = {name: [] for name in names}
    block: Dict[str, int] = {}  # calls per timed block of the rows faster than min_run_time
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in block:
                secs[name].append(timers[name].timeit(block[name]).median)
                continue
            secs[name].append(timers[name].blocked_autorange(min_run_time=min_run_time).median)
            if secs[name][-1] < min_run_time:
                block[name] = math.ceil(min_run_time / secs[name][-1])
    out = {}
    for name, xs in secs.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        ratio = statistics.median(a / b for a, b in zip(xs, secs[anchor])) if anchor else None
        out[name] = {"seconds": statistics.median(xs), "ratio": ratio, "spread": (q[2] - q[0]) / max(q[1], 1e-12)}
    return out


# -------------------------------------------------------------------------------------------------
# peak memory


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_bytes(fn: Callable[[], Any], device) -> int:
    """Peak memory of fn() above what was allocated before it (see the module doc)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    # reset the high-water mark to the live memory now, then read its growth from that mark (not
    # from a later VmRSS read: RSS can move between the two)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _kib("VmHWM")
    fn()
    return (_kib("VmHWM") - base) * 1024


def peaks(fns: Dict[str, Callable[[], Any]], device, repeats: int = 1) -> Dict[str, int]:
    """{row: peak bytes, the median of `repeats` calls}, every row run once first (allocator and
    library warm-up)."""
    for fn in fns.values():
        fn()
    return {name: statistics.median(peak_bytes(fn, device) for _ in range(repeats)) for name, fn in fns.items()}


def peaks_in_fresh_process(argv: Sequence = ()) -> Dict[str, int]:
    """This script's command line (less --fresh) run again in a fresh process, `argv` (the cell to
    measure) and --peak-worker added (glibc returning freed memory at once); that process calls
    peak_worker and prints {row: bytes}."""
    same = [a for a in sys.argv[1:] if a != "--fresh"]
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *same, *map(str, argv), PEAK_FLAG]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV))
    if res.returncode != 0:
        raise RuntimeError(f"memory worker failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def peaks_here_or_fresh(fns: Callable[[], Dict[str, Callable[[], Any]]], device, argv: Sequence = ()) -> Dict[str, int]:
    """peaks(fns(), device) on a GPU; on the CPU peaks_in_fresh_process(argv), whose worker builds fns()."""
    return peaks(fns(), device) if device.type == "cuda" else peaks_in_fresh_process(argv)


def peak_worker(fns: Dict[str, Callable[[], Any]], repeats: int = 1) -> None:
    """In the fresh process of peaks_in_fresh_process: measure and print the peaks."""
    import torch

    print(json.dumps(peaks(fns, torch.device("cpu"), repeats)))


# -------------------------------------------------------------------------------------------------
# what the scripts' rows share


def rel_err(got: Sequence, ref: Sequence) -> float:
    """Relative L2 error of the tensors `got` against `ref`, all of them together, in float64."""
    num = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, ref)) ** 0.5
    return float(num / sum((b.double() ** 2).sum() for b in ref) ** 0.5)


def mean_sd(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (NaN for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def importable(module: str, left_out: str) -> bool:
    """Whether an optional library imports; when it does not, says what is left out."""
    try:
        importlib.import_module(module)
    except ImportError:
        print(f"{module} not importable: {left_out} left out")
        return False
    return True


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (said) when matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"matplotlib not importable ({e}): no figure")
        return None
    return plt


def save_figure(fig, path: str, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------
# results


def parser(name: str, doc: str, resumable: bool = True) -> argparse.ArgumentParser:
    """The script's argument parser with the harness's own options (--fresh where it keeps Results)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(OUT_ROOT, name), help="folder of the results")
    if resumable:
        p.add_argument("--fresh", action="store_true", help="discard what an earlier run of these settings measured")
    p.add_argument(PEAK_FLAG, dest="peak_worker", action="store_true", help=argparse.SUPPRESS)
    return p


class Results:
    """OUT/NAME.jsonl (see the module doc). A row is identified by its `key` fields; the lines of one
    row (several measurements of it) are merged in the order they were written."""

    def __init__(self, args, name: str, config: Dict[str, Any], key: Sequence[str], device=None):
        self.path, self.key, self._rows = os.path.join(args.out, name + ".jsonl"), tuple(key), {}
        if getattr(args, "fresh", False) and os.path.exists(self.path):
            os.remove(self.path)
        config = json.loads(json.dumps(config))  # as it reads back
        if os.path.exists(self.path):
            lines = read_lines(self.path)
            if lines and lines[0].get("config") != config:
                raise SystemExit(f"{self.path} holds a run with other settings ({lines[0].get('config')}); pass "
                                 "--fresh to start over or another --out")
            for line in lines[1:]:
                self._merge(line)
            print(f"resuming from {self.path}: {len(self._rows)} rows measured before", flush=True)
        else:
            append_line(self.path, {"config": config, "machine": machine(device)})

    def _id(self, row: Dict[str, Any]):
        return tuple(json.dumps(row.get(k)) for k in self.key)

    def _merge(self, line: Dict[str, Any]) -> None:
        self._rows.setdefault(self._id(line), {}).update(line)

    def get(self, key: Dict[str, Any]) -> Dict[str, Any]:
        return self._rows.get(self._id(key), {})

    def has(self, keys: Iterable[Dict[str, Any]], field: str) -> bool:
        return all(field in self.get(k) for k in keys)

    def add(self, key: Dict[str, Any], **values) -> Dict[str, Any]:
        line = {**key, **values}
        self._merge(line)
        append_line(self.path, line)
        return self.get(key)

    def measure(self, keys: List[Dict[str, Any]], field: str, fn: Callable[[], List[Dict[str, Any]]]) -> None:
        """Unless every row of `keys` has `field` already: fn() -> one dict of values per key, added."""
        if not self.has(keys, field):
            for key, values in zip(keys, fn()):
                self.add(key, **values)

    def rows(self, keys: Optional[Iterable[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
        return list(self._rows.values()) if keys is None else [self.get(k) for k in keys]


def append_line(path: str, line: Dict[str, Any], sort_keys: bool = False) -> None:
    """One JSON line appended, flushed and synced: an interrupted run loses nothing it wrote."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line, sort_keys=sort_keys) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str) -> List[Dict[str, Any]]:
    """Every JSON line of a results file (the settings first; none when it is absent); a line cut by
    a kill is left out."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def read_rows(path: str, key: Sequence[str]) -> List[Dict[str, Any]]:
    """The merged rows of a results file, as Results.rows() gives them (empty when it is absent)."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    for line in read_lines(path)[1:]:
        rows.setdefault(tuple(json.dumps(line.get(k)) for k in key), {}).update(line)
    return list(rows.values())


# -------------------------------------------------------------------------------------------------
# jobs


def run_tasks(tasks: Sequence[Dict[str, Any]], workers: int, submit: Callable[[Dict[str, Any]], Any],
              finished: Callable[[Dict[str, Any], Any], None],
              failed: Optional[Callable[[Dict[str, Any], Exception], None]] = None, done: Iterable[str] = (),
              key: str = "name") -> List[str]:
    """Start `tasks` (dicts named by task[key], task["after"] the names they need; `done`: names
    finished before) in list order as their needs allow, at most `workers` at a time: submit(task)
    returns a Future, finished(task, its result) as each ends. A task that raises goes to
    failed(task, error) and the tasks after it are skipped (the names of both are returned); without
    `failed` its error ends the run."""
    from concurrent.futures import FIRST_COMPLETED, wait

    done, lost, pending, running = set(done), [], list(tasks), {}
    while pending or running:
        while blocked := [t for t in pending if any(a in lost for a in t["after"])]:
            for t in blocked:
                lost.append(t[key])
                pending.remove(t)
        for t in [t for t in pending if all(a in done for a in t["after"])][:workers - len(running)]:
            pending.remove(t)
            running[submit(t)] = t
        if not running:
            if pending:
                raise RuntimeError(f"tasks with unmet needs: {sorted(t[key] for t in pending)}")
            break
        for fut in wait(list(running), return_when=FIRST_COMPLETED)[0]:
            t = running.pop(fut)
            try:
                result = fut.result()
            except Exception as e:
                if failed is None:
                    raise
                failed(t, e)
                lost.append(t[key])
                continue
            done.add(t[key])
            finished(t, result)
    return lost


# -------------------------------------------------------------------------------------------------
# tables


def cell(value, fmt: str = "") -> str:
    if value is None:
        return "-"
    return format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value)


def table(rows: Iterable[Dict[str, Any]], columns: Sequence[tuple]) -> str:
    """Markdown: columns are (header, key or function of the row[, format spec])."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        vals = []
        for c in columns:
            try:
                v = c[1](r) if callable(c[1]) else r.get(c[1])
            except (KeyError, TypeError, ZeroDivisionError):
                v = None
            vals.append(cell(v, c[2] if len(c) > 2 else ""))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)
