"""benchmarks/adjoint_overhead.py at toy sizes: the table it prints has a row per (method, K) with
each strategy's time over plain backprop measured in the same run (issue 25 item 3)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overhead_benchmark_prints_ratios():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "adjoint_overhead.py"), "--dim", "4", "--hidden", "8",
           "--batch", "2", "--methods", "euler", "rk4", "--steps", "2", "--reps", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| euler") or
            line.startswith("| rk4")]
    assert [r[0].strip() for r in rows] == ["euler", "rk4"]
    for r in rows:  # 4 times, then auto / budget_inf / budget_0 over backprop: positive numbers
        assert len(r) == 2 + 4 + 3 and all(float(v) > 0 for v in r[2:])
