"""prg_fast.training.pretrain / `prg-fast pretrain`: the loss falls on digits, files are written as documented,
resume reproduces an uninterrupted run bitwise, bad checkpoints give clear errors, and two gloo
processes (DistributedDataParallel) keep identical replicas."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import prg_fast.training.pretrain as T
import prg_fast.training.trainer as trainer
from prg_fast.cli import main
from prg_fast.training.pretrain import CheckpointError, PretrainConfig, build_model, load_checkpoint, pretrain

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


QUICK = dict(data="digits", path="otcfm", model="tiny", batch_size=32, lr=1e-3, warmup=0, log_every=4,
             num_samples=4, sample_steps=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run, shared by the tests that only read its outputs."""
    out = str(tmp_path_factory.mktemp("pretrain") / "run")
    result = pretrain(PretrainConfig(**{**QUICK, "batch_size": 64, "log_every": 10}, steps=60, out=out))
    return out, result


@pytest.mark.slow
def test_loss_decreases_on_digits(trained):
    out, result = trained
    losses = [h[1] for h in result.history]
    assert len(losses) == 6 and result.step == 60
    assert losses[-1] < 0.75 * losses[0], losses


def test_run_directory_contents(trained):
    out, result = trained
    assert sorted(f for f in os.listdir(out)) == ["checkpoint.pt", "log.csv", "metrics.json", "samples.png"]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())  # one flat object
    assert metrics["loss"] == result.history[-1][1] and metrics["loss_start"] > metrics["loss"]
    for arg in ("data", "path", "model", "steps", "batch_size", "lr", "seed", "out"):
        assert arg in metrics
    assert metrics["step"] == 60 and metrics["path"] == "otcfm" and metrics["world_size"] == 1
    with Image.open(os.path.join(out, "samples.png")) as im:
        assert im.format == "PNG" and im.size[0] >= 2 * 8
    rows = open(os.path.join(out, "log.csv")).read().split()
    assert rows[0] == "step,loss,lr" and len(rows) == 7


def test_loss_start_is_the_first_steps_loss_also_in_a_run_shorter_than_a_log_interval(tmp_path):
    every_step = pretrain(PretrainConfig(**{**QUICK, "log_every": 1}, steps=2, out=str(tmp_path / "a")))
    short = pretrain(PretrainConfig(**{**QUICK, "log_every": 4}, steps=2, out=str(tmp_path / "b")))
    # one log row at the end (the mean of both steps' losses, summed in float32)
    assert len(short.history) == 1 and short.history[0][0] == 2
    assert short.history[0][1] == pytest.approx((every_step.history[0][1] + every_step.history[1][1]) / 2, rel=1e-6)
    assert short.metrics["loss_start"] == every_step.history[0][1] != short.metrics["loss"]


