"""benchmarks/third_party_models.py runs and passes: its rows for diffusers and torchcfm where they
are installed (neither is a dependency), a "not installed" row where not."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_third_party_models_benchmark():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "third_party_models.py"), "--steps", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for library in ("diffusers", "torchcfm"):
        mine = [r for r in rows if library in r]
        assert mine, f"no row for {library}"
        assert all("not installed" in r for r in mine) or not any("not installed" in r for r in mine)


import pytest  # noqa: E402


@pytest.mark.slow
def test_third_party_models_strategy_table():
    """--strategies: the table per network and adjoint strategy runs and is within tolerance."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "third_party_models.py"), "--steps", "1",
                           "--strategies"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| torch_gru | float64 |" in proc.stdout
