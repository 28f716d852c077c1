"""benchmarks/gpu_report.py --smoke: the whole GPU-report pipeline at tiny sizes on the CPU, so it
cannot rot between GPU sessions (parts needing CUDA must report themselves skipped with a reason)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_report(tmp_path):
    pytest_env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_report.py"), "--out", str(tmp_path),
                          "--smoke", "--only", "info", "sanitizer", "stage_combine", "reverse", "finetune_step"],
                         capture_output=True, text=True, env=pytest_env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    parts = report["parts"]
    assert parts["sanitizer"]["status"] == "skipped" and parts["sanitizer"]["reason"]
    for name in ("info", "stage_combine", "reverse", "finetune_step"):
        assert parts[name]["status"] == "ok", (name, parts[name])
    assert parts["stage_combine"]["rows"] and "cpu/copy" in parts["stage_combine"]["rows"][0]
    row = parts["finetune_step"]["rows"][0]
    assert row["prg_img_s"] > 0 and row["released_img_s"] > 0
    md = (tmp_path / "report.md").read_text()
    assert "## finetune_step: ok" in md and "Device: CPU (smoke)" in md
