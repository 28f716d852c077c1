"""benchmarks/prg_tables.py: the label-scarce plan (--table scarce, --quick), the time-budget
planner and its calibration (--budget-minutes, on a tiny image folder built here), and the
resumable one-job-at-a-time runner."""
import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tables():
    # importable by name: the jobs run in spawned processes, which import their functions by module
    # name (spawn hands this sys.path to the children)
    folder = os.path.join(HERE, "..", "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module("prg_tables")
    finally:
        sys.path.remove(folder)


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch):
    """3 classes of 8x8 RGB PNGs: 12 training and 5 test images each (built here, never copied)."""
    from PIL import Image

    monkeypatch.setenv("PRG_FAST_CACHE", "0")
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 12), ("test", 5)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((8, 8, 3)) * 80 + 80 * c).astype(np.uint8)).save(d / f"{i}.png")
    return str(root)


def test_levels_parse(tables):
    assert tables.parse_levels("1,2,5,10,all") == [1, 2, 5, 10, None]
    for bad in ("0", "x", ""):
        with pytest.raises(ValueError, match="levels"):
            tables.parse_levels(bad)


def test_scarce_quick_plan(tables, tmp_path):
    a = tables.parse(["--table", "scarce", "--quick", "--out", str(tmp_path)])
    assert a.levels == [1, None] and a.seeds == [0, 1] and a.paths == ["otcfm"] and a.figure is None
    plan = tables.build_scarce_plan(a, num_classes=10)
    names = [j["name"] for j in plan]
    assert len(names) == len(set(names))
    for j in plan:  # every job comes after the jobs it needs (the one-at-a-time runner relies on it)
        assert all(names.index(d) < names.index(j["name"]) for d in j["after"])
    ft = {j["name"]: j["spec"] for j in plan if j["kind"] == "finetune"}
    assert set(ft) == {f"{r}-n{n}-s{s}" for r in ("ft-otcfm", "head-otcfm", "scratch") for n in ("1", "all") for s in (0, 1)}
    one = ft["ft-otcfm-n1-s1"]
    assert one["labels_per_class"] == 1 and one["labels_seed"] == 1 and one["seed"] == 1
    assert one["batch_size"] == 10  # the whole labelled subset when it is smaller than the batch
    assert ft["scratch-nall-s0"]["labels_per_class"] is None and ft["scratch-nall-s0"]["batch_size"] == a.batch_size
    assert ft["head-otcfm-n1-s0"]["freeze_flow"] and ft["scratch-n1-s0"]["from_scratch"]
    # every row at (N, seed) sees the same labelled images
    for n in ("1", "all"):
        for s in (0, 1):
            keys = {(ft[f"{r}-n{n}-s{s}"]["labels_per_class"], ft[f"{r}-n{n}-s{s}"]["labels_seed"])
                    for r in ("ft-otcfm", "head-otcfm", "scratch")}
            assert len(keys) == 1
    # the full digits defaults: 5 levels x 3 seeds, two paths
    full = tables.parse(["--table", "scarce", "--out", str(tmp_path)])
    assert full.levels == [1, 2, 5, 10, None] and full.seeds == [0, 1, 2] and full.paths == ["otcfm", "gvp"]
    assert (full.pretrain_steps, full.finetune_steps, full.batch_size, full.ode_steps) == (750, 80, 32, 2)
    # the paper tables keep their recorded settings
    main = tables.parse(["--out", str(tmp_path)])
    assert (main.pretrain_steps, main.finetune_steps, main.batch_size, main.ode_steps) == (1500, 250, 64, 4)
    assert main.paths == ["gvp", "icfm", "otcfm"] and main.table == "main"


