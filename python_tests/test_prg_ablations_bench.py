"""benchmarks/prg_tables.py --table learn-t (the learned-t experiment of issue 11) and --table
prediction (issue 23) run end to end in their quick modes."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402


def _quick(table, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "prg_tables.py"), "--table", table,
                           "--quick", "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, {r["job"]: r for r in harness.read_rows(str(out / "prg_tables.jsonl"), ("job",))}


@pytest.mark.slow
def test_learn_t_benchmark_quick(tmp_path):
    out, jobs = _quick("learn-t", tmp_path / "lt")
    assert "learned t (from 0.5)" in out
    assert jobs["ft-fixed-t1-s0"]["t_final"] == 1.0
    learned = jobs["ft-learned-t0.5-s0"]["t_final"]
    assert 0.0 < learned < 1.0 and learned != 0.5  # it was trained, and stayed in range


@pytest.mark.slow
def test_prediction_benchmark_quick(tmp_path):
    out, jobs = _quick("prediction", tmp_path / "pred")
    assert "| epsilon |" in out and "| v |" in out
    assert {f"ft-gvp-{p}" for p in ("velocity", "epsilon", "v")} <= set(jobs)
    assert all(0.0 <= jobs[f"ft-gvp-{p}"]["top1"] <= 1.0 for p in ("velocity", "epsilon", "v"))
