"""GenRep-style learning from generated views (prg_fast.related.genrep): NT-Xent against a direct
formula, the truncated latent neighbours, the augmentations, short CPU runs, resume, bad inputs."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import prg_fast.related.genrep as gr
from prg_fast.related.common import CheckpointError, ViewAugment

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def pretrained(tiny_flow_checkpoint):
    return tiny_flow_checkpoint


QUICK = dict(data="digits", batch_size=32, encoder="resnet-tiny", pool=64, neighbors=2, ode_steps=2, method="euler",
             progress=False, device="cpu", log_every=5, probe_C=1.0)


# -------------------------------------------------------------------------------------------------
# the loss


def _nt_xent_direct(z1, z2, tau):
    """The SimCLR formula written out with loops, in float64."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        num = math.exp(float(z[i] @ z[j]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_direct_formula(tau):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert gr.nt_xent_loss(z1, z2, tau).item() == pytest.approx(_nt_xent_direct(z1, z2, tau), rel=1e-5)


def test_nt_xent_hand_checked_two_pairs():
    # two pairs of identical unit vectors, the pairs orthogonal: s(i, pos) = 1, s(i, other) = 0
    # l = -log(e^{1/tau} / (e^{1/tau} + 2 e^0)) for each of the 4 views
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))  # = log(1 + 2 e^-2) = 0.2395
    assert gr.nt_xent_loss(z1, z1.clone() * 3.0, tau).item() == pytest.approx(expected, rel=1e-6)  # scale-free
    # swapping the positives makes it much worse
    # swapped positives: the positive has similarity 0, one negative similarity 1
    assert gr.nt_xent_loss(z1, z1.flip(0), tau).item() == pytest.approx(-math.log(1 / (math.exp(2) + 2)), rel=1e-6)


def test_nt_xent_gradient_pulls_positives_together():
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8)
    before = F.cosine_similarity(z1, z2).mean().item()
    opt = torch.optim.Adam([z1], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        gr.nt_xent_loss(z1, z2, 0.1).backward()
        opt.step()
    after = F.cosine_similarity(z1, z2).mean().item()
    assert after > before + 0.5, (before, after)
    # every view now retrieves its own positive among the other views' partners
    sims = F.normalize(z1.detach(), dim=1) @ F.normalize(z2, dim=1).t()
    assert torch.equal(sims.argmax(dim=1), torch.arange(4))


def test_nt_xent_bad_inputs():
    with pytest.raises(ValueError, match="same|shape"):
        gr.nt_xent_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        gr.nt_xent_loss(torch.ones(1, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        gr.nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        gr.nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), float("nan"))


# -------------------------------------------------------------------------------------------------
# views


def test_neighbour_latents_are_truncated_at_two_sigma():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 1, 8, 8, generator=g)
    zn = gr.neighbour_latents(z, 0.2, 3, generator=g)
    assert zn.shape == (500, 3, 1, 8, 8)
    d = (zn - z[:, None]) / 0.2
    assert d.abs().max() <= 2.0 + 1e-5
    assert d.abs().max() > 1.9  # the tails are reached, not clipped away
    # the variance of N(0, 1) truncated at +-2: 1 - 2 * 2 * phi(2) / (2 Phi(2) - 1) = 0.7737
    phi = math.exp(-2) / math.sqrt(2 * math.pi)
    big_phi = 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    assert d.var().item() == pytest.approx(1 - 4 * phi / (2 * big_phi - 1), rel=0.02)
    assert abs(d.mean().item()) < 0.01
    torch.testing.assert_close(gr.neighbour_latents(z[:3], 0.0, 2), z[:3, None].expand(3, 2, 1, 8, 8))
    with pytest.raises(ValueError, match="sigma"):
        gr.neighbour_latents(z, -0.1)
    with pytest.raises(ValueError, match="sigma"):
        gr.neighbour_latents(z, float("inf"))


def test_view_augment_keeps_range_and_shape_and_varies():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    aug = ViewAugment(crop_scale=(0.5, 1.0))
    a, b = aug(x), aug(x)
    assert a.shape == x.shape and a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    assert not torch.allclose(a, b)
    # an identity configuration leaves images unchanged (the crop grid samples pixel centres)
    ident = ViewAugment(crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, jitter=0.0, grayscale_p=0.0)
    torch.testing.assert_close(ident(x), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="crop_scale"):
        ViewAugment(crop_scale=(0.0, 1.0))


# -------------------------------------------------------------------------------------------------
# short CPU runs


