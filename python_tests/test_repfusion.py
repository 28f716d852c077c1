"""RepFusion-style distillation (prg_fast.related.repfusion): the hook, the losses on hand-checked
inputs, the REINFORCE gradient sign, short CPU runs, resume, and bad inputs."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from prg_fast.related import repfusion as rf
from prg_fast.related.common import CheckpointError

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def pretrained(tiny_flow_checkpoint):
    return tiny_flow_checkpoint


QUICK = dict(data="digits", batch_size=32, student="resnet-tiny", progress=False, device="cpu", log_every=5)


# -------------------------------------------------------------------------------------------------
# the hook


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 3, 1)
        self.b = torch.nn.Conv2d(3, 1, 1)

    def forward(self, t, x):
        h = self.a(x) + t[:, None, None, None]
        return self.b(h)


def test_feature_hook_pools_the_layer_output():
    net = _Net()
    x = torch.randn(2, 1, 4, 4)
    t = torch.tensor([0.0, 0.5])
    with rf.FeatureHook(net, "a") as hook:
        net(t, x)
        expected = net.a(x).mean(dim=(2, 3))
        torch.testing.assert_close(hook.features, expected)
    # removed on exit: no more captures
    hook.features = None
    net(t, x)
    assert hook.features is None


def test_teacher_features_stop_after_the_layer_and_use_per_sample_t():
    net = _Net()
    seen = {"a": 0, "b": 0}
    net.a.register_forward_hook(lambda *_: seen.__setitem__("a", seen["a"] + 1))
    net.b.register_forward_hook(lambda *_: seen.__setitem__("b", seen["b"] + 1))
    teacher = rf.TeacherFeatures(net, "a")
    x = torch.randn(3, 1, 4, 4)
    f = teacher(x, torch.tensor([0.0, 0.1, 0.2]))
    assert seen == {"a": 1, "b": 0}  # the forward stops right after the hooked layer
    assert f.shape == (3, 3) and not f.requires_grad
    teacher.hook.remove()
    torch.testing.assert_close(f, net.a(x).mean(dim=(2, 3)).detach())
    # per-sample t reaches the network: hook a layer after the time is added
    mid = rf.FeatureHook(net, "b")
    with mid:
        net(torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3, 1, 4, 4))
    w = net.b.weight.sum()
    torch.testing.assert_close(mid.features[1] - mid.features[0], (w * 1.0).detach().reshape(1))
    assert teacher.training is False and teacher.train().training is False


def test_hook_on_unet_middle_block_and_bad_layer():
    from prg_fast.models import UNet

    unet = UNet.preset("tiny", in_channels=1, image_size=8).eval()
    teacher = rf.TeacherFeatures(unet)
    f = teacher(torch.randn(2, 1, 8, 8), 0.1)
    assert f.shape == (2, 64)  # tiny: 64 channels at 4x4, globally pooled
    with pytest.raises(ValueError, match="not a submodule.*middle_block"):
        rf.TeacherFeatures(unet, "middle")


# -------------------------------------------------------------------------------------------------
# losses


def test_distill_loss_is_mse_and_does_not_train_the_teacher():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    loss = rf.distill_loss(s, t)
    assert loss.item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    loss.backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / 4)
    with pytest.raises(ValueError, match="same shape"):
        rf.distill_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_reinforce_gradient_sign_hand_checked():
    # uniform policy over 3 actions; sample 0 took action 0 with reward 1, sample 1 took action 1
    # with reward 0; baseline = mean = 0.5, advantages +0.5 / -0.5
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = rf.reinforce_loss(logits, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    loss.backward()
    p = 1 / 3
    # d/dlogits of -(1/B) * A_i * log softmax(logits_i)[a_i] = -(A_i / B) * (onehot(a_i) - p)
    expected = torch.tensor([[-(0.5 / 2) * (1 - p), (0.5 / 2) * p, (0.5 / 2) * p],
                             [(-0.5 / 2) * p, (0.5 / 2) * (1 - p), (-0.5 / 2) * p]])
    torch.testing.assert_close(logits.grad, expected)
    # the sign that matters: descent raises the better-than-baseline action, lowers the worse one
    assert logits.grad[0, 0] < 0 and logits.grad[1, 1] > 0
    assert loss.item() == pytest.approx(-(0.5 * math.log(p) - 0.5 * math.log(p)) / 2)


def test_reinforce_explicit_baseline_and_entropy_bonus():
    logits = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    # zero advantage: only the entropy bonus acts, and descent must flatten the distribution
    loss = rf.reinforce_loss(logits, torch.tensor([0]), torch.tensor([3.0]), baseline=3.0, entropy_coef=0.1)
    loss.backward()
    logp = F.log_softmax(logits.detach(), 1)
    assert loss.item() == pytest.approx(0.1 * float((logp.exp() * logp).sum()), rel=1e-5)
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0  # descent lowers the dominant logit
    assert rf.entropy_weight(0, 100, 0.1) == pytest.approx(0.1)
    assert rf.entropy_weight(25, 100, 0.1) == pytest.approx(0.05)
    assert rf.entropy_weight(50, 100, 0.1) == 0.0 and rf.entropy_weight(90, 100, 0.1) == 0.0


def test_reinforce_learns_a_bandit():
    """Policy gradient end to end: reward 1 for action 2 only; the policy must come to prefer it."""
    torch.manual_seed(0)
    logits = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(100):
        batch = logits.expand(64, 4)
        a = torch.distributions.Categorical(logits=batch).sample()
        loss = rf.reinforce_loss(batch, a, (a == 2).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.softmax(logits, 1)[0, 2] > 0.9


def test_reinforce_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        rf.reinforce_loss(torch.zeros(2, 3), torch.tensor([0]), torch.zeros(2))
    with pytest.raises(ValueError, match="actions must lie"):
        rf.reinforce_loss(torch.zeros(2, 3), torch.tensor([0, 3]), torch.zeros(2))
    with pytest.raises(TypeError, match="integer"):
        rf.reinforce_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="entropy_coef"):
        rf.reinforce_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2), entropy_coef=-1)


def test_policy_starts_uniform():
    pol = rf.TimestepPolicy(1, torch.linspace(0, 1, 5))
    p = F.softmax(pol(torch.randn(3, 1, 8, 8)), 1)
    torch.testing.assert_close(p, torch.full((3, 5), 0.2))


# -------------------------------------------------------------------------------------------------
# short CPU runs


def test_fixed_t_run_beats_chance_and_student_matches_teacher(pretrained, tmp_path, monkeypatch):
    from prg_fast.data import load_data
    from prg_fast.related.common import ResNet

    out = str(tmp_path / "rf")
    args = dict(QUICK, checkpoint=pretrained, out=out, steps=40, finetune_steps=25, t=0.2)
    # stop at the first finetuning step: the checkpoint then holds the student as distillation left it
    original = rf._RepFusion._finetune_step

    def stop(self, x, y):
        raise KeyboardInterrupt

    monkeypatch.setattr(rf._RepFusion, "_finetune_step", stop)
    with pytest.raises(KeyboardInterrupt):
        rf.repfusion(**args)
    monkeypatch.setattr(rf._RepFusion, "_finetune_step", original)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["format"] == "prg_fast.repfusion" and ck["step"] == 40
    distill = [h[3] for h in ck["history"] if h[1] == "distill"]
    assert distill[-1] < 0.5 * distill[0], distill
    # the distilled student reproduces the teacher's features on held-out images (R^2 > 0.5)
    test = load_data("digits", "test", augment=None)
    x, _ = test.batch(list(range(200)), augment=False)
    _, flow = rf.load_flow(pretrained, test)
    target = (rf.TeacherFeatures(flow)(x, 0.2) - ck["teacher_mean"][0]) / ck["teacher_std"][0]
    torch.testing.assert_close(ck["teacher_times"], torch.tensor([0.2]))
    student = ResNet(**ck["student_config"])
    student.load_state_dict(ck["student"])
    proj = torch.nn.Linear(student.feature_dim, target.shape[1])
    proj.load_state_dict(ck["projection"])
    with torch.no_grad():
        pred = proj(student.eval()(x))
    r2 = 1 - ((pred - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    assert r2 > 0.3, float(r2)  # measured 0.55 here; an untrained student gives about 0 or less
    # resume: the finetuning phase, then the test top-1
    m = rf.repfusion(**args).metrics
    assert m["resumed_from_step"] == 40 and m["step"] == 65
    assert m["top1"] > 0.5, m  # chance is 0.1
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["top1"] == m["top1"] and saved["teacher_t"] == 0.2 and saved["layer"] == "middle_block"
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["top1"] == m["top1"]
    assert os.path.isfile(os.path.join(out, "log.csv"))


def test_policy_run(pretrained, tmp_path):
    res = rf.repfusion(**QUICK, checkpoint=pretrained, out=str(tmp_path / "pol"), steps=30, finetune_steps=25,
                       policy=True, policy_times=4)
    m = res.metrics
    assert m["top1"] > 0.5, m
    assert m["teacher_t"] is None and 0.0 <= m["policy_t_mean"] <= 1.0
    assert sum(m["policy_probs"].values()) == pytest.approx(1.0, abs=1e-3)
    distill = [h for h in res.history if h[1] == "distill"]
    aux_ce = [h[3 + rf._LOG_KEYS.index("aux_ce")] for h in distill]
    assert aux_ce[-1] < aux_ce[0]  # the auxiliary head learns from the teacher's features
    ent_w = [h[3 + rf._LOG_KEYS.index("entropy_w")] for h in distill]
    assert ent_w[0] > 0 and ent_w[-1] == 0.0


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(pretrained, tmp_path, monkeypatch):
    args = dict(QUICK, checkpoint=pretrained, steps=6, finetune_steps=6, policy=True, policy_times=3, ckpt_every=3)
    full = rf.repfusion(**args, out=str(tmp_path / "full"))

    calls = {"n": 0}
    original = rf._RepFusion._finetune_step

    def crash(self, x, y):
        calls["n"] += 1
        if calls["n"] == 2:  # dies in the finetuning phase at step 8; the last checkpoint is step 6
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(rf._RepFusion, "_finetune_step", crash)
    with pytest.raises(KeyboardInterrupt):
        rf.repfusion(**args, out=str(tmp_path / "split"))
    monkeypatch.setattr(rf._RepFusion, "_finetune_step", original)
    resumed = rf.repfusion(**args, out=str(tmp_path / "split"))
    assert resumed.metrics["resumed_from_step"] == 6 and resumed.metrics["step"] == 12
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.metrics["top1"] == full.metrics["top1"]
    # a changed definition is refused
    with pytest.raises(CheckpointError, match="t="):
        rf.repfusion(**{**args, "policy": False, "t": 0.3}, out=str(tmp_path / "split"))


# -------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs(pretrained, tmp_path):
    out = str(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no pretraining checkpoint"):
        rf.repfusion(**QUICK, checkpoint=str(tmp_path / "missing"), out=out, steps=1)
    with pytest.raises(ValueError, match=r"t: expected a time in \[0, 1\]"):
        rf.repfusion(**QUICK, checkpoint=pretrained, out=out, steps=1, t=1.5)
    with pytest.raises(ValueError, match="t must be a finite number"):
        rf.repfusion(**QUICK, checkpoint=pretrained, out=out, steps=1, t=float("nan"))
    with pytest.raises(ValueError, match="either a fixed time t or policy"):
        rf.repfusion(**QUICK, checkpoint=pretrained, out=out, steps=1, t=0.5, policy=True)
    with pytest.raises(ValueError, match="needs --checkpoint"):
        rf.repfusion(**QUICK, out=out, steps=1)
    with pytest.raises(ValueError, match="student must be one of"):
        rf.repfusion(**{**QUICK, "student": "vgg"}, checkpoint=pretrained, out=out, steps=1)
    with pytest.raises(ValueError, match="finetune_steps"):
        rf.repfusion(**QUICK, checkpoint=pretrained, out=out, steps=0)
    # a pretraining run directory as --out is refused, not overwritten
    with pytest.raises(CheckpointError, match="prg_fast.pretrain"):
        rf.repfusion(**QUICK, checkpoint=pretrained, out=pretrained, steps=1)
    # the wrong kind of checkpoint as the teacher
    other = tmp_path / "other"
    other.mkdir()
    ck = torch.load(os.path.join(pretrained, "checkpoint.pt"), weights_only=True)
    torch.save({**ck, "format": "prg_fast.finetune"}, str(other / "checkpoint.pt"))
    with pytest.raises(CheckpointError, match="not a prg_fast pretraining checkpoint"):
        rf.repfusion(**QUICK, checkpoint=str(other), out=out, steps=1)
    # a teacher pretrained on other images
    torch.save({**ck, "in_channels": 3}, str(other / "checkpoint.pt"))
    with pytest.raises(CheckpointError, match="pretrained on 3x8x8"):
        rf.repfusion(**QUICK, checkpoint=str(other), out=out, steps=1)
    assert not os.path.exists(out)


def test_cli_reports_bad_input_with_status_2(pretrained, tmp_path, capsys):
    from prg_fast.cli import main

    base = ["repfusion", "--data", "digits", "--checkpoint", pretrained, "--steps", "1", "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as e:
        main(base + ["--t", "2"])
    assert e.value.code == 2 and "time in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base + ["--t", "0.5", "--policy"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert main(["repfusion", "--data", "digits", "--checkpoint", str(tmp_path / "none"), "--steps", "1", "--out",
                 str(tmp_path / "c")]) == 2
    assert "no pretraining checkpoint" in capsys.readouterr().err
