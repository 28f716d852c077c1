"""Is each fused stage_combine kernel worth its code? Side by side with the best plain PyTorch.

    out = base + sum_j c_j * terms[j]        (k terms; base float32, terms and out float32 or bf16)

is one pass over memory, so its floor is the device's copy bandwidth. Per size (2^12 .. 2^24
elements) and number of terms (1 .. 8), this times, interleaved (harness.interleaved, each round a
blocked_autorange of about --batch-ms per implementation), every prg_fast backend that runs here
(the functional op and its `_into` variant) against the PyTorch formulations of torch_formulations
(add chains, _foreach_mul, torch.compile) and copy_ moving the same bytes. For bf16 every
formulation accumulates in float32 and casts once at the end. The bytes model of the speed-up
bounds (bytes_per_element) and the verdicts' goals: RESULTS.md, "Fused stage_combine against
PyTorch written well".

    python benchmarks/kernel_speed.py --device cpu --quick --out DIR
    python benchmarks/kernel_speed.py --device cuda --quick --out DIR     # the GPU check
    python benchmarks/kernel_speed.py --device cpu --out DIR                # every size, 1-8 terms

Writes OUT/kernels.jsonl (harness.Results: resumable, a row per dtype, size and k), OUT/kernels.md
(the tables) and OUT/kernels.png (bandwidth vs size).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import harness
from prg_fast.ode import backends, ops

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
TORCH_FORMULATIONS = ("add_chain", "add_chain_out", "foreach", "compile")
SPEEDUP_GOAL, COPY_GOAL, FIXED_COST_GOAL = 1.5, 0.85, 2.0


def torch_formulations(base, terms, coeffs, out_dtype, compiled: Optional[Callable]) -> Dict[str, Callable]:
    """The best ways to write the sum in plain PyTorch (float32 accumulation, one cast at the end)."""
    acc = torch.empty_like(base)
    cast = (lambda r: r) if out_dtype == base.dtype else (lambda r: r.to(out_dtype))

    def add_chain():
        r = torch.add(base, terms[0], alpha=coeffs[0])
        for t, c in zip(terms[1:], coeffs[1:]):
            r.add_(t, alpha=c)
        return cast(r)

    final = torch.empty_like(base, dtype=out_dtype)

    def add_chain_out():
        torch.add(base, terms[0], alpha=coeffs[0], out=acc)
        for t, c in zip(terms[1:], coeffs[1:]):
            acc.add_(t, alpha=c)
        return acc if out_dtype == base.dtype else final.copy_(acc)

    def foreach():
        scaled = torch._foreach_mul(terms, coeffs)
        r = torch.add(base, scaled[0])
        for s in scaled[1:]:
            r.add_(s)
        return cast(r)

    fns = {"add_chain": add_chain, "add_chain_out": add_chain_out, "foreach": foreach}
    if compiled is not None:
        fns["compile"] = lambda: compiled(base, *terms)
    return fns


def compiled_sum(coeffs: List[float], out_dtype: torch.dtype) -> Callable:
    """torch.compile of base + sum_j c_j t_j (coefficients baked in, shapes dynamic)."""

    def expr(base, *terms):
        r = base
        for c, t in zip(coeffs, terms):
            r = r + c * t.float()
        return r.to(out_dtype)

    return torch.compile(expr, dynamic=True)


def fused_ops(device: torch.device, base, terms, coeffs, out_dtype) -> Dict[str, Callable]:
    """Every prg_fast backend that runs here: the engine's call, and the into variant."""
    fns: Dict[str, Callable] = {}
    for name in ("cuda", "triton", "cpu"):
        if name in skipped_backends(device):
            continue
        combine = backends.resolve(name, device)[1]
        fns[name] = lambda combine=combine: combine(base, terms, coeffs, 1.0, out_dtype)
        if name in ("cpu", "cuda"):
            out = torch.empty_like(base, dtype=out_dtype)
            fns[f"{name}_into"] = lambda out=out: ops.stage_combine_into(base, terms, coeffs, 1.0, out)
    return fns


