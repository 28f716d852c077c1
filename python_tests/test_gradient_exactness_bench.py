"""benchmarks/gradient_exactness.py runs and passes: the third-party rows for diffusers and torchcfm
where they are installed (neither is a dependency), a "not installed" row where not; the strategy
table; and the issue-9 gauntlet's table."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gradient_exactness.py")


def _run(tmp_path, *args, timeout=600):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_third_party_models_table(tmp_path):
    out = _run(tmp_path, "--tables", "third-party", "--steps", "1")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for library in ("diffusers", "torchcfm"):
        mine = [r for r in rows if library in r]
        assert mine, f"no row for {library}"
        assert all("not installed" in r for r in mine) or not any("not installed" in r for r in mine)


@pytest.mark.slow
def test_third_party_models_strategy_table(tmp_path):
    """--tables strategies: the table per network and adjoint strategy runs and is within tolerance."""
    assert "| torch_gru | float64 |" in _run(tmp_path, "--tables", "strategies", timeout=1200)


@pytest.mark.slow
def test_model_zoo_table(tmp_path):
    out = _run(tmp_path, "--tables", "zoo")
    assert "| unet_tiny |" in out and "| spectral_norm_train |" in out and "worst over all:" in out
