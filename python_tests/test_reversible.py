"""The reversible solver (prg_fast.ode.reversible): exact gradients vs plain backprop through the
same scheme, gradcheck, order of convergence, exact inverse, and O(1) stored state in K; a
reconstruction that drifts (a stiff network in float32) is an error, or a warning with the figure."""
import math

import pytest
import torch

import prg_fast
from prg_fast.ode import reversible as rev
from prg_fast.ode.description import describe
from prg_fast.ode.integrate import Grid
from gradient_checks import TwoLayer, rel_err

METHODS = ["euler", "midpoint", "heun", "rk4", "rk4_38"]
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rk4_38": 4}


class Net(torch.nn.Module):
    def __init__(self, d=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(d, d, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, t, x):
        return torch.tanh(x @ self.w + self.b) * (1 + t[:, None])


def _grads(method, adjoint, save_at=None, steps=6):
    net = Net()
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).requires_grad_(True)
    out = prg_fast.reverse(net, x, steps=steps, method=method, adjoint=adjoint, save_at=save_at,
                           reversible=True, backend="reference")
    w = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad, net.w.grad, net.b.grad


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("save_at", [None, [0.0, 0.25, 0.7, 1.0, 0.7]])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_equal_plain_backprop_through_the_same_scheme(method, save_at):
    ref = _grads(method, adjoint=False, save_at=save_at)
    got = _grads(method, adjoint=True, save_at=save_at)
    assert torch.equal(got[0], ref[0])  # same forward arithmetic
    for g, r in zip(got[1:], ref[1:]):
        assert _rel(g, r) < 1e-9


def test_reversible_differs_from_the_base_solver():
    # guards against the flag being silently ignored
    net, x = Net(), torch.ones(2, 3, dtype=torch.float64)
    with torch.no_grad():
        a = prg_fast.reverse(net, x, steps=4, method="heun", reversible=True)
        b = prg_fast.reverse(net, x, steps=4, method="heun")
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 1e-2