def skipped_backends(device: torch.device) -> Dict[str, str]:
    why = {name: backends.unavailable_reason(name, device) for name in ("cuda", "triton", "cpu")}
    if why["triton"] is None and device.type == "cpu":
        why["triton"] = "interpreted Triton on the CPU is for tests, not timing"
    return {name: reason for name, reason in why.items() if reason is not None}


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def measure(device, timing, log2n, k, dname, compiled, with_compile) -> Optional[dict]:
    n, out_dtype = 1 << log2n, DTYPES[dname]
    esize = torch.empty(0, dtype=out_dtype).element_size()
    moved = n * 4 + k * n * esize + n * esize  # base read, terms read, out written
    if 4 * moved > free_bytes(device):  # inputs + outputs + the formulations' temporaries
        print(f"  2^{log2n} {dname} x{k}: skipped (needs more than a quarter of the free memory)")
        return None
    gen = torch.Generator(device=device).manual_seed(log2n * 100 + k)
    base = torch.randn(n, device=device, generator=gen)
    terms = [torch.randn(n, device=device, generator=gen).to(out_dtype) for _ in range(k)]
    coeffs = [0.5 / (j + 1) for j in range(k)]
    src = torch.empty(moved // 8, device=device)  # copy_ of it moves `moved` bytes (read + write)
    dst = torch.empty_like(src)
    fns = fused_ops(device, base, terms, coeffs, out_dtype)
    if with_compile and (k, dname) not in compiled:
        compiled[(k, dname)] = compiled_sum(coeffs, out_dtype)
    fns.update(torch_formulations(base, terms, coeffs, out_dtype, compiled.get((k, dname))))
    fns["copy_"] = lambda: dst.copy_(src)
    fns["torch.add"] = lambda: torch.add(base, base, alpha=0.5)  # one plain op: the fixed-cost yardstick
    for fn in fns.values():
        fn()  # compilation, first-touch allocations
    times = harness.interleaved(fns, **timing)
    return {"log2n": log2n, "n": n, "dtype": dname, "terms": k, "bytes": moved,
            "us": {name: t["seconds"] * 1e6 for name, t in times.items()},
            "spread": {name: t["spread"] for name, t in times.items()}}


def run(args, device: torch.device, log: harness.Results) -> List[dict]:
    """One row per (dtype, size, k): microseconds per call and spread of every implementation, each
    kept as it is measured (torch.compile for 4 terms only with --quick: each is a compilation)."""
    compiled: dict = {}
    timing = dict(rounds=args.reps, device=device, threads=args.threads, min_run_time=args.batch_ms / 1e3)
    for dname in args.dtypes:
        for log2n in args.sizes:
            for k in args.terms:
                key = dict(dtype=dname, log2n=log2n, terms=k)
                if "us" in log.get(key):
                    continue
                with_compile = not args.no_compile and (not args.quick or k == 4)
                row = measure(device, timing, log2n, k, dname, compiled, with_compile)
                if row is not None:
                    log.add(key, **row)
                    print(f"  2^{log2n} {dname} k={k}: "
                          + ", ".join(f"{b} {us:.1f}" for b, us in row["us"].items()) + " us", flush=True)
    keys = [dict(dtype=d, log2n=n, terms=k) for d in args.dtypes for n in args.sizes for k in args.terms]
    return [r for r in log.rows(keys) if r]


def fused_names(row: dict) -> List[str]:
    return [b for b in row["us"] if b not in TORCH_FORMULATIONS and b not in ("copy_", "torch.add")]


def best_torch(row: dict):
    name = min((b for b in TORCH_FORMULATIONS if b in row["us"]), key=row["us"].get)
    return name, row["us"][name]


def bytes_per_element(name: str, k: int, dtype: str) -> int:
    """Bytes a formulation moves through memory per element of the sum (reads + writes; float32
    base and accumulation, terms and output in `dtype`; write-allocate traffic left out, as it is
    for copy_). The fused ops and torch.compile make one pass; the chains one per term, through a
    float32 accumulator, and a final cast when the output is not float32."""
    e = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    cast = 0 if e == 4 else 4 + e
    if name in ("add_chain", "add_chain_out"):
        return k * (8 + e) + cast
    if name == "foreach":  # the scaled terms written and read once more
        return 2 * k * e + k * (8 + e) + cast
    return 4 + k * e + e


def speedup_bound(row: dict, name: str) -> float:
    """The largest speed-up one pass can have over formulation `name` at equal bandwidth: the ratio
    of the bytes both move (1.0 against torch.compile's own fused pass)."""
    return bytes_per_element(name, row["terms"], row["dtype"]) / bytes_per_element("fused", row["terms"], row["dtype"])


def table(rows: List[dict], title: str) -> List[str]:
    """Markdown: time per call (us) of every implementation, then the fused ops' GB/s, their
    fraction of copy_ and their speed-up over the best PyTorch formulation, with the bound the
    bytes both move put on that speed-up."""
    names = [b for b in rows[0]["us"] if b != "torch.add"]

    def fused(b):
        return lambda r: (f"{r['bytes'] / r['us'][b] / 1e3:.1f}, {r['us']['copy_'] / r['us'][b]:.0%}, "
                          f"{best_torch(r)[1] / r['us'][b]:.2f}x")

    columns = [("size", lambda r: f"2^{r['log2n']}"), ("k", "terms")]
    columns += [(f"{b} us", lambda r, b=b: f"{r['us'][b]:.1f} ±{100 * r['spread'][b]:.0f}%") for b in names]
    columns += [("best torch (bytes bound)", lambda r: f"{best_torch(r)[0]} ({speedup_bound(r, best_torch(r)[0]):.2f}x)")]
    columns += [(f"{b} GB/s, /copy, x best", fused(b)) for b in fused_names(rows[0])]
    return [f"### {title}", "", harness.table(rows, columns), ""]


def verdicts(rows: List[dict], device: torch.device) -> List[str]:
    """One line per fused backend (its functional op and its _into variant, whichever is faster
    in a cell): does it beat PyTorch written well, by how much, and does it reach the goals."""
    lines = []
    for b in [x for x in fused_names(rows[0]) if not x.endswith("_into")]:
        def best_of(r):
            return min(r["us"][v] for v in (b, f"{b}_into") if v in r["us"])

        big = [r for r in rows if r["log2n"] >= 16 and b in r["us"]]
        multi = [best_torch(r)[1] / best_of(r) for r in big if r["terms"] >= 2]
        single = [best_torch(r)[1] / best_of(r) for r in big if r["terms"] == 1]
        largest = max(r["log2n"] for r in rows)
        copy_frac = [r["us"]["copy_"] / best_of(r) for r in rows if r["log2n"] == largest]
        small = min(r["log2n"] for r in rows)
        fixed = [r["us"][b] / r["us"]["torch.add"] for r in rows if r["log2n"] == small and r["terms"] == 1]
        # k = 1 moves what torch.add moves: even within the noise (median), not faster, is the bar
        beats = bool(multi) and min(multi) >= 1.0 and (not single or statistics.median(single) >= 0.9)
        # cells where the bytes moved allow the goal at all (not against a fused pass, nor k <= 2)
        reachable = [best_torch(r)[1] / best_of(r) for r in big if r["terms"] >= 2
                     and speedup_bound(r, best_torch(r)[0]) >= SPEEDUP_GOAL]
        goals = [f"x{SPEEDUP_GOAL} for k>=2 in {sum(m >= SPEEDUP_GOAL for m in multi)}/{len(multi)} cells "
                 f"({sum(m >= SPEEDUP_GOAL for m in reachable)}/{len(reachable)} where the bytes moved allow it)"]
        if device.type == "cuda":
            beats = beats and bool(copy_frac) and min(copy_frac) >= COPY_GOAL
        parts = [f"{b} (best of {b}, {b}_into): vs best torch from 2^16 up: k>=2 {_span(multi)}, k=1 {_span(single)}",
                 f"goal {goals[0]}"]
        if copy_frac:
            parts.append(f"of copy_ at 2^{largest}: {min(copy_frac):.0%}-{max(copy_frac):.0%}"
                         + (f" (goal >= {COPY_GOAL:.0%})" if device.type == "cuda" else ""))
        if fixed:
            parts.append(f"fixed cost at 2^{small}, 1 term: {fixed[0]:.2f}x one torch.add (goal <= {FIXED_COST_GOAL}x)")
        verdict = "worth its code" if beats else "NOT worth its code: use the PyTorch formulation"
        lines.append("; ".join(parts) + f" -> {verdict}")
    return lines


def _span(xs: List[float]) -> str:
    return f"{min(xs):.2f}x..{max(xs):.2f}x" if xs else "-"


def plot(rows: List[dict], title: str, path: str) -> Optional[str]:
    plt = harness.pyplot()
    if plt is None:
        return "no plot: matplotlib not importable"
    from matplotlib.ticker import FuncFormatter
    panels = sorted({(r["dtype"], r["terms"]) for r in rows})
    ncols = min(4, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (d, k) in zip(axes.flat, panels):
        sel = [r for r in rows if r["dtype"] == d and r["terms"] == k]
        for b in [x for x in sel[0]["us"] if x != "torch.add"]:
            pts = [(r["n"], r["bytes"] / r["us"][b] / 1e3) for r in sel if b in r["us"]]
            style = dict(ls="--", color="k", lw=1) if b == "copy_" else dict(marker="o", ms=3)
            ax.plot(*zip(*pts), label=b, **style)
        ax.set(xscale="log", yscale="log", xlabel="elements", ylabel="GB/s", title=f"{d}, {k} term(s)")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"2^{int(x).bit_length() - 1}"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"stage_combine vs PyTorch: {title}", fontsize=9)
    harness.save_figure(fig, path)
    return None


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = harness.parser("kernel_speed", __doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="sizes 2^12,16,20,24, 1 and 4 terms (torch.compile for 4 only), fewer repetitions")
    p.add_argument("--sizes", default=None, help="log2 sizes, comma-separated (default 12,14,...,24)")
    p.add_argument("--terms", default=None, help="term counts (default 1,2,4,8; --quick 1,4)")
    p.add_argument("--dtypes", default="float32,bf16", help=f"out/term dtypes from {sorted(DTYPES)}")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 15; --quick 7)")
    p.add_argument("--batch-ms", type=float, default=None, help="length of one timed batch (default 4; --quick 2)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile formulation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: thread CPU time is exact)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("12,16,20,24" if args.quick else "12,14,16,18,20,22,24")).split(",")]
    args.terms = [int(k) for k in (args.terms or ("1,4" if args.quick else "1,2,4,8")).split(",")]
    args.dtypes = args.dtypes.split(",")
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        p.error(f"--dtypes: unknown {unknown}, choose from {sorted(DTYPES)}")
    if bad := [k for k in args.terms if not 1 <= k <= backends.MAX_TERMS]:
        p.error(f"--terms: each must be 1..{backends.MAX_TERMS}, got {bad}")
    args.reps = args.reps or (7 if args.quick else 15)
    args.batch_ms = args.batch_ms or (2.0 if args.quick else 4.0)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False)")
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    name, clock = harness.machine(device), harness.clock_name(device, args.threads)
    print(f"stage_combine vs PyTorch on {name}; {clock}, median of {args.reps} interleaved rounds "
          "(± interquartile range / median)")
    for b, why in skipped_backends(device).items():
        print(f"  backend {b!r} not measured: {why}")
    config = {k: getattr(args, k) for k in ("reps", "batch_ms", "no_compile", "threads", "quick")}
    rows = run(args, device, harness.Results(args, "kernels", dict(config, device=device.type),
                                             key=("dtype", "log2n", "terms"), device=device))
    lines = [f"## stage_combine vs PyTorch: {name}", "",
             f"{clock}, median of {args.reps} interleaved rounds (± interquartile range / median); base float32, "
             "terms and output in the dtype named; GB/s counts base + terms read and out written once.", ""]
    for dname in args.dtypes:
        sel = [r for r in rows if r["dtype"] == dname]
        if sel:
            lines += table(sel, f"{dname} terms and output")
    lines += ["Verdicts:", ""] + [f"- {v}" for v in verdicts(rows, device)] if rows else []
    print("\n" + "\n".join(lines))
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + f"\n\nCommand: python benchmarks/kernel_speed.py {' '.join(argv or sys.argv[1:])}\n")
    why = plot(rows, name, os.path.join(args.out, "kernels.png")) if rows else "no rows"
    print("\nwrote kernels.jsonl, kernels.md" + (" and kernels.png" if why is None else f" ({why})") + f" to {args.out}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
