"""prg_fast.training.runs: the shared run-time; and old (v1) pretraining run directories resume.

data/pretrain_checkpoint_v1_schema.json was recorded from a checkpoint written by the code at commit
6114c69 (before training/ existed; the checkpoint itself is 12 MB, too big to commit): every key and
value type. A checkpoint from today's code must have exactly that structure, so one written now is
a faithful stand-in for an old run directory, and resuming it must work."""
import json
import os

import torch

from prg_fast.training.pretrain import PretrainConfig, load_checkpoint, pretrain
from prg_fast.training.runs import StepBatches, atomic_write, init_distributed

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


def test_v1_run_directory_has_the_old_structure_and_resumes(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    pretrain(PretrainConfig(**QUICK, steps=2, out=out))
    raw = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    with open(os.path.join(HERE, "data", "pretrain_checkpoint_v1_schema.json")) as f:
        old = json.load(f)
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
