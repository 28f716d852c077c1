"""benchmarks/kernel_speed.py: the bytes model behind its speed-up bounds, and a tiny run of the whole
script (tables, verdicts, files) on the CPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # as test_gpu_report imports the benchmark scripts

import harness  # noqa: E402
import kernel_speed as kb  # noqa: E402


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_speedup_bounds_follow_the_bytes(k):
    row = {"terms": k, "dtype": "float32"}
    # one pass reads base and k terms and writes out: k + 2 floats; a chain reads acc and a term and
    # writes acc per term: 3k floats
    assert kb.speedup_bound(row, "add_chain_out") == pytest.approx(3 * k / (k + 2))
    assert kb.speedup_bound(row, "compile") == 1.0  # torch.compile's fused pass moves what ours moves
    assert kb.speedup_bound(row, "foreach") > kb.speedup_bound(row, "add_chain")
    bf16 = {"terms": k, "dtype": "bf16"}
    # the chains accumulate in float32 and cast at the end; one pass reads and writes bf16 directly
    assert kb.speedup_bound(bf16, "add_chain_out") == pytest.approx((10 * k + 6) / (4 + 2 * k + 2))


@pytest.mark.slow
def test_tiny_run_writes_tables_and_verdicts(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_speed.py"), "--device", "cpu", "--sizes", "12,16",
           "--terms", "1,2", "--reps", "2", "--batch-ms", "0.5", "--no-compile", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "best torch (bytes bound)" in res.stdout and "where the bytes moved allow it" in res.stdout
    rows = harness.read_rows(str(tmp_path / "kernels.jsonl"), ("dtype", "log2n", "terms"))
    assert sorted((r["log2n"], r["terms"], r["dtype"]) for r in rows) == sorted(
        (n, k, d) for n in (12, 16) for k in (1, 2) for d in ("float32", "bf16"))  # each cell once
    assert all(r["us"]["copy_"] > 0 and r["us"]["cpu"] > 0 for r in rows)
    assert (tmp_path / "kernels.md").read_text().count("### ") == 2