def test_paired_difference(tables):
    d, se, ok = tables.paired_difference([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert d == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12) and ok
    d, se, ok = tables.paired_difference([0.5, 0.7, 0.5], [0.6, 0.5, 0.5])
    assert d == pytest.approx(0.1 / 3) and not ok  # sd of (-0.1, 0.2, 0) is large against the mean


def test_plan_budget_fits_and_scales(tables):
    kw = dict(pretrain_rate=10.0, finetune_rate=4.0, eval_s=5.0, overhead_s=10.0, levels=[None, 10, 100], seeds=[0],
              rows=["ft-otcfm", "scratch"])
    small = tables.plan_budget(600, **kw)
    big = tables.plan_budget(1200, **kw)
    for p in (small, big):
        assert p["predicted_s"] <= p["budget_s"] + 1e-9
        assert p["pretrain_runs"] == 1 and p["finetune_runs"] == 2 * len(p["levels"])
        # what the plan predicts is what its step counts cost at the measured rates
        fixed = (p["pretrain_runs"] + p["finetune_runs"]) * 10.0 + p["finetune_runs"] * 5.0
        cost = fixed + p["pretrain_steps"] / 10.0 + p["finetune_runs"] * p["finetune_steps"] / 4.0
        assert cost <= p["budget_s"] and cost == pytest.approx(p["predicted_s"], abs=1.0)
        assert p["levels"] + p["dropped_levels"] == [None, 10, 100]  # admitted in the order given
    assert big["pretrain_steps"] > small["pretrain_steps"]
    assert len(big["levels"]) >= len(small["levels"])
    # with little time the label-scarce levels are dropped first, the full-label rows kept
    tight = tables.plan_budget(90, **kw)
    assert tight["levels"] == [None] and tight["dropped_levels"] == [10, 100]
    # two paths share the pretraining time
    two = tables.plan_budget(1200, **{**kw, "rows": ["ft-otcfm", "ft-gvp", "scratch"]})
    assert two["pretrain_runs"] == 2 and two["predicted_s"] <= 1200 + 1e-9
    with pytest.raises(ValueError, match="does not fit even one level"):
        tables.plan_budget(30, **kw)
    with pytest.raises(ValueError, match="pretrain_rate"):
        tables.plan_budget(600, **{**kw, "pretrain_rate": 0.0})


@pytest.mark.slow
def test_budget_calibrates_once_and_plans_within_the_budget(tables, tiny_folder, tmp_path, capsys):
    torch.set_num_threads(1)
    out = str(tmp_path / "budget")
    args = ["--data", f"folder:{tiny_folder}", "--budget-minutes", "3", "--batch-size", "8", "--pretrain-batch-size",
            "8", "--ode-steps", "1", "--calibration-steps", "2", "--levels", "all,2,4", "--device", "cpu", "--out", out,
            "--plan-only"]
    assert tables.main(args) == 0
    plan = json.load(open(os.path.join(out, "budget.json")))
    cal = plan["calibration"]
    assert cal["pretrain_steps_per_s"] > 0 and cal["finetune_steps_per_s"] > 0 and cal["eval_s"] > 0
    assert plan["predicted_s"] <= 3 * 60 - plan["calibration_s"] + 1e-6
    assert plan["pretrain_steps"] >= 50 and plan["finetune_steps"] >= 20 and plan["levels"][0] is None
    assert plan["rows"] == ["ft-otcfm", "scratch"] and plan["seeds"] == [0]
    # calibration leaves real runs behind (a resumed segment each)
    assert json.load(open(os.path.join(out, "calibrate", "finetune", "metrics.json")))["resumed_from_step"] == 2
    # a later command reuses the plan (same step counts for the resumed runs) ...
    mtime = os.path.getmtime(os.path.join(out, "budget.json"))
    capsys.readouterr()
    assert tables.main(args) == 0
    assert "reusing the plan" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "budget.json")) == mtime
    # ... and refuses other arguments
    with pytest.raises(SystemExit, match="was planned for"):
        tables.main([x if x != "3" else "5" for x in args])


@pytest.mark.slow
def test_session_runner_resumes_and_stops_at_the_deadline(tables, tiny_folder, tmp_path):
    import time

    out = str(tmp_path / "sessions")
    plan = [{"name": "probe-pixels", "kind": "probe_scarce", "after": [],
             "spec": dict(data=f"folder:{tiny_folder}", features=None, levels=[1, None], seeds=[0, 1])}]
    with pytest.raises(tables.OutOfTime):  # no time left: nothing starts
        tables.run_plan_sessions(plan, 1, out, deadline=time.monotonic() - 1)
    assert not os.listdir(os.path.join(out, "results"))
    r = tables.run_plan_sessions(plan, 1, out, deadline=None)
    assert set(r["probe-pixels"]["top1"]) == {"1/0", "1/1", "all/0", "all/1"}
    # done jobs are read back, not run again (even when the time is up)
    again = tables.run_plan_sessions(plan, 1, out, deadline=time.monotonic() - 1)
    assert again == r
