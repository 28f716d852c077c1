"""benchmarks/fashion_mnist.py without training anything: the cells of the protocol, the resumable
JSON-lines results file, the measured subprocess, and the tables made from results."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import fashion_mnist as fm  # noqa: E402


def test_every_row_and_seed_is_a_cell_after_what_it_needs(tmp_path):
    for scale in ("full", "quick"):
        plan = fm.Plan(scale, str(tmp_path), jobs=1)
        keys = [c["key"] for c in plan.cells]
        assert len(keys) == len(set(keys))
        for i, c in enumerate(plan.cells):  # started in list order: what a cell needs comes before it
            assert all(a in keys[:i] for a in c["after"]), c["key"]
        seeds = fm.SCALES[scale]["seeds"]
        for method in ("prg", "scratch", "head"):
            for n in fm.LABELS:
                for s in seeds:
                    cell = next(c for c in plan.cells if c["key"] == f"{method}-{fm.labels_name(n)}-s{s}")
                    assert cell["after"] == (["publish"] if method != "scratch" else
                                             (["data"] if scale == "quick" else []))
        probes = sorted(k for k in keys if k.startswith("probe-"))
        assert probes == sorted([f"probe-{n}-s{s}" for n in ("10", "100") for s in seeds] + ["probe-all-s0"])
    assert fm.Plan("full", str(tmp_path), 1).flow.endswith(fm.WEIGHTS)


def test_run_command_measures_the_child(tmp_path):
    r = fm.run_command([sys.executable, "-c", "x = bytearray(200 * 2**20); print('{\"a\": 1}')"],
                       str(tmp_path / "log"))
    assert r["metrics"] == {"a": 1} and r["peak_rss_mib"] > 200 and r["cpu_s"] >= 0 and r["wall_s"] > 0
    with pytest.raises(RuntimeError, match="failed with status 3"):
        fm.run_command([sys.executable, "-c", "import sys; sys.exit(3)"], str(tmp_path / "log"))


def _fake_plan(tmp_path, calls, fail=()):
    plan = fm.Plan("quick", str(tmp_path / "runs"), jobs=2)

    def runner(key):
        def run():
            calls.append(key)
            if key in fail:
                raise RuntimeError("boom")
            return {"cpu_s": 1.0, "wall_s": 2.0, "peak_rss_mib": 3.0, "top1": 0.5}
        return run

    plan.cells = [{"key": "a", "after": [], "run": runner("a"), "kind": "data"},
                  {"key": "b", "after": ["a"], "run": runner("b"), "kind": "finetune", "method": "prg",
                   "labels_per_class": 10, "seed": 0},
                  {"key": "c", "after": ["b"], "run": runner("c"), "kind": "data"}]
    return plan


def test_results_are_appended_per_cell_and_a_rerun_skips_them(tmp_path):
    results = str(tmp_path / "r.jsonl")
    calls = []
    assert fm.run_plan(_fake_plan(tmp_path, calls, fail={"b"}), results, jobs=2) == 1
    assert calls == ["a", "b"]  # c comes after the failed b: not started
    rows = fm.read_results(results)
    assert [r["cell"] for r in rows] == ["a"] and rows[0]["protocol"] == fm.protocol_id("quick")
    calls.clear()
    assert fm.run_plan(_fake_plan(tmp_path, calls), results, jobs=2) == 0
    assert calls == ["b", "c"]  # a was done
    assert [r["cell"] for r in fm.read_results(results)] == ["a", "b", "c"]
    with open(results, "a") as f:
        f.write(json.dumps({"cell": "x", "protocol": "other"}) + "\n")
    with pytest.raises(SystemExit, match="another protocol"):
        fm.run_plan(_fake_plan(tmp_path, []), results, jobs=1)


def test_tables_from_results():
    rows = []
    for s, (prg, scratch) in enumerate([(0.80, 0.70), (0.82, 0.71), (0.84, 0.75)]):
        for method, top1 in (("prg", prg), ("scratch", scratch)):
            rows.append({"kind": "finetune", "scale": "full", "method": method, "labels_per_class": 10, "seed": s,
                         "top1": round(top1, 1),  # rounded as the first results were: top1_by_steps is read
                         "top1_by_steps": {"1": top1 - 0.01, "2": top1, "8": top1 + 0.01}, "cpu_s": 10.0,
                         "wall_s": 60.0, "peak_rss_mib": 700.0, "load_avg_start": 3.0, "load_avg_end": 5.0})
    text = fm.markdown(rows, "full")
    assert "| PRG finetuned | 82.0 ± 2.0 | -- | -- |" in text
    assert "| from scratch | 72.0 ± 2.6 | -- | -- |" in text
    assert "| PRG - scratch (paired by seed) | 10.0 ± 1.0 | -- | -- |" in text  # 10, 11, 9 points
    assert "| PRG finetuned | 10 | 81.0 ± 2.0 | 82.0 ± 2.0 | 83.0 ± 2.0 |" in text
    assert "| PRG finetuned | 10 | 10 | 1.0 | 700 | 3.0-5.0 |" in text