@pytest.mark.slow
def test_short_run_beats_chance(pretrained, tmp_path):
    out = str(tmp_path / "gr")
    m = gr.genrep(**QUICK, checkpoint=pretrained, out=out, steps=30).metrics
    assert m["top1"] > 0.5, m  # chance 0.1
    assert m["nt_xent"] < m["nt_xent_first"], m
    assert m["generated_images"] == 64 * 3 and m["sigma"] == 0.2
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["top1"] == m["top1"]
    views = torch.load(os.path.join(out, "views.pt"), weights_only=True)
    assert views["done"] == 64 and views["neighbors"].shape == (64, 2, 1, 8, 8)
    # GenRep's premise: neighbouring latents give nearby images -- an anchor is closer to its own
    # neighbours than to other anchors
    a = views["anchors"].float()
    n = views["neighbors"].float()
    own = (a[:, None] - n).flatten(2).norm(dim=2).mean()
    other = (a[:, None] - a[None]).flatten(2).norm(dim=2)
    other = other[~torch.eye(64, dtype=torch.bool)].mean()
    assert own < 0.8 * other, (float(own), float(other))
    assert os.path.isfile(os.path.join(out, "views.png"))


def test_online_generation_and_sigma_zero(pretrained, tmp_path):
    m = gr.genrep(**{**QUICK, "pool": 0, "batch_size": 8}, checkpoint=pretrained, out=str(tmp_path / "online"),
                  steps=3, sigma=0.0).metrics
    assert m["generated_images"] == 2 * 8 * 3 and m["step"] == 3


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(pretrained, tmp_path, monkeypatch):
    args = dict(QUICK, checkpoint=pretrained, steps=6, ckpt_every=3)
    full = gr.genrep(**args, out=str(tmp_path / "full"))
    calls = {"n": 0}
    original = gr.nt_xent_loss

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(gr, "nt_xent_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        gr.genrep(**args, out=str(tmp_path / "split"))
    monkeypatch.setattr(gr, "nt_xent_loss", original)
    resumed = gr.genrep(**args, out=str(tmp_path / "split"))
    assert resumed.metrics["resumed_from_step"] == 3 and resumed.metrics["step"] == 6
    for a, b in zip(full.encoder.state_dict().values(), resumed.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.metrics["top1"] == full.metrics["top1"]
    with pytest.raises(CheckpointError, match="sigma="):
        gr.genrep(**{**args, "sigma": 0.3}, out=str(tmp_path / "split"))


# -------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs(pretrained, tmp_path):
    out = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="sigma must be a number"):
        gr.genrep(**QUICK, checkpoint=pretrained, out=out, steps=1, sigma=-0.1)
    with pytest.raises(ValueError, match="sigma must be a number"):
        gr.genrep(**QUICK, checkpoint=pretrained, out=out, steps=1, sigma=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        gr.genrep(**QUICK, checkpoint=pretrained, out=out, steps=1, temperature=0)
    with pytest.raises(ValueError, match="pool"):
        gr.genrep(**{**QUICK, "pool": 10}, checkpoint=pretrained, out=out, steps=1)
    with pytest.raises(ValueError, match="unknown method|method"):
        gr.genrep(**{**QUICK, "method": "dopri5"}, checkpoint=pretrained, out=out, steps=1)
    with pytest.raises(ValueError, match="needs --checkpoint"):
        gr.genrep(**QUICK, out=out, steps=1)
    with pytest.raises(FileNotFoundError, match="no pretraining checkpoint"):
        gr.genrep(**QUICK, checkpoint=str(tmp_path / "missing"), out=out, steps=1)
    with pytest.raises(CheckpointError, match="prg_fast.pretrain"):
        gr.genrep(**QUICK, checkpoint=pretrained, out=pretrained, steps=1)
    other = tmp_path / "other"
    other.mkdir()
    ck = torch.load(os.path.join(pretrained, "checkpoint.pt"), weights_only=True)
    torch.save({**ck, "format": "prg_fast.repfusion"}, str(other / "checkpoint.pt"))
    with pytest.raises(CheckpointError, match="not a prg_fast pretraining checkpoint"):
        gr.genrep(**QUICK, checkpoint=str(other), out=out, steps=1)
    assert not os.path.exists(out)


def test_cli_bad_sigma_and_missing_checkpoint(pretrained, tmp_path, capsys):
    from prg_fast.cli import main

    base = ["genrep", "--data", "digits", "--checkpoint", pretrained, "--steps", "1", "--out", str(tmp_path / "c")]
    for bad in ("-0.5", "nan", "abc"):
        with pytest.raises(SystemExit) as e:
            main(base + ["--sigma", bad])
        assert e.value.code == 2 and "--sigma" in capsys.readouterr().err
    assert main(["genrep", "--data", "digits", "--checkpoint", str(tmp_path / "none"), "--steps", "1", "--out",
                 str(tmp_path / "c")]) == 2
    assert "no pretraining checkpoint" in capsys.readouterr().err
