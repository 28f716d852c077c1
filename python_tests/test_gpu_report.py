"""The GPU check on the CPU: the quick CUDA selection, the global deadline (a part cut in the middle
still leaves a valid report with what it measured), the whole pipeline in --smoke mode, and the
RESULTS.md section written from report.json."""
import json
import os
import re
import subprocess
import sys

import pytest

from cuda_selection import cover

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_results  # noqa: E402
from gpu_parts import Context, adjoint_ratios, cuda_test_files, finetune_ratios, flat_rows  # noqa: E402
from reverse_speed import graph_crossover  # noqa: E402

MAX_FILES = 8  # what the device tool brings back from $OUT


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


# -------------------------------------------------------------------------------------------------
# the selection rule


def _pairs(params):
    return {(k, v) for p in params for k, v in p.items()}


def test_cover_keeps_every_parameter_value_once():
    grid = [dict(n=n, terms=t, dtype=d) for n in (1, 7, 1023, 2 ** 20) for t in range(9) for d in "abcd"]
    chosen = cover(grid)
    assert _pairs([grid[i] for i in chosen]) == _pairs(grid)
    assert len(chosen) == 9  # the longest axis: nothing smaller can cover it
    assert chosen == sorted(set(chosen)) and chosen == cover(grid)  # collection order, deterministic


def test_cover_of_unparametrized_and_unhashable_values():
    assert cover([{}]) == [0]
    assert cover([]) == []
    grid = [dict(shape=[2, 3], k=1), dict(shape=[2, 3], k=2), dict(shape=[4], k=1)]
    chosen = cover(grid)
    assert {repr(grid[i]["shape"]) for i in chosen} == {"[2, 3]", "[4]"} and {grid[i]["k"] for i in chosen} == {1, 2}


def _collect(marker):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker,
           "python_tests"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_quick_subset_runs_every_cuda_test_function():
    """cuda_quick is a subset of cuda that keeps every cuda test function, and is much smaller."""
    every, quick = _collect("cuda"), _collect("cuda_quick")
    assert set(quick) <= set(every)
    functions = {re.sub(r"\[.*$", "", node) for node in every}
    assert functions == {re.sub(r"\[.*$", "", node) for node in quick}
    assert len(quick) * 4 < len(every), (len(quick), len(every))
    # the report collects only the files that mark anything cuda: every cuda test is in one of them
    assert {node.split("::")[0] for node in every} <= set(cuda_test_files())


# -------------------------------------------------------------------------------------------------
# the deadline


