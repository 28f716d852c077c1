"""benchmarks/adjoint_memory.py --quick: the whole benchmark (every strategy, the memory worker,
interleaved timing, gradient errors, the table and the PNG) at small sizes on the CPU, showing the
headline; an interrupted run resumes from its JSON lines; and --velocity mlp, the adjoint's
bookkeeping at toy sizes (issue 25 item 3)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # as test_gpu_report imports the benchmark scripts

import harness  # noqa: E402

KEY = ("method", "steps", "impl")


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
    rows = harness.read_rows(str(tmp_path / "out" / "adjoint_memory_cpu_tiny_quick.jsonl"), KEY)
    impls = {r["impl"] for r in rows}
    assert impls == {"backprop", "auto", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq",
                     "tdq_adjoint"}
    assert len(rows) == 2 * len(impls)  # K = 2, 4
    for r in rows:
        assert r["peak_bytes"] >= 0 and r["seconds"] > 0
        if r["impl"] == "backprop":
            assert r["time_ratio"] == 1.0
        if r["impl"] in ("auto", "budget_0", "budget_half", "budget_inf", "steps", "reversible", "tdq"):
            assert r["grad_rel_err"] < 1e-12, r  # exact strategies, float64
    assert (tmp_path / "fig" / "adjoint_memory_cpu_tiny_quick_euler.png").stat().st_size > 0
    # the headline at --quick sizes: the adjoint holds less than backprop at every K, and backprop's
    # memory grows with K by more than the adjoint's (stage inputs only) does
    peak = {(r["impl"], r["steps"]): r["peak_bytes"] for r in rows}
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
    log = tmp_path / "adjoint_memory_cpu_tiny.jsonl"
    assert len(log.read_text().splitlines()) == 1 + 3 * 2  # the settings, then 3 measures x 2 strategies
    second = subprocess.run(base + ["--steps", "1", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "2 rows measured before" in second.stdout
    lines = harness.read_lines(str(log))[1:]
    assert sorted((c["steps"], c["impl"]) for c in lines if "peak_bytes" in c) == [
        (1, "backprop"), (1, "budget_0"), (2, "backprop"), (2, "budget_0")]  # K = 1 not measured again
    other = subprocess.run(base + ["--steps", "1", "--batch", "3"],  # the last --batch wins
                           capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stderr  # never mixed with another configuration


def test_mlp_overhead_prints_ratios(tmp_path):
    """--velocity mlp: a row per (method, K) with each strategy's time over plain backprop measured in
    the same rounds."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "adjoint_memory.py"), "--velocity", "mlp", "--dim", "4",
           "--hidden", "8", "--batch", "2", "--methods", "euler", "rk4", "--steps", "2", "--reps", "1", "--out",
           str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| euler") or
            line.startswith("| rk4")]
    assert [r[0].strip() for r in rows] == ["euler", "rk4"]
    for r in rows:  # 4 times, then auto / budget_inf / budget_0 over backprop: positive numbers
        assert len(r) == 2 + 4 + 3 and all(float(v) > 0 for v in r[2:])