def test_checkpoint_keys_match_the_documented_format(trained):
    out, _ = trained
    ckpt = load_checkpoint(out)
    own = T.__doc__.split("Checkpoint entries")[1].split("Randomness:")[0]
    common = trainer.__doc__.split("The checkpoint (")[1].split("Stopping:")[0]  # every trainer's entries
    documented = set(re.findall(r"^    (\w+)\s{2,}", own + common, flags=re.M))
    assert documented == set(ckpt), documented ^ set(ckpt)
    assert ckpt["preset"] == "tiny" and ckpt["in_channels"] == 1 and ckpt["image_size"] == 8
    assert ckpt["path"] == {"name": "otcfm", "sigma": 0.0} and ckpt["data"] == "digits" and ckpt["num_classes"] == 10
    # what finetuning needs: the network rebuilt from the checkpoint alone, EMA weights loaded
    model = build_model(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k])
    assert not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full = pretrain(PretrainConfig(**QUICK, steps=12, ckpt_every=6, out=str(tmp_path / "full")))
    part = pretrain(PretrainConfig(**QUICK, steps=6, out=str(tmp_path / "split")))
    assert part.step == 6
    resumed = pretrain(PretrainConfig(**QUICK, steps=12, out=str(tmp_path / "split")))
    assert resumed.metrics["resumed_from_step"] == 6 and resumed.step == 12
    for name in ("model", "ema", "optimizer"):
        a = load_checkpoint(str(tmp_path / "full"))[name]
        b = load_checkpoint(str(tmp_path / "split"))[name]
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]) if isinstance(flat_a[k], torch.Tensor) else flat_a[k] == flat_b[k], (name, k)
    # and the test can fail: a different seed gives different weights
    other = pretrain(PretrainConfig(**QUICK, steps=12, seed=1, out=str(tmp_path / "other")))
    assert not torch.equal(other.model.out[2].weight, full.model.out[2].weight)
    # a finished run asked for the same number of steps trains nothing
    again = pretrain(PretrainConfig(**QUICK, steps=12, out=str(tmp_path / "full")))
    assert again.metrics["resumed_from_step"] == 12 and again.step == 12


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix: obj}


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path, trained):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        pretrain(PretrainConfig(**QUICK, steps=2, out=str(out)))
    # truncated (a crash while copying, a full disk)
    data = open(os.path.join(trained[0], "checkpoint.pt"), "rb").read()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(out))
    # some other torch file
    torch.save({"weights": torch.zeros(2)}, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a prg_fast pretraining checkpoint"):
        load_checkpoint(str(out))
    with pytest.raises(FileNotFoundError, match="no pretraining checkpoint"):
        load_checkpoint(str(tmp_path / "nowhere"))


def test_incompatible_checkpoint_is_refused(tmp_path, trained):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    with pytest.raises(CheckpointError, match="path='otcfm'.*path='icfm'"):
        pretrain(PretrainConfig(**{**QUICK, "batch_size": 64, "path": "icfm"}, steps=70, out=str(out)))
    with pytest.raises(CheckpointError, match="batch_size=64"):
        pretrain(PretrainConfig(**QUICK, steps=70, out=str(out)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        pretrain(PretrainConfig(**QUICK, steps=0, out="unused"))
    with pytest.raises(ValueError, match="model must be a UNet preset"):
        pretrain(PretrainConfig(**{**QUICK, "model": "resnet"}, steps=1, out="unused"))
    with pytest.raises(ValueError, match="bf16 autocast is for CUDA"):
        pretrain(PretrainConfig(**QUICK, steps=1, bf16=True, out="unused"))
    with pytest.raises(ValueError, match="larger than the data set"):
        pretrain(PretrainConfig(**{**QUICK, "batch_size": 5000}, steps=1, out="unused"))


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    code = main(["pretrain", "--data", "digits", "--path", "icfm", "--model", "tiny", "--steps", "3", "--batch-size", "16",
                 "--out", out, "--no-progress", "--num-samples", "4", "--sample-steps", "1", "--device", "cpu"])
    assert code == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["step"] == 3 and metrics["path"] == "icfm" and metrics["batch_size"] == 16
    assert main(["pretrain", "--data", "svhn", "--out", out]) == 2
    assert "unknown DATA spec 'svhn'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", "digits", "--out", out, "--steps", "0"])
    assert e.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err
    assert main(["info"]) == 0
    assert "cpu ops" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "prg_fast", "pretrain", "--data", "digits", "--out", "x",
                           "--path", "diffusion"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'diffusion'" in proc.stderr


# -------------------------------------------------------------------------------------------------
# distributed: two CPU processes, gloo on localhost


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores
    res = pretrain(PretrainConfig(**QUICK, steps=5, ckpt_every=3, out=out))
    torch.save({"model": res.model.state_dict(), "ema": res.ema.state_dict(), "metrics": res.metrics},
               os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_replicas(tmp_path, free_port):
    out, results = str(tmp_path / "ddp"), str(tmp_path / "results")
    os.makedirs(results)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port, out, results), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    for part in ("model", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # it trained (weights moved away from the zero-initialised output layer)
    assert r0["model"]["out.2.weight"].abs().sum() > 0
    # rank 0 wrote the run directory; no temporary files left behind
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.csv", "metrics.json", "samples.png"]
    ckpt = load_checkpoint(out)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 5
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # different noise per rank
    for k, v in r0["model"].items():
        assert torch.equal(ckpt["model"][k], v)
    assert json.load(open(os.path.join(out, "metrics.json")))["world_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_command_line(tmp_path):
    out = str(tmp_path / "torchrun")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "prg_fast", "pretrain", "--data", "digits",
           "--model", "tiny", "--steps", "3", "--batch-size", "16", "--out", out, "--no-progress",
           "--num-samples", "4", "--sample-steps", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    # resume under torchrun continues from the checkpoint
    proc = subprocess.run(cmd[:cmd.index("--steps") + 1] + ["5"] + cmd[cmd.index("--steps") + 2:],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr and load_checkpoint(out)["step"] == 5
