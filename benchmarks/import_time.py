"""What `import prg_fast` costs an engine-only user, against importing the training stack.

    python benchmarks/import_time.py [--repeats 9]

An import runs once per interpreter, so it cannot go through torch.utils.benchmark's Timer: each
figure is a fresh interpreter (subprocess) timing its own import with time.perf_counter, torch
already imported (untimed: every row would pay it, and its ~1-2 s of noise on a busy machine hides
the rest); the first row is torch's own import for scale. The cases are interleaved, so a change of
machine load hits them alike; the table gives the median and the spread over the repeats."""
import statistics
import subprocess
import sys

import harness

CASES = {
    "import torch (for scale)": "import torch",
    "import prg_fast (engine only)": "import prg_fast",
    "import prg_fast + prg_fast.training.finetune (training stack)": "import prg_fast, prg_fast.training.finetune",
    "import prg_fast + prg_fast.cli (command line, parsers only)": "import prg_fast, prg_fast.cli",
}

SNIPPET = """
import time, sys
{pre}
t0 = time.perf_counter()
{stmt}
t1 = time.perf_counter()
print((t1 - t0) * 1000, len([m for m in sys.modules if m.startswith("prg_fast")]))
"""


def measure(stmt: str):
    """(milliseconds, prg_fast modules loaded) of one import in a fresh interpreter."""
    pre = "" if stmt == "import torch" else "import torch"
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(pre=pre, stmt=stmt)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1])


def measure_all(repeats: int):
    """Every case `repeats` times, interleaved: one dict of figures per case."""
    samples, modules = {name: [] for name in CASES}, {}
    for _ in range(repeats):
        for name, stmt in CASES.items():
            ms, modules[name] = measure(stmt)
            samples[name].append(ms)
    return [dict(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), prg_fast_modules=modules[name])
            for name, t in samples.items()]


def main(argv=None) -> None:
    p = harness.parser("import_time", __doc__)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    log = harness.Results(args, "import_time", dict(repeats=args.repeats), key=("case",))
    keys = [{"case": n} for n in CASES]
    log.measure(keys, "median_ms", lambda: measure_all(args.repeats))
    print(harness.machine())
    print(harness.table(log.rows(keys), [
        ("case", "case"), ("median ms", "median_ms", ".0f"), ("min-max ms", lambda r: f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"),
        ("prg_fast modules loaded", "prg_fast_modules")]))


if __name__ == "__main__":
    main()
