"""prg_fast.training.runs: the shared run-time (RunDir, atomic writes, schedule, batch order); and old
(v1) run directories still resume.

data/pretrain_checkpoint_v1_schema.json was recorded from a checkpoint written by the code at commit
6114c69 (before training/ existed): every key and value type. data/v1_pretrain and data/v1_finetune
are run directories written by the code of commit 783dfbf (the last before the trainers used
LambdaLR and AveragedModel), with the "tiny" preset shrunk to 4 channels to keep them small;
data/v1_step3_expected.pt holds the weights that same old code reached when it resumed them for one
more step (data/make_v1_run_dirs.py wrote all three): today's code must reach them to float32
rounding of that step on any machine's vector path (see STEP_BITS below)."""
import json
import os
import shutil

import pytest
import torch

from prg_fast.models import unet
from prg_fast.training.finetune import finetune
from prg_fast.training.pretrain import PretrainConfig, load_checkpoint, pretrain
from prg_fast.training.distributed import init_distributed
from prg_fast.training.rundir import CheckpointError, RunDir, atomic_write
from prg_fast.training.runs import StepBatches, cosine_factor, lr_schedule

HERE = os.path.dirname(__file__)
QUICK = dict(data="digits", path="otcfm", model="tiny", batch_size=32, lr=1e-3, warmup=0, log_every=4,
             num_samples=4, sample_steps=2, progress=False, device="cpu")


def _schema(ckpt):
    def rec(o):
        if isinstance(o, dict) and all(isinstance(k, str) for k in o):
            return {k: rec(v) for k, v in o.items()}
        return type(o).__name__
    s = {k: type(v).__name__ for k, v in ckpt.items()}
    for k in ("args", "model_config"):
        s[k] = rec(ckpt[k])
    s["rng"] = [rec(r) for r in ckpt["rng"]]
    return s


# arguments pretrain has gained since the v1 schema was recorded, with their value type: a v1 reader
# ignores them, and a v1 run directory that lacks them resumes with their default (the v1 resume tests)
ARGS_ADDED_SINCE_V1 = {"prediction": "str"}  # issue 23: --prediction velocity|epsilon|v


