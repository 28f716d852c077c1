"""benchmarks/prg_tables.py: the label-scarce plan (--table scarce, --quick), the paired
differences of its table, and the ablations' plans (--table learn-t, --table prediction)."""
import importlib
import os
import sys

import pytest

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


def test_ablation_plans_keep_the_recorded_settings(tables, tmp_path):
    """--table learn-t and --table prediction run what learn_t.py and prediction_prg.py ran for
    RESULTS.md (the same finetune / pretrain arguments), now on the tables' job runner."""
    a = tables.parse(["--table", "learn-t", "--out", str(tmp_path)])
    plan = {j["name"]: j for j in tables.build_learn_t_plan(a)}
    assert plan["pretrain-otcfm"]["spec"]["steps"] == 750 and plan["pretrain-otcfm"]["spec"]["batch_size"] == 128
    assert len(plan) == 1 + 3 * 3 and a.seeds == [0, 1, 2]
    learned = plan["ft-learned-t0.5-s2"]
    assert learned["after"] == ["pretrain-otcfm"] and learned["spec"]["learn_t"] and learned["spec"]["seed"] == 2
    assert {k: learned["spec"][k] for k in ("steps", "batch_size", "ode_steps", "method", "t", "t_lr")} == dict(
        steps=150, batch_size=64, ode_steps=4, method="euler", t=0.5, t_lr=0.05)
    assert plan["ft-fixed-t1-s0"]["spec"]["t"] == 1.0 and "learn_t" not in plan["ft-fixed-t1-s0"]["spec"]
    b = tables.parse(["--table", "prediction", "--pretrain-steps", "400", "--finetune-steps", "80", "--out", str(tmp_path)])
    plan = {j["name"]: j["spec"] for j in tables.build_prediction_plan(b)}
    assert [plan[f"pretrain-gvp-{p}"]["prediction"] for p in ("velocity", "epsilon", "v")] == ["velocity", "epsilon", "v"]
    pre, ft = plan["pretrain-gvp-epsilon"], plan["ft-gvp-epsilon"]
    assert (pre["steps"], pre["batch_size"], pre["lr"], pre["warmup"], pre["path"]) == (400, 64, 5e-4, 100, "gvp")
    assert (ft["steps"], ft["batch_size"], ft["ode_steps"], ft["lr"], ft["beta"], ft["seed"]) == (80, 64, 4, 1e-3, 0.1, 0)
