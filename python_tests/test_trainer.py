"""prg_fast.training.trainer: the skeleton every trainer runs in. SIGINT / SIGTERM finish the step,
write a checkpoint and stop with a distinct exit status (130 / 143); the resumed run equals an
uninterrupted one bitwise; a second signal aborts at once; log.csv and a running metrics.json are
written every --log-every steps; checkpoints are also taken by wall time (--ckpt-minutes).

The command-line cases drive real `python -m prg_fast` processes and signal them once log.csv shows
a few finished steps; repfusion and genrep are signalled in-process at a chosen step (a real signal
through the real handler, sent by the process to itself)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import prg_fast.related.genrep as gr
import prg_fast.related.repfusion as rf
from prg_fast.training.checkpoints import load_checkpoint, load_finetune_checkpoint
from prg_fast.training.finetune import finetune
from prg_fast.training.pretrain import pretrain
from prg_fast.training.trainer import Interrupted, StopRequests

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRETRAIN = dict(data="digits", path="otcfm", model="tiny", batch_size=16, lr=1e-3, warmup=0, log_every=1,
                ckpt_every=1000, num_samples=1, sample_steps=1, progress=False, device="cpu")
FINETUNE = dict(data="digits", batch_size=16, ode_steps=1, log_every=1, ckpt_every=1000, schedule="constant", warmup=0,
                eval_batch_size=512, progress=False, device="cpu")


def _flags(kwargs):
    out = []
    for k, v in kwargs.items():
        if v is False and k == "progress":
            out.append("--no-progress")
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _assert_same(a, b, where=""):
    """Bitwise equality of nested state (state_dicts, optimizer states)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _interrupt_cli(args, out, signum):
    """Start `python -m prg_fast ARGS`; signal it once DIR/log.csv shows a few steps."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prg_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    return _signal_when_logged(proc, out, signum)


def _signal_when_logged(proc, out, signum, rows=3, timeout=180):
    """Wait until DIR/log.csv has `rows` steps, send `signum`; (exit status, stderr)."""
    log, deadline = os.path.join(out, "log.csv"), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isfile(log) and len(open(log).read().split()) > rows:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_a_first_signal_is_recorded_and_a_second_aborts_at_once():
    said = []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        with StopRequests(said.append) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and "SIGTERM: finishing this step" in said[0]
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    e = Interrupted("pretrain", signal.SIGINT, 3, "run/checkpoint.pt")
    assert isinstance(e, KeyboardInterrupt) and e.exit_code == 130 and "after step 3" in str(e)
    assert Interrupted("pretrain", signal.SIGTERM, 3, "x").exit_code == 143


@pytest.mark.slow
def test_pretrain_sigint_checkpoints_and_resumes_bitwise(tmp_path):
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    status, err = _interrupt_cli(["pretrain", *_flags({**PRETRAIN, "steps": 400, "out": run})], run, signal.SIGINT)
    assert status == 130, err
    assert "stopped by SIGINT after step" in err and "resume with: prg-fast pretrain" in err and "Traceback" not in err
    step = load_checkpoint(run)["step"]
    assert step >= 3
    # log.csv and the running metrics.json were kept up to date, step by step
    rows = list(csv.reader(open(os.path.join(run, "log.csv"))))
    assert rows[0] == ["step", "loss", "lr"] and [int(r[0]) for r in rows[1:]] == list(range(1, step + 1))
    progress = json.load(open(os.path.join(run, "metrics.json")))
    assert progress["status"] == "interrupted" and progress["step"] == step and progress["command"] == "pretrain"
    # resumed, it is the uninterrupted run (pretraining's schedule does not depend on --steps)
    resumed = pretrain(**PRETRAIN, steps=step + 2, out=run)
    full = pretrain(**PRETRAIN, steps=step + 2, out=ref)
    assert resumed.metrics["resumed_from_step"] == step
    a, b = load_checkpoint(run), load_checkpoint(ref)
    for key in ("model", "ema", "optimizer", "history", "rng"):
        _assert_same(a[key], b[key], key)
    assert resumed.metrics["loss_start"] == full.metrics["loss_start"]


@pytest.mark.slow
def test_finetune_sigterm_checkpoints_and_resumes_bitwise(pretrained, tmp_path):
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    args = {**FINETUNE, "checkpoint": pretrained}
    status, err = _interrupt_cli(["finetune", *_flags({**args, "steps": 400, "out": run})], run, signal.SIGTERM)
    assert status == 143, err
    assert "stopped by SIGTERM" in err and "resume with: prg-fast finetune" in err
    step = load_finetune_checkpoint(run)["step"]
    resumed = finetune(**args, steps=step + 1, out=run)
    full = finetune(**args, steps=step + 1, out=ref)
    assert resumed.metrics["resumed_from_step"] == step and resumed.metrics["top1"] == full.metrics["top1"]
    a, b = load_finetune_checkpoint(run), load_finetune_checkpoint(ref)
    for key in ("flow", "head", "optimizer", "history", "rng"):
        _assert_same(a[key], b[key], key)


def _signal_at(monkeypatch, cls, at_step, signum=signal.SIGINT):
    """Make `cls` send itself `signum` during step `at_step` (0-based)."""
    original = cls.train_step

    def train_step(self, step):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return original(self, step)

    monkeypatch.setattr(cls, "train_step", train_step)
    return original


@pytest.mark.parametrize("system", ["repfusion", "genrep"])
def test_related_systems_stop_cleanly_and_resume_bitwise(system, tiny_flow_checkpoint, tmp_path, monkeypatch):
    if system == "repfusion":
        run_fn, cls, keys = rf.repfusion, rf._RepFusion, ("student", "projection", "classifier", "distill_optimizer")
        args = dict(data="digits", batch_size=16, student="resnet-tiny", steps=4, finetune_steps=2, log_every=3)
    else:
        run_fn, cls, keys = gr.genrep, gr._GenRep, ("encoder", "projector", "optimizer")
        args = dict(data="digits", batch_size=8, encoder="resnet-tiny", pool=16, neighbors=1, ode_steps=1,
                    method="euler", probe_C=1.0, steps=5, log_every=3)
    args.update(checkpoint=tiny_flow_checkpoint, progress=False, device="cpu", ckpt_every=1000)
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    original = _signal_at(monkeypatch, cls, 1)  # mid log interval: the interval in progress is saved too
    with pytest.raises(Interrupted) as e:
        run_fn(**args, out=run)
    assert e.value.step == 2 and e.value.exit_code == 130
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["step"] == 2
    monkeypatch.setattr(cls, "train_step", original)
    resumed, full = run_fn(**args, out=run), run_fn(**args, out=ref)
    assert resumed.metrics["resumed_from_step"] == 2
    a = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(ref, "checkpoint.pt"), weights_only=True)
    for key in (*keys, "history", "rng"):
        _assert_same(a[key], b[key], key)
    assert resumed.metrics["top1"] == full.metrics["top1"]


def test_checkpoints_by_wall_time(tmp_path, monkeypatch):
    """--ckpt-minutes: a checkpoint as soon as that much time passed since the last one."""
    import itertools

    import prg_fast.training.trainer as trainer

    clock = itertools.count(0.0, 50.0)  # 50 s per reading: a minute passes every step or two
    monkeypatch.setattr(trainer.Trainer, "clock", staticmethod(lambda: next(clock)))
    saved = []
    original = trainer.Trainer.save

    def save(self, **final):
        saved.append(self.step)
        return original(self, **final)

    monkeypatch.setattr(trainer.Trainer, "save", save)
    pretrain(**{**PRETRAIN, "log_every": 100}, steps=5, out=str(tmp_path / "t"), ckpt_minutes=1)
    assert saved[:-1] and saved[-1] == 5 and all(s < 5 for s in saved[:-1])
    saved.clear()
    pretrain(**{**PRETRAIN, "log_every": 100}, steps=5, out=str(tmp_path / "u"), ckpt_minutes=0)
    assert saved == [5]  # 0: by step count only


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_sigint_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """Ctrl-C reaches torchrun, which forwards SIGINT to each worker: the ranks agree on a step,
    take the checkpoint together, and the run resumes under torchrun."""
    run = str(tmp_path / "run")
    flags = _flags({**PRETRAIN, "steps": 400, "out": run})
    launcher = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "prg_fast", "pretrain"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launcher, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    status, err = _signal_when_logged(proc, run, signal.SIGINT)
    assert status != 0 and "stopped by SIGINT after step" in err and "under the same torchrun line" in err, err[-3000:]
    ckpt = load_checkpoint(run)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] >= 3
    steps = ckpt["step"] + 1
    flags[flags.index("--steps") + 1] = str(steps)
    proc = subprocess.run([*launcher, *flags], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(run)["step"] == steps


def test_genrep_stopped_while_generating_views_continues_the_pool(tiny_flow_checkpoint, tmp_path, monkeypatch):
    args = dict(data="digits", checkpoint=tiny_flow_checkpoint, batch_size=8, encoder="resnet-tiny", pool=16,
                neighbors=1, ode_steps=1, method="euler", gen_batch_size=8, probe_C=1.0, steps=2, progress=False,
                device="cpu", out=str(tmp_path / "run"))
    original = gr._GenRep._generate_chunk

    def chunk(self, state, done, n):
        if done == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, state, done, n)

    monkeypatch.setattr(gr._GenRep, "_generate_chunk", chunk)
    with pytest.raises(Interrupted) as e:
        gr.genrep(**args)
    assert e.value.checkpoint.endswith("views.pt")
    assert torch.load(e.value.checkpoint, weights_only=True)["done"] == 8  # the chunk in progress finished
    monkeypatch.setattr(gr._GenRep, "_generate_chunk", original)
    assert gr.genrep(**args).metrics["step"] == 2  # the same --out continues: its metrics.json names genrep


@pytest.mark.parametrize("system", ["pretrain", "genrep"])
def test_a_log_interval_cut_by_a_checkpoint_adds_up_as_the_uninterrupted_one(system, tiny_flow_checkpoint, tmp_path,
                                                                              monkeypatch):
    """Stopped after the 2nd step of a 5-step log interval: the resumed run sums the interval's other
    three steps onto the saved partial sum in the uninterrupted run's order, so its log row is the
    same to the bit (not (l0 + l1) + (l2 + l3 + l4), which rounds differently)."""
    import prg_fast.training.pretrain as pt

    if system == "pretrain":
        run_fn, cls, args = pretrain, pt._Pretrainer, dict(PRETRAIN, steps=5, log_every=5)
    else:
        run_fn, cls = gr.genrep, gr._GenRep
        args = dict(data="digits", batch_size=8, encoder="resnet-tiny", pool=16, neighbors=1, ode_steps=1,
                    method="euler", probe_C=1.0, steps=5, log_every=5, checkpoint=tiny_flow_checkpoint,
                    progress=False, device="cpu", ckpt_every=1000)
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    original = _signal_at(monkeypatch, cls, 1)
    with pytest.raises(Interrupted):
        run_fn(**args, out=run)
    monkeypatch.setattr(cls, "train_step", original)
    resumed, full = run_fn(**args, out=run), run_fn(**args, out=ref)
    assert resumed.metrics["resumed_from_step"] == 2 and len(full.history) == 1
    assert resumed.history == full.history  # floats compared exactly
