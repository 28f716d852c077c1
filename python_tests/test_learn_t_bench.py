"""benchmarks/learn_t.py (the learned-t experiment of issue 11) runs end to end in its quick mode."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_learn_t_benchmark_quick(tmp_path):
    out = tmp_path / "lt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "learn_t.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learned t (from 0.5)" in proc.stdout
    rows = json.load(open(out / "results.json"))["rows"]
    assert [r["t_final"] for r in rows["fixed t = 1.0 (PRG)"]] == [1.0]
    learned = rows["learned t (from 0.5)"][0]["t_final"]
    assert 0.0 < learned < 1.0 and learned != 0.5  # it was trained, and stayed in range
