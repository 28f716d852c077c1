"""prg_fast.flow_matching_loss: t ~ U(eps, 1), noise drawn inside, MSE against u_t, in the
project's time convention (checked with the exact velocity field of a one-point data set)."""
import math

import pytest
import torch

from prg_fast.losses import flow_matching_loss
from prg_fast.paths import GVP, ICFM, OTCFM

C = torch.tensor([0.5, -1.0, 2.0])  # the one data point


class ExactICFM(torch.nn.Module):
    """For data = a single point c, x_t = (1 - t) c + t x1, so x1 - c = (x_t - c) / t exactly."""

    def forward(self, t, x):
        return (x - C) / t[:, None]


class ExactGVP(torch.nn.Module):
    """x_t = cos c + sin x1  =>  x1 = (x_t - cos c) / sin,  u = (pi/2)(cos x1 - sin c)."""

    def forward(self, t, x):
        a = t[:, None] * math.pi / 2
        x1 = (x - torch.cos(a) * C) / torch.sin(a)
        return (math.pi / 2) * (torch.cos(a) * x1 - torch.sin(a) * C)


def test_exact_velocity_gives_zero_loss():
    x0 = C.expand(256, 3).clone()
    assert flow_matching_loss(ExactICFM(), x0, ICFM()).item() < 1e-10
    assert flow_matching_loss(ExactICFM(), x0, "otcfm").item() < 1e-10
    assert flow_matching_loss(ExactGVP(), x0, GVP()).item() < 1e-9
    # the opposite (torchcfm) time convention is visibly wrong: a reversed-time exact model fails
    reversed_model = lambda t, x: -ExactICFM()(1 - t, x)  # noqa: E731
    assert flow_matching_loss(reversed_model, x0, ICFM()).item() > 0.1


def test_times_drawn_in_range_with_batch_shape():
    seen = []

    def model(t, x):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.randn(4096, 2)
    flow_matching_loss(model, x0, ICFM(), eps=0.2)
    (t,) = seen
    assert t.shape == (4096,) and t.dtype == x0.dtype
    assert t.min() >= 0.2 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.6) < 0.02  # uniform on (0.2, 1)


def test_zero_model_loss_equals_target_energy():
    # v = 0: loss = E|x1 - x0|^2 / D = 2 for independent standard normal x0, x1 (ICFM)
    torch.manual_seed(0)
    x0 = torch.randn(20000, 4)
    loss = flow_matching_loss(lambda t, x: torch.zeros_like(x), x0, ICFM())
    assert loss.dim() == 0
    assert abs(loss.item() - 2.0) < 0.05


def test_noise_is_drawn_inside_and_follows_generator():
    model = torch.nn.Linear(3, 3)
    f = lambda t, x: model(x)  # noqa: E731
    x0 = torch.randn(32, 3)
    a = flow_matching_loss(f, x0, ICFM(), generator=torch.Generator().manual_seed(5))
    b = flow_matching_loss(f, x0, ICFM(), generator=torch.Generator().manual_seed(5))
    c = flow_matching_loss(f, x0, ICFM(), generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def test_weighting():
    x0 = torch.randn(64, 3)
    model = lambda t, x: torch.zeros_like(x)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = flow_matching_loss(model, x0, ICFM(), generator=g())
    ones = flow_matching_loss(model, x0, ICFM(), generator=g(), weighting=lambda t: torch.ones_like(t))
    zero = flow_matching_loss(model, x0, ICFM(), generator=g(), weighting=lambda t: torch.zeros_like(t))
    double = flow_matching_loss(model, x0, ICFM(), generator=g(), weighting=lambda t: 2 * torch.ones_like(t))
    torch.testing.assert_close(ones, plain)
    assert zero.item() == 0.0
    torch.testing.assert_close(double, 2 * plain)


def test_gradients_reach_the_model():
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = lambda t, x: net(torch.cat([x, t[:, None]], 1))  # noqa: E731
    loss = flow_matching_loss(model, torch.randn(8, 3), OTCFM())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_bad_inputs():
    x0 = torch.randn(4, 3)
    zero = lambda t, x: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="path must be one of"):
        flow_matching_loss(zero, x0, "diffusion")
    with pytest.raises(TypeError, match="model must be callable"):
        flow_matching_loss(3, x0, "icfm")
    with pytest.raises(TypeError, match="x0 must be a floating"):
        flow_matching_loss(zero, torch.ones(4, 3, dtype=torch.long), "icfm")
    with pytest.raises(ValueError, match="eps must be"):
        flow_matching_loss(zero, x0, "icfm", eps=1.0)
    with pytest.raises(ValueError, match="model\\(t, x\\) must return a tensor shaped like x"):
        flow_matching_loss(lambda t, x: x[:, :2], x0, "icfm")
    with pytest.raises(ValueError, match="weighting\\(t\\) must return"):
        flow_matching_loss(zero, x0, "icfm", weighting=lambda t: t[:2])
