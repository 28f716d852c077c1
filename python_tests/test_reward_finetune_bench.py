"""benchmarks/reward_finetune.py end to end at the smallest size: every method gets a row, the exact
rows' gradients equal plain backprop's, the JSON and the PNG are written."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_reward_finetune_benchmark_smallest_run(tiny_flow_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "reward_finetune.py"), "--quick", "--ks", "2",
           "--train-steps", "1", "--grad-batches", "1", "--eval-samples", "4", "--batch", "2",
           "--checkpoint", tiny_flow_checkpoint, "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.load(open(tmp_path / "reward_finetune_quick.json"))["results"]["2"]
    methods = {"full_0", "full_auto", "backprop", "draft1", "draft5", "alignprop", "refl"}
    assert methods <= set(out["peak_mib"]) and methods <= set(out["secs"])
    for exact in ("full_0", "full_auto", "backprop"):
        cos, err = out["cos"][exact]
        assert cos == pytest.approx(1.0, abs=1e-6) and err < 1e-6, (exact, cos, err)
    assert out["floors"]["full_0"] > 0 and (tmp_path / "reward_finetune_quick.png").is_file()
    assert "| full_0 |" in res.stdout
