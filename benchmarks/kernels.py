"""Memory bandwidth of the fused stage arithmetic, prg_fast::stage_combine, per backend.

    out = alpha * base + sum_j coeffs[j] * terms[j]

is one pass over memory, so its speed is bytes moved / time. This script reports that in GB/s for
every backend available on the device (cuda, triton, cpu), for the same arithmetic written as
PyTorch ops (the "reference" backend: one kernel per multiply and add), and for the device's own
copy bandwidth (tensor.copy_, read + write), which is the ceiling a streaming kernel can reach.

Shapes: 2^16 .. 2^28 elements, 1, 2 and 4 terms; the base is float32 and the terms and output are
float32 or bfloat16 (the bf16 case is a stage input for a bf16 network: a float32 state plus bf16
network outputs, written in bf16). Sizes that would not fit in half the free memory are skipped.

    python benchmarks/kernels.py                  # the GPU if there is one, else the CPU
    python benchmarks/kernels.py --quick          # small sizes; on a CPU in well under 30 s
    python benchmarks/kernels.py --devices cuda,cpu

Prints one table per device (named by torch.cuda.get_device_name or the CPU model) and writes
runs/benchmarks/kernels.png and runs/benchmarks/kernels.json (or --out). GPU timings use torch.cuda.Event,
CPU timings time.perf_counter; every number is the median of several timed batches after warm-up.
Small sizes are bound by the launch / dispatch cost of a call, not by memory, and fit in cache.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

try:
    import prg_fast  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prg_fast.ode import backends, ops, reference  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "benchmarks")  # git-ignored
DTYPE_NAMES = {"float32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Device names and free memory


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform

    return f"{model or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Seconds per call of fn: warm-up, then `reps` batches of `inner` calls (inner chosen so a
    batch lasts about `batch_s`), median over batches."""

    def __init__(self, device: torch.device, reps: int, warmup: int, batch_s: float):
        self.device, self.reps, self.warmup, self.batch_s = device, reps, warmup, batch_s

    def _batch(self, fn: Callable[[], object], inner: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        one = self._batch(fn, 1)
        inner = max(1, min(1000, int(self.batch_s / max(one, 1e-7))))
        return statistics.median(self._batch(fn, inner) for _ in range(self.reps))


# ---------------------------------------------------------------------------------------------
# The benchmark


def backends_for(device: torch.device) -> Dict[str, Callable]:
    """name -> combine function, for every backend that runs on `device` (reference included)."""
    found: Dict[str, Callable] = {}
    for name in ("cuda", "triton", "cpu"):
        why = backends.unavailable_reason(name, device)
        if why is not None:
            print(f"  [{device.type}] backend {name!r} skipped: {why}")
            continue
        if name == "triton" and device.type == "cpu":
            print(f"  [{device.type}] backend 'triton' skipped: interpreted Triton is for tests, not timing")
            continue
        found[name] = backends.resolve(name, device)[1]
    found["reference"] = reference.stage_combine
    return found


def run_device(device: torch.device, sizes: List[int], term_counts: List[int], dtypes: List[str],
               timer: Timer) -> dict:
    name = device_name(device)
    print(f"\n== {name} [{device}] ==")
    impls = backends_for(device)
    rows = []
    for log2n in sizes:
        n = 1 << log2n
        # the copy ceiling at this size: a float32 tensor copied into another (read + write)
        copy_bytes = 2 * n * 4
        if copy_bytes * 1.5 > free_bytes(device) // 2:
            print(f"  2^{log2n}: skipped (needs more than half the free memory)")
            continue
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        copy_gbs = copy_bytes / timer(lambda: dst.copy_(src)) / 1e9
        del src, dst
        for dname in dtypes:
            tdtype = DTYPE_NAMES[dname]
            for k in term_counts:
                esize = torch.empty(0, dtype=tdtype).element_size()
                moved = n * 4 + k * n * esize + n * esize  # base read, terms read, out written
                if (moved + n * 4) * 1.2 > free_bytes(device) // 2:  # + the reference's float32 temporaries
                    print(f"  2^{log2n} {dname} x{k}: skipped (memory)")
                    continue
                base = torch.randn(n, device=device)
                terms = [torch.randn(n, device=device).to(tdtype) for _ in range(k)]
                coeffs = [0.5 / (j + 1) for j in range(k)]
                row = {"log2n": log2n, "n": n, "dtype": dname, "terms": k, "bytes": moved,
                       "copy_GBps": copy_gbs, "GBps": {}}
                for bname, fn in impls.items():
                    call = lambda fn=fn: fn(base, terms, coeffs, 1.0, tdtype)  # noqa: E731
                    try:
                        sec = timer(call)
                    except Exception as e:  # a backend that fails should not hide the others
                        print(f"  {bname} failed at 2^{log2n} {dname} x{k}: {type(e).__name__}: {e}")
                        continue
                    row["GBps"][bname] = moved / sec / 1e9
                rows.append(row)
                del base, terms
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(name, device, impls, rows)
    return {"device": str(device), "name": name, "backends": list(impls), "rows": rows}


def print_table(name: str, device: torch.device, impls: Dict[str, Callable], rows: List[dict]) -> None:
    names = list(impls)
    print(f"\nstage_combine GB/s on {name} ({device}); base float32, terms and output in the given dtype")
    head = f"{'size':>6} {'dtype':>7} {'terms':>5} {'MB':>9} " + " ".join(f"{b:>10}" for b in names)
    head += f" {'copy':>8} {'best/copy':>9} {'best/ref':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        g = r["GBps"]
        cells = " ".join(f"{g[b]:10.1f}" if b in g else f"{'-':>10}" for b in names)
        fused = [v for b, v in g.items() if b != "reference"]
        best = max(fused) if fused else None
        ratio = f"{best / r['copy_GBps']:9.0%}" if best else f"{'-':>9}"
        speedup = f"{best / g['reference']:7.1f}x" if best and g.get("reference") else f"{'-':>8}"
        print(f"2^{r['log2n']:<4} {r['dtype']:>7} {r['terms']:>5} {r['bytes'] / 1e6:9.1f} {cells} "
              f"{r['copy_GBps']:8.1f} {ratio} {speedup}")


def plot(results: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib not importable ({e})"
    panels = [(res, d, k) for res in results
              for d in sorted({r["dtype"] for r in res["rows"]})
              for k in sorted({r["terms"] for r in res["rows"]})]
    if not panels:
        return "no plot: no results"
    ncols = len({(d, k) for _, d, k in panels}) if len(results) == 1 else max(
        len({(r["dtype"], r["terms"]) for r in res["rows"]}) for res in results)
    ncols = max(1, min(ncols, 3))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    colors = {"cuda": "tab:green", "triton": "tab:purple", "cpu": "tab:blue", "reference": "tab:orange"}
    for ax, (res, d, k) in zip(axes.flat, panels):
        rows = [r for r in res["rows"] if r["dtype"] == d and r["terms"] == k]
        xs = [r["n"] for r in rows]
        for b in res["backends"]:
            pts = [(r["n"], r["GBps"][b]) for r in rows if b in r["GBps"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=b, color=colors.get(b))
        ax.plot(xs, [r["copy_GBps"] for r in rows], "k--", lw=1, label="copy_")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{res['name'][:38]}\n{d} terms x{k}", fontsize=8)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("prg_fast::stage_combine bandwidth (base float32)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 2^16..2^20, fewer repetitions (CPU: < 30 s)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to benchmark (default: cuda if available, else cpu)")
    p.add_argument("--min-log2", type=int, default=16)
    p.add_argument("--max-log2", type=int, default=None, help="largest size as log2 (default 28; 20 with --quick)")
    p.add_argument("--step", type=int, default=None, help="log2 step between sizes (default 2)")
    p.add_argument("--terms", default="1,2,4")
    p.add_argument("--dtypes", default="float32,bf16", help="term/output dtypes: float32,bf16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=os.path.join(OUT_DIR, "kernels.png"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    devices = args.devices.split(",") if args.devices else ["cuda" if torch.cuda.is_available() else "cpu"]
    max_log2 = args.max_log2 if args.max_log2 is not None else (20 if args.quick else 28)
    step = args.step or 2
    sizes = list(range(args.min_log2, max_log2 + 1, step))
    term_counts = [int(k) for k in args.terms.split(",")]
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPE_NAMES:
            p.error(f"--dtypes: unknown {d!r}, choose from {sorted(DTYPE_NAMES)}")
    print(f"prg_fast kernels benchmark: torch {torch.__version__}; sizes 2^{sizes[0]}..2^{sizes[-1]}; "
          f"terms {term_counts}; dtypes {dtypes}")
    print(f"compiled ops: cpu {'yes' if not ops.CPU_ERROR else 'no'}, cuda {'yes' if not ops.CUDA_ERROR else 'no'}")

    results = []
    for dev in devices:
        device = torch.device(dev)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"\n== {dev}: skipped: needs a CUDA GPU ==")
            continue
        timer = Timer(device, reps=5 if args.quick else 15, warmup=2 if args.quick else 5,
                      batch_s=0.005 if args.quick else 0.02)
        results.append(run_device(device, sizes, term_counts, dtypes, timer))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
    why = plot(results, args.out)
    print(f"\nwrote {json_path}" + (f" and {args.out}" if why is None else f" ({why})"))
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
