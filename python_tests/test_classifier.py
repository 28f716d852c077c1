"""PRGClassifier: reverse -> head, trained through the exact adjoint."""
import pytest
import torch

import prg_fast
from prg_fast.classifier import PRGClassifier, feature_shape
from prg_fast.models import ClassifierHead, UNet
from gradient_checks import THREE_WAYS, assert_grads_close

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_unet(dtype=torch.float64):
    torch.manual_seed(0)
    net = UNet.preset("tiny", in_channels=1, image_size=8).to(dtype)
    # the UNet starts as v = 0 (zero-initialised output): perturb every weight so that the
    # trajectory, and hence every gradient, is non-trivial
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _grads(clf, x, y):
    clf.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(clf(x), y)
    loss.backward()
    named = {n: p.grad.clone() for n, p in clf.named_parameters()}
    return loss.detach(), x.grad.clone(), named


@pytest.mark.parametrize("method, steps, save_at, t0", [
    ("euler", 3, None, 0.0),
    ("rk4", 2, None, 0.25),
    ("midpoint", 3, (0.5, 1.0), 0.0),
    ("heun", 2, (0.3, 0.6, 1.0), 0.0),  # 0.3 and 0.6 are not grid points: inserted into the grid
])
def test_adjoint_gradients_equal_backprop(method, steps, save_at, t0):
    flow = _tiny_unet()
    clf = PRGClassifier.build(flow, (1, 8, 8), 10, t=1.0, t0=t0, steps=steps, method=method,
                              save_at=save_at).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(6) % 10
    assert clf.adjoint is True
    loss_a, gx_a, g_a = _grads(clf, x, y)
    clf.adjoint = False
    loss_b, gx_b, g_b = _grads(clf, x, y)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-8, atol=1e-12)
    assert g_a.keys() == g_b.keys()
    flow_names = [n for n in g_a if n.startswith("flow.")]
    assert len(flow_names) == len(list(flow.parameters()))
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-8, atol=1e-12, msg=name)
    # the flow is really trained: its gradients are not all zero
    assert sum(float(g_a[n].abs().sum()) for n in flow_names) > 0


def test_adjoint_gradients_float32_match_backprop():
    flow = _tiny_unet(torch.float32)
    clf = PRGClassifier.build(flow, (1, 8, 8), 10, steps=4, method="euler")
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    _, gx_a, g_a = _grads(clf, x, y)
    clf.adjoint = False
    _, gx_b, g_b = _grads(clf, x, y)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-4, atol=1e-6)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_features_are_reverse_and_save_at_concatenates_channels(conv):
    torch.manual_seed(0)
    flow = conv(channels=3)
    x = torch.randn(4, 3, 8, 8)
    clf = PRGClassifier(flow, ClassifierHead((6, 8, 8), 5), t=0.8, t0=0.2, steps=6, method="rk4", save_at=(0.5, 0.8))
    f = clf.features(x)
    assert f.shape == (4, 6, 8, 8)
    states = prg_fast.reverse(flow, x, 0.8, t0=0.2, steps=6, method="rk4", save_at=[0.5, 0.8])
    torch.testing.assert_close(f[:, :3], states[0])
    torch.testing.assert_close(f[:, 3:], states[1])
    single = PRGClassifier(flow, ClassifierHead((3, 8, 8), 5), t=0.8, t0=0.2, steps=6, method="rk4")
    torch.testing.assert_close(single.features(x), prg_fast.reverse(flow, x, 0.8, t0=0.2, steps=6, method="rk4"))
    assert clf(x).shape == (4, 5)


