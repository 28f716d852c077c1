"""benchmarks/ddim_inversion.py runs at --quick sizes and prints both tables (diffusers installed),
or says diffusers is missing."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ddim_inversion_benchmark_quick():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ddim_inversion.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "not installed" in proc.stdout:
        pytest.skip("diffusers is not installed: the benchmark has nothing to compare against")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert sum(r.startswith("| euler") for r in rows) == 2 and sum(r.startswith("| 5 ") for r in rows) == 1
    # both inversions compute the same gradient (float32 rounding)
    assert all(float(r.split("|")[-2]) < 1e-4 for r in rows if r.startswith(("| 5 ", "| 10 ")))
