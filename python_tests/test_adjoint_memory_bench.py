"""benchmarks/adjoint_memory.py --quick: the whole benchmark (every strategy, the memory worker,
interleaved timing, gradient errors, the table and the PNG) at small sizes on the CPU, showing the
headline; and an interrupted run resumes from its JSON lines."""
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
    assert impls == {"backprop", "auto", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq",
                     "tdq_adjoint"}
    for r in rows:
        assert r["peak_mib"] >= 0 and r["seconds"] > 0
        if r["impl"] == "backprop":
            assert r["time_ratio"] == 1.0
        if r["impl"] in ("auto", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq"):
            assert r["grad_rel_err"] < 1e-12, r  # exact strategies, float64
    assert (tmp_path / "fig" / "adjoint_memory_cpu_tiny_euler_quick.png").stat().st_size > 0
    # the headline at --quick sizes: the adjoint holds less than backprop at every K, and backprop's
    # memory grows with K by more than the adjoint's (stage inputs only) does
    peak = {(r["impl"], r["steps"]): r["peak_mib"] for r in rows}
    for k in (2, 4):
        assert peak[("budget_0", k)] < peak[("backprop", k)], peak
    assert peak[("backprop", 4)] - peak[("backprop", 2)] > 2 * (peak[("budget_0", 4)] - peak[("budget_0", 2)]), peak


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory worker reads /proc (Linux only)")
def test_an_interrupted_run_resumes_from_its_cells(tmp_path):
    """Every measurement is on disk as soon as it is taken; a rerun with more K measures only those."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, os.path.join(ROOT, "benchmarks", "adjoint_memory.py"), "--device", "cpu", "--batch", "2",
            "--size", "8", "--reps", "1", "--impls", "backprop", "budget_0", "--out", str(tmp_path)]
    first = subprocess.run(base + ["--steps", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    log = tmp_path / "adjoint_memory_cpu_tiny_euler.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 3 * 2  # the settings, then 3 measures x 2 strategies
    second = subprocess.run(base + ["--steps", "1", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "2 cells measured before" in second.stdout
    lines = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert sorted((c["steps"], c["impl"]) for c in lines if "peak_bytes" in c) == [
        (1, "backprop"), (1, "budget_0"), (2, "backprop"), (2, "budget_0")]  # K = 1 not measured again
    other = subprocess.run(base + ["--steps", "1", "--batch", "3"],  # the last --batch wins
                           capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stderr  # never mixed with another configuration
