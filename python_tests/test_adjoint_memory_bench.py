"""benchmarks/adjoint_memory.py --quick: the whole benchmark (every strategy, the memory worker,
interleaved timing, gradient errors, the table and the PNG) at tiny sizes on the CPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory worker reads /proc (Linux only)")
def test_quick_benchmark(tmp_path):
    pytest.importorskip("torchdiffeq", reason="the benchmark's reference rows need torchdiffeq")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "adjoint_memory.py"), "--quick", "--device", "cpu",
           "--reps", "2", "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| K | strategy | peak MiB |" in res.stdout
    rows = json.load(open(tmp_path / "out" / "adjoint_memory_cpu_tiny_euler_quick.json"))["rows"]
    impls = {r["impl"] for r in rows}
    assert impls == {"backprop", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq", "tdq_adjoint"}
    for r in rows:
        assert r["peak_mib"] >= 0 and r["seconds"] > 0
        if r["impl"] == "backprop":
            assert r["time_ratio"] == 1.0
        if r["impl"] in ("budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq"):
            assert r["grad_rel_err"] < 1e-12, r  # exact strategies, float64
    assert (tmp_path / "fig" / "adjoint_memory_cpu_tiny_euler_quick.png").stat().st_size > 0