def test_build_sizes_the_head():
    clf = PRGClassifier.build(_tiny_unet(torch.float32), (1, 8, 8), 3, save_at=[0.5, 1.0], steps=2)
    assert clf.head.in_shape == (2, 8, 8) == feature_shape((1, 8, 8), [0.5, 1.0])
    assert clf(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_frozen_flow_gets_no_gradient_and_head_does():
    flow = _tiny_unet(torch.float32).requires_grad_(False)
    clf = PRGClassifier.build(flow, (1, 8, 8), 10, steps=3)
    clf(torch.randn(4, 1, 8, 8)).sum().backward()
    assert all(p.grad is None for p in flow.parameters())
    assert all(p.grad is not None for p in clf.head.parameters())


def test_step_count_can_change_after_training():
    flow = _tiny_unet(torch.float32)
    clf = PRGClassifier.build(flow, (1, 8, 8), 10, steps=2, method="euler")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        a = clf(x)
        clf.method = "rk4"
        clf.steps = 10
        b = clf(x)
        clf.steps = 20
        c = clf(x)
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)  # 2 Euler steps are far from the flow
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-4)  # both RK4 solutions are close to it


@pytest.mark.parametrize("t0, t", [(0.5, 0.5), (0.75, 0.25), (1.0, 0.0)])
def test_t0_must_be_below_t(t0, t):
    with pytest.raises(ValueError, match="t0 < t"):
        PRGClassifier(_tiny_unet(torch.float32), ClassifierHead((1, 8, 8), 10), t=t, t0=t0)


def test_bad_arguments():
    flow = _tiny_unet(torch.float32)
    head = ClassifierHead((1, 8, 8), 10)
    with pytest.raises(ValueError, match="save_at"):
        PRGClassifier(flow, head, t=0.5, save_at=[0.25, 0.75])
    with pytest.raises(ValueError, match="steps"):
        PRGClassifier(flow, head, steps=0)
    with pytest.raises(ValueError, match="method|solver|unknown"):
        PRGClassifier(flow, head, method="dopri5")
    with pytest.raises(TypeError, match="flow_model"):
        PRGClassifier("not a model", head)
    clf = PRGClassifier(flow, head)
    with pytest.raises(ValueError, match="steps"):
        clf.steps = -3
    with pytest.raises(ValueError, match="ClassifierHead expects"):
        PRGClassifier(flow, ClassifierHead((2, 8, 8), 10))(torch.randn(2, 1, 8, 8))


# -- learning where to read (issue 11 item 3) ----------------------------------------------------


def _learned(learn_t, learn_t0, t=0.6, t0=0.2, adjoint=True):
    flow = _tiny_unet()
    return PRGClassifier.build(flow, (1, 8, 8), 10, t=t, t0=t0, steps=2, method="heun", learn_t=learn_t,
                               learn_t0=learn_t0, adjoint=adjoint).double()


@pytest.mark.parametrize("learn_t, learn_t0", [(True, False), (False, True), (True, True)])
def test_learned_segment_starts_where_asked_and_gets_exact_gradients(learn_t, learn_t0):
    clf = _learned(learn_t, learn_t0)
    assert abs(clf.t - 0.6) < 1e-6 and abs(clf.t0 - 0.2) < 1e-6
    raw = [n for n, _ in clf.named_parameters() if n in ("t_raw", "t0_raw")]
    assert raw == [n for n, on in (("t0_raw", learn_t0), ("t_raw", learn_t)) if on]
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(4)
    _, _, g_a = _grads(clf, x, y)
    clf.adjoint = False
    _, _, g_b = _grads(clf, x, y)
    for name in raw:
        assert g_a[name].abs() > 0
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-8, atol=1e-12)
    # and it is the derivative of the loss: a central difference in the raw parameter (a wide step:
    # the UNet computes its time embedding in float32, so small steps drown in its rounding)
    p = dict(clf.named_parameters())[raw[-1]]
    with torch.no_grad():
        losses = []
        for step in (1e-3, -1e-3):
            p.add_(step)
            losses.append(torch.nn.functional.cross_entropy(clf(x), y))
            p.sub_(step)
    torch.testing.assert_close(g_b[raw[-1]], (losses[0] - losses[1]) / 2e-3, rtol=1e-4, atol=1e-9)


