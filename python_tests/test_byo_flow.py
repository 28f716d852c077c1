"""Bring your own flow: pretrain / finetune / evaluate take any nn.Module called as model(t, x); a
network written in torchcfm's convention (t = 0 is noise) runs behind prg_fast.time_reversed; the
command line builds one from --model package.module:factory and --weights FILE."""
import copy
import json
import os

import numpy as np
import pytest
import torch

import prg_fast
from prg_fast import cli
from prg_fast.data import load_data
from prg_fast.losses import flow_matching_loss
from prg_fast.paths import get_path
from prg_fast.training.checkpoints import build_classifier, load_finetune_checkpoint
from prg_fast.training.evaluate import evaluate, extract
from prg_fast.training.finetune import finetune
from prg_fast.training.pretrain import CheckpointError, build_model, load_checkpoint, pretrain
from prg_fast.training.distributed import init_distributed
from prg_fast.training.runs import StepBatches, rank_seed, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


class CFMNet(torch.nn.Module):
    """A velocity network as torchcfm users write them: t = 0 is noise, t = 1 is data; called
    model(t, x) with t of shape (B,). Two convolutions with a time embedding."""

    def __init__(self, channels: int = 1, hidden: int = 8):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = torch.nn.Linear(1, hidden)
        self.out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, t, x):
        h = self.inp(x) + self.time(t[:, None].to(x.dtype))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def make_net() -> CFMNet:
    """The factory the command line names as test_byo_flow:make_net."""
    return CFMNet()


QUICK = dict(data="digits", path="icfm", batch_size=16, lr=1e-3, warmup=0, log_every=1, num_samples=1,
             sample_steps=1, progress=False, device="cpu")


@pytest.mark.parametrize("convention", ["torchcfm", "prg"])
def test_pretrain_trains_the_network_in_its_own_time_convention(tmp_path, convention):
    torch.manual_seed(1)
    net = CFMNet()
    start = copy.deepcopy(net)
    r = pretrain(steps=2, out=str(tmp_path / "pre"), model=net, time_convention=convention, **QUICK)
    assert r.model is net and any(not torch.equal(a, b) for a, b in zip(net.parameters(), start.parameters()))
    # the first logged loss is the flow-matching loss of the network seen in prg_fast's time: for
    # torchcfm's convention v'(t, x) = -v(1 - t, x), else the network itself
    seed_everything(rank_seed(0, 0))
    data = load_data("digits", "train")
    x, _ = data.batch(StepBatches(data, init_distributed("cpu"), 0, 16, 16)(0))
    seen = prg_fast.time_reversed(start) if convention == "torchcfm" else start
    other = start if convention == "torchcfm" else prg_fast.time_reversed(start)
    state = torch.get_rng_state()
    with torch.no_grad():
        expected = float(flow_matching_loss(seen, x, get_path("icfm"), eps=1e-5))
        torch.set_rng_state(state)
        wrong = float(flow_matching_loss(other, x, get_path("icfm"), eps=1e-5))
    assert r.history[0][1] == pytest.approx(expected, rel=1e-6) and abs(wrong - expected) > 1e-3 * abs(expected)
    ckpt = load_checkpoint(str(tmp_path / "pre"))
    assert ckpt["model_config"] is None and ckpt["time_convention"] == convention
    assert ckpt["model_class"].endswith("CFMNet") and ckpt["preset"] is None
    with pytest.raises(CheckpointError, match="pass model="):
        build_model(ckpt)
    rebuilt = build_model(ckpt, ema=False, model=CFMNet())
    for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def test_finetune_classifies_through_the_reversed_network(tmp_path):
    torch.manual_seed(2)
    net = CFMNet()
    r = finetune(data="digits", out=str(tmp_path / "ft"), steps=2, batch_size=16, ode_steps=2, log_every=1,
                 progress=False, device="cpu", model=net, time_convention="torchcfm")
    ckpt = load_finetune_checkpoint(str(tmp_path / "ft"))
    assert ckpt["model_config"] is None and ckpt["time_convention"] == "torchcfm" and ckpt["pretrain"] is None
    clf = build_classifier(ckpt, model=CFMNet())
    x, _ = load_data("digits", "test").batch(list(range(6)))
    with torch.no_grad():
        # the features are net integrated from data to noise in prg_fast's time: reverse of time_reversed(net)
        z = prg_fast.reverse(prg_fast.time_reversed(net), x, 1.0, steps=2, method="euler", adjoint=False)
        assert torch.equal(clf.features(x), z)
        assert not torch.allclose(prg_fast.reverse(net, x, 1.0, steps=2, method="euler", adjoint=False), z)
    assert evaluate(str(tmp_path / "ft"), "digits", model=CFMNet())["top1"] == r.metrics["top1"]
    # extract from Python with the network given: the features are those same reversed states
    meta = extract(str(tmp_path / "ft"), "digits", str(tmp_path / "feat"), model=CFMNet(), device="cpu")
    assert meta["t"] == 1.0 and meta["ode_steps"] == 2
    with np.load(tmp_path / "feat" / "features.npz") as f:
        torch.testing.assert_close(torch.from_numpy(f["test_features"][:6]), z.flatten(1).float())


def test_command_line_model_factory_and_weights(tmp_path, capsys):
    torch.manual_seed(3)
    weights = str(tmp_path / "w.pt")
    torch.save(make_net().state_dict(), weights)
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    assert cli.main(["pretrain", "--data", "digits", "--model", "test_byo_flow:make_net", "--weights", weights,
                     "--time-convention", "torchcfm", "--steps", "2", "--batch-size", "16", "--out", pre,
                     "--no-progress", "--num-samples", "1", "--sample-steps", "1", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model"] == "test_byo_flow:make_net"
    assert load_checkpoint(pre)["preset"] == "test_byo_flow:make_net"
    # finetune starts from that run: the factory builds the network, the checkpoint fills its weights
    assert cli.main(["finetune", "--data", "digits", "--checkpoint", pre, "--model", "test_byo_flow:make_net",
                     "--time-convention", "torchcfm", "--steps", "2", "--batch-size", "16", "--ode-steps", "2",
                     "--out", ft, "--no-progress", "--device", "cpu"]) == 0
    top1 = json.loads(capsys.readouterr().out.splitlines()[-1])["top1"]
    assert cli.main(["evaluate", "--data", "digits", "--checkpoint", ft, "--model", "test_byo_flow:make_net",
                     "--out", str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
    assert json.load(open(os.path.join(tmp_path, "ev", "metrics.json")))["top1"] == top1
    # a checkpoint saved in torchcfm's convention refuses to be finetuned as if it were in prg_fast's
    assert cli.main(["finetune", "--data", "digits", "--checkpoint", pre, "--model", "test_byo_flow:make_net",
                     "--steps", "2", "--out", str(tmp_path / "ft2"), "--no-progress", "--device", "cpu"]) == 2
    assert "time_convention='torchcfm'" in capsys.readouterr().err
    assert cli.main(["pretrain", "--data", "digits", "--model", "no_such_module:make", "--out", pre]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
