"""benchmarks/adaptive.py on one row (Lotka-Volterra, float64): every solver's cells land in the
results file, ours take torchdiffeq's steps (same evaluations, the same error to rounding), every
strategy of ours gives the same gradient, and a second run resumes (measures nothing again)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402

SOLVERS = {"prg_fast", "prg_fast_budget0", "prg_fast_backprop", "torchdiffeq", "torchdiffeq_adjoint"}
try:  # torchode's row is there when it imports (an optional comparison)
    import torchode  # noqa: F401
    SOLVERS.add("torchode")
except ImportError:
    pass


@pytest.mark.slow
def test_one_row(tmp_path):
    pytest.importorskip("torchdiffeq", reason="the benchmark compares against torchdiffeq")
    pytest.importorskip("scipy", reason="the benchmark's reference solution is scipy's DOP853")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "adaptive.py"), "--rows", "lotka", "--reps", "1",
           "--min-run-time", "0", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| row | solver | error vs DOP853 |" in res.stdout
    rows = {r["solver"]: r for r in harness.read_rows(str(tmp_path / "adaptive.jsonl"), ("row", "solver"))}
    assert set(rows) == SOLVERS
    tdq = rows["torchdiffeq"]
    assert tdq["nograd_ratio"] == 1.0 and tdq["train_ratio"] == 1.0
    for name in ("prg_fast", "prg_fast_budget0", "prg_fast_backprop"):
        r = rows[name]
        assert r["nfe"] == tdq["nfe"], r  # dopri5: torchdiffeq's accepted and rejected steps
        assert abs(r["err"] - tdq["err"]) <= 1e-6 * tdq["err"], r  # float64: the same solution to rounding
        # exact strategies: the same gradient (float64), so the same distance to the reference
        assert abs(r["grad_err"] - rows["prg_fast_backprop"]["grad_err"]) <= 1e-6 * r["grad_err"], r
        assert r["nograd"] > 0 and r["train"] > 0 and r["held_mb"] > 0
    if "torchode" in rows:  # the same problem solved: an error of the same size, about as many evaluations
        assert rows["torchode"]["err"] < 10 * tdq["err"] and abs(rows["torchode"]["nfe"] - tdq["nfe"]) < 0.2 * tdq["nfe"]
    measured = len(harness.read_lines(str(tmp_path / "adaptive.jsonl")))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    assert len(harness.read_lines(str(tmp_path / "adaptive.jsonl"))) == measured  # nothing measured again


@pytest.mark.slow
def test_float32_gradients_one_seed(tmp_path):
    """benchmarks/float32_gradients.py on one seed: both solvers take the same steps, and the table
    and the median land."""
    pytest.importorskip("torchdiffeq", reason="the benchmark compares against torchdiffeq")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "float32_gradients.py"), "--seeds", "1", "--out",
           str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| seed | prg_fast gradient error |" in res.stdout and "median ratio" in res.stdout
    (row,) = harness.read_rows(str(tmp_path / "float32_gradients.jsonl"), ("seed",))
    assert 0 < row["ours"] < 1e-3 and 0 < row["tdq"] < 1e-3 and abs(row["nfe"] - row["nfe_tdq"]) < 0.1 * row["nfe"]
