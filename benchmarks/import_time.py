"""What `import prg_fast` costs an engine-only user, against importing the training stack.

    python benchmarks/import_time.py [--repeats 9]

Each figure is a fresh interpreter (subprocess) timing its own import with time.perf_counter, torch
already imported (untimed: every row would pay it, and its ~1-2 s of noise on a busy machine hides
the rest); the first row is torch's own import for scale. The cases are interleaved, so a change of
machine load hits them alike; the table gives the median and the spread over the repeats."""
import argparse
import json
import statistics
import subprocess
import sys

CASES = {
    "import torch": "import torch",
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


def measure(stmt: str, repeats: int):
    times, modules = [], None
    for _ in range(repeats):
        pre = "" if stmt == "import torch" else "import torch"
        out = subprocess.run([sys.executable, "-c", SNIPPET.format(pre=pre, stmt=stmt)], capture_output=True,
                             text=True, check=True).stdout.split()
        times.append(float(out[0]))
        modules = int(out[1])
    return times, modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    rows = []
    results = {name: [] for name in CASES}
    mods = {}
    for _ in range(args.repeats):
        for name, stmt in CASES.items():
            t, m = measure(stmt, 1)
            results[name] += t
            mods[name] = m
    for name in CASES:
        t = sorted(results[name])
        rows.append({"case": name, "median_ms": round(statistics.median(t), 1), "min_ms": round(t[0], 1),
                     "max_ms": round(t[-1], 1), "prg_fast_modules": mods[name]})
    print("| case | median ms | min-max ms | prg_fast modules loaded |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['median_ms']} | {r['min_ms']}-{r['max_ms']} | {r['prg_fast_modules']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