def test_gradcheck_float64():
    w = (0.3 * torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    x = torch.tensor([[0.2, -0.4]], dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return prg_fast.reverse(lambda t, y: torch.sin(y @ w), x, steps=3, method="rk4", reversible=True,
                                adjoint_params=[w], save_at=[0.5, 1.0])

    assert torch.autograd.gradcheck(f, (x, w))


def _cos_rate(t, x):
    return torch.cos(t).reshape(-1, 1) * x  # t: (B,) from reverse, 0-dim from odeint


@pytest.mark.parametrize("method", METHODS)
def test_measured_order_equals_base_tableau_order(method):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    exact = x0 * math.exp(math.sin(2.0))
    errs = []
    steps = (8, 16, 32, 64)
    for n in steps:
        grid = torch.linspace(0.0, 2.0, n + 1, dtype=torch.float64)  # a generic ODE on [0, 2]: odeint's domain
        out = prg_fast.odeint(_cos_rate, x0, grid, method=method, reversible=True)[-1]
        errs.append((out - exact).abs().max().item())
    slope = -torch.tensor([math.log(e) for e in errs]).diff() / math.log(2.0)
    assert ORDERS[method] - 0.2 < slope[-1].item() < ORDERS[method] + 0.5, slope


def _problem(func, method, steps, x, out_index=None):
    grid = Grid([k / steps for k in range(steps + 1)], out_index or [steps])
    return describe(method=method, backend="reference").problem(func, x, grid)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_exact_inverse_recovers_the_initial_state(method):
    net = Net()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = _problem(net, method, 40, x)
    lam = rev.DEFAULT_COUPLING
    with torch.no_grad():
        _, y, z = rev.run(p, x, lam)  # the final pair
        assert (y - x).abs().max() > 0.1  # the solve moved the state
        y0, z0 = y, z
        for n in reversed(range(p.steps)):
            y0, z0 = rev.inverse_step(p, lam, n, y0, z0)
    assert (y0 - x).abs().max() < 1e-12
    assert (z0 - x).abs().max() < 1e-12


def test_backward_saves_only_the_final_pair_flat_in_K():
    net = Net()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    state_bytes = x.numel() * x.element_size()
    counts = {}
    for steps in (2, 16, 64):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = prg_fast.reverse(net, x, steps=steps, method="rk4", reversible=True, preserve_rng_state=False,
                                   save_at=[k / steps for k in range(steps + 1)])
        out.sum().backward()
        counts[steps] = (len(saved), sum(saved))
    assert counts[2] == counts[16] == counts[64] == (2, 2 * state_bytes), counts


def test_bad_coupling_is_rejected():
    with pytest.raises(ValueError, match="reversible_coupling"):
        prg_fast.reverse(Net(), torch.ones(1, 3, dtype=torch.float64), reversible=True, reversible_coupling=0.0)


def test_odeint_and_generate_gradients_equal_plain_backprop():
    for call in ("odeint", "generate"):
        res = []
        for adjoint in (False, True):
            net = Net()
            x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3).requires_grad_(True)
            if call == "odeint":
                f = lambda t, y: net(t.expand(y.shape[0]), y)  # noqa: E731
                out = prg_fast.odeint(f, x, torch.linspace(0, 1, 5, dtype=torch.float64), method="rk4_38",
                                      adjoint=adjoint, adjoint_params=list(net.parameters()), reversible=True)
            else:
                out = prg_fast.generate(net, x, steps=5, method="midpoint", adjoint=adjoint, reversible=True)
            w = torch.sin(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
            (out * w).sum().backward()
            res.append((x.grad, net.w.grad, net.b.grad))
        for g, r in zip(res[1], res[0]):
            assert _rel(g, r) < 1e-9, call


def test_dropout_is_replayed_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    drop = torch.nn.Dropout(0.3)
    net = torch.nn.Sequential(lin, drop)
    model = lambda t, x: net(x)  # noqa: E731
    res = []
    for adjoint in (False, True):
        torch.manual_seed(5)
        x = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(model, x, steps=3, method="heun", adjoint=adjoint, reversible=True,
                               adjoint_params=list(lin.parameters()))
        out.sum().backward()
        res.append((x.grad.clone(), lin.weight.grad.clone()))
        lin.zero_grad()
    for g, r in zip(res[1], res[0]):
        assert _rel(g, r) < 1e-9


# -- the reversible adjoint checks its own reconstruction ------------------------------------------


class SharpBatchNormNet(torch.nn.Module):
    """A conv net with BatchNorm in train mode and weights scaled up: a large local Lipschitz
    constant, which blows up the reversible scheme's inverse steps in float32 (timm's
    mobilenetv3 in train mode did in the issue)."""

    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            self.c1.weight.mul_(scale)
            self.c2.weight.mul_(scale)

    def forward(self, t, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def _reversible_grad(scale, **kw):
    net = SharpBatchNormNet(scale)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    prg_fast.reverse(net, x, steps=8, method="rk4", reversible=True, **kw).pow(2).sum().backward()
    return x.grad


def test_reversible_reconstruction_blowup_is_an_error():
    with pytest.raises(RuntimeError, match=r"rebuilt the initial state .* relative error of .*reversible=False"):
        _reversible_grad(100.0)


def test_reversible_reconstruction_warns_with_the_figure_when_asked():
    ref = _reversible_grad(300.0, adjoint=False)
    with pytest.warns(RuntimeWarning, match=r"relative error of \d"):
        got = _reversible_grad(300.0, reversible_check="warn")
    # what the check is there for: the gradient is far from plain backprop's
    assert rel_err(got, ref) > 1e-4


def test_reversible_reconstruction_within_tolerance_is_silent():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _reversible_grad(1.0)
    assert rel_err(got, _reversible_grad(1.0, adjoint=False)) < 1e-5


def test_reversible_check_is_validated():
    with pytest.raises(ValueError, match="reversible_check"):
        prg_fast.reverse(TwoLayer(3, 5), torch.randn(2, 3), steps=2, reversible=True, reversible_check="loud")