def test_learned_t_moves_and_stays_in_range():
    clf = _learned(True, True, t=0.6, t0=0.2)
    opt = torch.optim.SGD([clf.t_raw, clf.t0_raw], lr=1.0)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(4)
    start = (clf.t0, clf.t)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    assert (clf.t0, clf.t) != start
    with torch.no_grad():  # any raw value keeps the segment valid
        for a, b in ((50.0, 50.0), (-50.0, -50.0), (50.0, -50.0), (-50.0, 50.0)):
            clf.t0_raw.fill_(a)
            clf.t_raw.fill_(b)
            t0, t = clf.segment()
            assert 0.0 <= float(t0) <= float(t) <= 1.0


def test_learned_t_defaults_start_inside_the_range_and_bad_combinations():
    clf = _learned(True, False, t=1.0, t0=0.0)
    assert abs(clf.t - (1 - 1e-3)) < 1e-6
    with pytest.raises(ValueError, match="learn_t/learn_t0 cannot be combined with save_at"):
        PRGClassifier(_tiny_unet(), ClassifierHead((2, 8, 8), 10), t=1.0, save_at=(0.5, 1.0), learn_t=True)
    with pytest.raises(ValueError, match=r"t: expected a time in \[0, 1\]"):
        PRGClassifier(_tiny_unet(), ClassifierHead((1, 8, 8), 10), t=1.5, learn_t=True)
    fixed = PRGClassifier(_tiny_unet(), ClassifierHead((1, 8, 8), 10), t=0.7)
    assert not any(n.endswith("_raw") for n, _ in fixed.named_parameters())
    fixed.t = 0.8
    assert fixed.t == 0.8


def test_every_layer_checks_times_with_the_engines_one_check():
    """Issue 21: a time outside [0, 1] gets the engine's message wherever it is given -- reverse, a
    segment (PRGClassifier, extract), a trainer's time field, the command line's --t / --save-at."""
    import argparse

    from prg_fast.classifier import check_segment, parse_times
    from prg_fast.cli.args import time_list, unit_time
    from prg_fast.ode.api import UNIT_TIME
    from prg_fast.related.repfusion import RepFusionConfig
    from prg_fast.training.finetune import FinetuneConfig

    expected = f"expected {UNIT_TIME}, got 1.5"
    for bad in (lambda: prg_fast.reverse(lambda t, x: -x, torch.randn(2, 3), t=1.5, steps=2),
                lambda: check_segment(0.0, 1.5), lambda: check_segment(0.0, 1.0, [0.5, 1.5]),
                lambda: parse_times("0.5,1.5"),
                lambda: FinetuneConfig(t=1.5, checkpoint="x").validate(),
                lambda: RepFusionConfig(t=1.5, checkpoint="x").validate()):
        with pytest.raises(ValueError) as err:
            bad()
        assert expected in str(err.value)
    for parse, text in ((unit_time, "1.5"), (time_list, "0.5,1.5")):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\] \(0 = data, 1 = noise\), got"):
            parse(text)
    assert unit_time("0.25") == 0.25 and time_list("0, 1") == [0.0, 1.0]


@pytest.mark.parametrize("kw", [dict(save_at=[0.0, 0.5, 1.0]), dict(learn_t=True)])
def test_the_three_ways_agree_through_the_classifier(kw):
    """PRGClassifier (an image-shaped flow, a head, x from an upstream layer): the three ways agree,
    learned time included (a time gradient keeps the adjoint's Function)."""
    from prg_fast.classifier import PRGClassifier

    class Flow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, t, x):
            return torch.tanh(self.conv(x)) * t[:, None, None, None].to(x.dtype)

    torch.manual_seed(0)
    flow, stem = Flow().double(), torch.nn.Conv2d(1, 2, 1).double()
    chans = 2 * (len(kw["save_at"]) if "save_at" in kw else 1)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(chans * 16, 3)).double()
    data = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    grads = []
    for way in THREE_WAYS:
        clf = PRGClassifier(flow, head, steps=2, method="midpoint", adjoint=way.get("adjoint", True),
                            **{k: v for k, v in way.items() if k != "adjoint"}, **kw).double()
        logits = clf(stem(data))
        params = [p for p in list(clf.parameters()) + list(stem.parameters())]
        grads.append(torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])), params))
    assert_grads_close(grads[0], grads[2])
    assert_grads_close(grads[1], grads[2])