def _report(out, *args, timeout=600):
    cmd = [sys.executable, os.path.join(BENCH, "gpu_report.py"), "--out", str(out), "--smoke", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.mark.slow
def test_deadline_cuts_a_part_and_keeps_what_it_wrote(tmp_path):
    """info writes its result then hangs (--stall): the deadline kills it, its result stays, the
    next part is not started, and report.json / report.md are complete."""
    res = _report(tmp_path, "--only", "info", "sanitizer", "--stall", "info", "--deadline", "30", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    info, sanitizer = report["parts"]["info"], report["parts"]["sanitizer"]
    assert info["status"] == "cut" and "global deadline" in info["reason"]
    assert "prg_fast" in info["text"] and info["device"] == "CPU"  # measured before the cut, kept
    assert 29 <= info["seconds"] < 60
    assert sanitizer["status"] == "not run" and "deadline" in sanitizer["reason"]
    md = (tmp_path / "report.md").read_text()
    assert "## info: cut" in md and "## sanitizer: not run" in md
    assert len(os.listdir(tmp_path)) <= MAX_FILES


@pytest.mark.slow
def test_smoke_pipeline_through_gpu_check(tmp_path):
    """The one command, in --smoke mode: every part ok or skipped with its reason, <= 8 files."""
    out = tmp_path / "gpu"
    res = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["info", "correctness", "adjoint", "kernels", "reverse", "finetune", "sanitizer"]
    for name, part in parts.items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        assert part["status"] == "ok" or part["reason"], name
    assert report["build"]["status"] == "skipped" and parts["sanitizer"]["status"] == "skipped"
    assert parts["correctness"]["selection"] == "cuda_quick" and sum(parts["correctness"]["counts"].values()) > 50
    assert {r["impl"] for r in parts["adjoint"]["rows"]} >= {"backprop", "budget_0", "tdq_adjoint"}
    assert {r["steps"] for r in parts["adjoint"]["rows"]} == {1, 2}
    assert all(r["tdq/prg"] > 0 for r in parts["reverse"]["rows"])
    ft = {r["impl"]: r for r in parts["finetune"]["rows"]}
    assert set(ft) >= {"default", "budget_0", "budget_inf", "backprop", "released"}
    assert all(r["images_per_s"] > 0 for r in ft.values())
    # exact rows agree with float64 backprop to rounding; torchdiffeq's adjoint is not exact at K=2
    assert max(ft[i]["grad_rel_err"] for i in ("default", "budget_0", "budget_inf")) < 1e-12
    assert ft["released"]["grad_rel_err"] > 1e-3
    files = os.listdir(out)
    assert len(files) <= MAX_FILES and {"report.json", "report.md", "parts.log", "pytest.log"} <= set(files)


# -------------------------------------------------------------------------------------------------
# report.json -> markdown and RESULTS.md


REPORT = {"device": "NVIDIA H200", "torch": "2.11.0", "date": "2026-12-03 12:00 UTC", "smoke": False,
          "deadline_s": 420, "elapsed_s": 300.5, "build": {"status": "ok", "rc": "0", "seconds": 61},
          "parts": {"info": {"status": "ok", "seconds": 4, "text": "prg_fast 0.1.0"},
                    "adjoint": {"status": "cut", "seconds": 90, "reason": "killed",
                                "rows": [{"impl": "backprop", "steps": 4, "peak_mib": 100.0}]},
                    "sanitizer": {"status": "skipped", "seconds": 2, "reason": "Device not supported"}}}


def test_results_section_replaces_only_its_own_block(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\n## CPU\nfigures\n")
    for _ in range(2):  # the second run replaces the first section, nothing else moves
        assert gpu_results.main([_write(tmp_path, REPORT), "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Measured results\n\n## CPU\nfigures\n")
    assert text.count(gpu_results.BEGIN) == 1 and text.count(gpu_results.END) == 1
    assert "NVIDIA H200" in text and "### adjoint: cut" in text and "| backprop | 4 | 100 |" in text
    assert "Device not supported" in text and "bash benchmarks/gpu_check.sh" in text
    changed = dict(REPORT, device="NVIDIA H100")
    gpu_results.main([_write(tmp_path, changed), "--results", str(results)])
    assert "NVIDIA H100" in results.read_text() and "NVIDIA H200" not in results.read_text()


def test_a_rerun_replaces_only_its_parts(tmp_path):
    rerun = {"date": "2026-12-03 12:10 UTC", "parts": {"adjoint": {"status": "ok", "seconds": 60, "rows": []}}}
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n")
    first = _write(tmp_path, REPORT)
    second = _write(tmp_path, rerun, "rerun.json")
    assert gpu_results.main([first, second, "--results", str(results)]) == 0
    text = results.read_text()
    assert "### adjoint: ok" in text and "### adjoint: cut" not in text and "### sanitizer: skipped" in text
    assert "rerun 2026-12-03 12:10 UTC (adjoint)" in text


def _write(tmp_path, report, name="report.json"):
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return str(path)


def test_report_markdown_shows_every_part():
    md = gpu_results.render(REPORT)
    for heading in ("## build: ok", "## info: ok", "## adjoint: cut", "## sanitizer: skipped"):
        assert heading in md


# -------------------------------------------------------------------------------------------------
# the figures derived in the report


def test_graph_crossover():
    cells = [(10, 0.5), (100, 0.8), (1000, 0.97), (10 ** 4, 0.9)]
    rows = [dict(preset="a", numel=n, prg=1.0, prg_graph=r) for n, r in cells]
    assert graph_crossover(rows)["a"]["pays_up_to_numel"] == 100
    assert graph_crossover(rows)["a"]["stops_at_numel"] == 1000  # the first size where graphs stop paying
    never = graph_crossover([dict(preset="b", numel=5, prg=1.0, prg_graph=1.2)])["b"]
    assert never["pays_up_to_numel"] is None and never["stops_at_numel"] == 5
    always = graph_crossover([dict(preset="c", numel=5, prg=1.0, prg_graph=0.2)])["c"]
    assert always["pays_up_to_numel"] == 5 and always["stops_at_numel"] is None


def test_adjoint_ratios():
    rows = [dict(impl=i, steps=k, peak_mib=p, seconds=s) for i, k, p, s in
            [("backprop", 4, 100.0, 1.0), ("backprop", 16, 400.0, 4.0), ("budget_0", 4, 20.0, 1.5),
             ("budget_0", 16, 22.0, 6.0), ("tdq_adjoint", 16, 30.0, 8.0)]]
    r = adjoint_ratios(rows)
    assert r["backprop peak K16/K4"] == 4.0 and r["budget_0 peak K16/K4"] == 1.1
    assert r["budget_0/backprop peak K16"] == 0.055 and r["budget_0/backprop time K16"] == 1.5
    assert r["budget_0/tdq_adjoint time K16"] == 0.75


def test_finetune_ratios():
    rows = [dict(impl="default_bf16", time_vs_released=0.25, peak_mib=50.0),
            dict(impl="backprop", time_vs_released=0.5, peak_mib=None), dict(impl="released", time_vs_released=1.0,
                                                                             peak_mib=100.0)]
    assert finetune_ratios(rows) == {"default_bf16 images/s vs released": 4.0, "default_bf16 peak vs released": 0.5,
                                     "backprop images/s vs released": 2.0}
    assert finetune_ratios(rows[:1]) == {}


def test_flat_rows_of_a_benchmark_results_file():
    rows = [{"n": 1, "us": {"cuda": 2.0, "triton": 3.0}, "spread": {"cuda": 0.1}}, {"n": 2, "us": {}},
            {"device": "cpu", "note": {"a": 1, "nested": {"b": 2}}, "list": [1]}]
    assert flat_rows(rows) == [{"n": 1, "us:cuda": 2.0, "us:triton": 3.0, "spread:cuda": 0.1}, {"n": 2},
                               {"device": "cpu", "note:a": 1}]


def test_a_silent_command_and_its_children_are_stopped_at_their_limit(tmp_path):
    """The sanitizer's probe must not wait on a tool that hangs without output (its target runs as
    a child that would keep the pipe open)."""
    import time

    ctx = Context("probe", True, str(tmp_path), str(tmp_path), None, "quick")
    t0 = time.monotonic()
    rc = ctx.run_logged(["bash", "-c", "sleep 60 & wait; echo $((6 * 7))"], "probe.log", timeout=1)
    assert rc != 0 and time.monotonic() - t0 < 20
    log = (tmp_path / "probe.log").read_text()
    assert "killed at its 1 s limit" in log and "\n42\n" not in log


def test_gpu_check_rejects_bad_arguments():
    for args, match in ((["--bogus"], "unknown argument '--bogus'"), (["--deadline", "soon"], "whole seconds")):
        res = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), *args], capture_output=True, text=True)
        assert res.returncode == 2 and match in res.stderr