def test_v1_run_directory_has_the_old_structure_and_resumes(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    pretrain(PretrainConfig(**QUICK, steps=2, out=out))
    raw = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    with open(os.path.join(HERE, "data", "pretrain_checkpoint_v1_schema.json")) as f:
        old = json.load(f)
    old["args"].update(ARGS_ADDED_SINCE_V1)
    assert _schema(raw) == old
    resumed = pretrain(PretrainConfig(**QUICK, steps=3, out=out))
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.step == 3
    assert load_checkpoint(out)["step"] == 3


def test_atomic_write_replaces_or_keeps(tmp_path):
    p = str(tmp_path / "f.bin")
    atomic_write(p, lambda f: f.write(b"one"))
    try:
        atomic_write(p, lambda f: (f.write(b"torn"), 1 / 0))
    except ZeroDivisionError:
        pass
    assert open(p, "rb").read() == b"one" and os.listdir(tmp_path) == ["f.bin"]


def test_step_batches_are_a_function_of_seed_and_step():
    ctx = init_distributed("cpu")
    data = list(range(100))
    a, b = StepBatches(data, ctx, 0, 10, 10), StepBatches(data, ctx, 0, 10, 10)
    assert [a(s) for s in (0, 5, 11, 3)] == [b(s) for s in (0, 5, 11, 3)]
    assert a(0) != StepBatches(data, ctx, 1, 10, 10)(0)
    assert sorted(sum((a(s) for s in range(10)), [])) == data


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = str(tmp_path / "g.bin")
        atomic_write(p, lambda f: f.write(b"x"))
        assert os.stat(p).st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(p, lambda f: f.write(b"y"))
        assert os.stat(p).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_pretrain_says_when_warmup_outlasts_the_run(tmp_path, capsys):
    torch.set_num_threads(1)
    pretrain(PretrainConfig(**{**QUICK, "warmup": 10}, steps=1, out=str(tmp_path / "w")))
    err = capsys.readouterr().err
    assert "warm-up (10 steps) is longer than the run (1 steps)" in err and "peaks at 0.0001" in err


# -------------------------------------------------------------------------------------------------
# v1 run directories written by the old code resume, and reach exactly the old code's next step

SMALL = dict(model_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=1,
             dropout=0.0, use_scale_shift_norm=True, norm_groups=2)


@pytest.fixture
def v1_dirs(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setitem(unet.PRESETS, "tiny", SMALL)
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    shutil.copytree(os.path.join(HERE, "data", "v1_pretrain"), pre)
    shutil.copytree(os.path.join(HERE, "data", "v1_finetune"), ft)
    # the finetuning run names its pretraining directory by absolute path (where it was written):
    # point it at the copy, the one change made to the old file
    ck = torch.load(os.path.join(ft, "checkpoint.pt"), weights_only=True)
    ck["args"]["checkpoint"] = pre
    torch.save(ck, os.path.join(ft, "checkpoint.pt"))
    expected = torch.load(os.path.join(HERE, "data", "v1_step3_expected.pt"), weights_only=True)
    return pre, ft, expected


# How close "the old code's next step" can be asked to be. The resumed state is loaded bit for bit,
# so the one thing that differs between machines is the float32 arithmetic of the step itself:
# ATen's vectorised kernels (AVX2, AVX-512, NEON, or none under ATEN_CPU_CAPABILITY=default) sum the
# convolutions, matmuls and reductions of the forward and backward in different orders. Such a
# reordering changes a sum of n float32 terms by up to about n * 2^-24 of the sum of their
# magnitudes; Adam then divides each gradient by its own running scale, so the relative rounding of
# a small, cancelling gradient component reaches the update undamped. Measured between AVX2 and
# ATEN_CPU_CAPABILITY=default on these fixtures, each tensor's update (w3 - w2) differs by at most
# 1.5e-5 ~ 2^-16 of its norm (2^8 rounding units: reductions of a few hundred terms), and the loss by
# 2^-24. We ask for agreement to STEP_BITS = 10 bits of every tensor's update, plus the rounding of
# the new weight itself (half an ulp, 2^-24 |w3| per element): 64x above what reordering produced,
# and some 1000x below what any real change to the step produces (another batch, RNG stream,
# learning rate, clipping or optimizer state each move the update by O(1) of itself).
STEP_BITS = 10


def _assert_same_step(new, old, before):
    """new and old: weights after the resumed step; before: the weights both resumed from."""
    assert new.keys() == old.keys()
    for k in new:
        if not old[k].is_floating_point():
            torch.testing.assert_close(new[k], old[k], rtol=0, atol=0, msg=k)
            continue
        a, b, w2 = new[k].double(), old[k].double(), before[k].double()
        bound = 2.0 ** -STEP_BITS * (b - w2).norm() + 2.0 ** -24 * b.norm()
        assert (a - b).norm() <= bound, f"{k}: differs from the old code's step by {(a - b).norm():.3g} > {bound:.3g}"


def _checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


def test_v1_pretraining_run_resumes_to_the_old_codes_next_step(v1_dirs):
    pre, _, expected = v1_dirs
    step2 = _checkpoint(pre)
    r = pretrain(data="digits", path="otcfm", model="tiny", steps=3, batch_size=16, lr=1e-3, warmup=0, log_every=1,
                 num_samples=1, sample_steps=1, progress=False, device="cpu", out=pre)
    assert r.metrics["resumed_from_step"] == 2 and r.step == 3
    _assert_same_step(r.model.state_dict(), expected["pretrain_model"], step2["model"])
    _assert_same_step(r.ema.state_dict(), expected["pretrain_ema"], step2["ema"])
    assert r.metrics["loss"] == pytest.approx(expected["pretrain_loss"], rel=2.0 ** -STEP_BITS, abs=0)
    assert load_checkpoint(pre)["step"] == 3  # and the new file reads with weights_only=True


def test_v1_finetuning_run_resumes_to_the_old_codes_next_step(v1_dirs):
    pre, ft, expected = v1_dirs
    step2 = _checkpoint(ft)
    r = finetune(data="digits", checkpoint=pre, steps=3, batch_size=16, ode_steps=2, log_every=1, eval_batch_size=512,
                 progress=False, device="cpu", out=ft)
    assert r.metrics["resumed_from_step"] == 2 and r.step == 3
    _assert_same_step(r.classifier.flow.state_dict(), expected["finetune_flow"], step2["flow"])
    _assert_same_step(r.classifier.head.state_dict(), expected["finetune_head"], step2["head"])
    # a test image whose two largest logits tie to rounding may flip: at most one of the 360
    assert abs(r.metrics["top1"] - expected["finetune_top1"]) <= 1 / 360 + 1e-12
    assert r.history[-1][5] == expected["finetune_lr"]  # the schedule is exact Python float arithmetic
    torch.load(os.path.join(ft, "checkpoint.pt"), weights_only=True)


# -------------------------------------------------------------------------------------------------
# RunDir and the schedule


def test_run_dir_refuses_a_foreign_checkpoint_and_other_arguments(tmp_path):
    a = RunDir(str(tmp_path), "prg_fast.acmd", 1, "acmd")
    assert a.claim() is None
    a.save({"step": 1, "args": {"lr": 0.1}})
    ck = a.claim()
    assert ck["format"] == "prg_fast.acmd" and ck["version"] == 1 and ck["step"] == 1
    assert "torch_version" in ck
    with pytest.raises(CheckpointError, match="already holds a 'prg_fast.acmd' checkpoint"):
        RunDir(str(tmp_path), "prg_fast.bcmd", 1, "bcmd").claim()
    with pytest.raises(CheckpointError, match="version 1"):
        RunDir(str(tmp_path), "prg_fast.acmd", 0, "acmd").claim()
    with pytest.raises(CheckpointError, match="lacks the entries"):
        RunDir(str(tmp_path), "prg_fast.acmd", 1, "acmd", required=("step", "weights")).claim()
    with pytest.raises(CheckpointError, match="lr=0.1.*lr=0.2"):
        a.check_resume(ck, {"lr": 0.2}, ["lr"])
    a.check_resume(ck, {"lr": 0.1, "other": 3}, ["lr"])


def test_run_dir_files_and_the_non_main_rank(tmp_path):
    a = RunDir(str(tmp_path / "r"), "k", 1, "cmd")
    a.write_json("metrics.json", {"top1": 0.5})
    a.write_log(["step", "loss"], [[1, 0.5], [2, 0.25]])
    assert json.load(open(tmp_path / "r" / "metrics.json")) == {"top1": 0.5}
    assert open(tmp_path / "r" / "log.csv").read().split() == ["step,loss", "1,0.5", "2,0.25"]
    quiet = RunDir(str(tmp_path / "q"), "k", 1, "cmd", main=False)
    quiet.save({"step": 1})
    quiet.write_json("metrics.json", {})
    assert not os.path.exists(tmp_path / "q")


@pytest.mark.parametrize("schedule, warmup, floor", [("cosine", 3, 0.0), ("cosine", 0, 0.1), ("constant", 4, 0.0)])
@pytest.mark.parametrize("start", [0, 5])
def test_lr_schedule_is_the_warmup_cosine_rule_and_resumes(schedule, warmup, floor, start):
    def rule(s):
        if schedule == "cosine":
            return cosine_factor(s, 10, warmup, floor)
        return (s + 1) / warmup if warmup and s < warmup else 1.0

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5}], lr=0.5)
    opt.param_groups[0]["initial_lr"] = 0.5
    sched = lr_schedule(opt, 10, warmup, schedule=schedule, floor=floor, step=start)
    seen = []
    for _ in range(start, 10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.5 * rule(s) for s in range(start, 10)]
