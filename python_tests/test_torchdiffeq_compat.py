"""prg_fast.odeint as a drop-in for torchdiffeq's fixed-grid solvers: torchdiffeq's test problems
(ConstantODE, SineODE, LinearODE, plus ExpODE, a function of t only) written anew, forward accuracy
per order against the analytic solutions, adjoint == plain backprop in float64, gradients w.r.t.
the time grid, tuple states, and agreement with torchdiffeq itself on the same grid."""
import math

import pytest
import torch
import torch.nn as nn

import prg_fast

D = torch.float64


class ConstantODE(nn.Module):
    """y' = a + (y - (a t + b))^5; exact solution a t + b (every consistent method is exact)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2, dtype=D))
        self.b = nn.Parameter(torch.tensor(3.0, dtype=D))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5

    def y_exact(self, t):
        return self.a * t + self.b


class SineODE(nn.Module):
    """y' = 2y/t + t^4 sin 2t - t^2 + 4t^3 with a closed-form solution."""

    def forward(self, t, y):
        return 2 * y / t + t ** 4 * torch.sin(2 * t) - t ** 2 + 4 * t ** 3

    def y_exact(self, t):
        return (-0.5 * t ** 4 * torch.cos(2 * t) + 0.5 * t ** 3 * torch.sin(2 * t) + 0.25 * t ** 2 * torch.cos(2 * t)
                - t ** 3 + 2 * t ** 4 + (math.pi - 0.25) * t ** 2)


class LinearODE(nn.Module):
    """y' = A y with a random stable A; exact solution expm(t A) y0."""

    def __init__(self, dim=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        U = torch.randn(dim, dim, generator=g, dtype=D) * 0.1
        A = 2 * U - (U + U.T)
        self.A = nn.Parameter(A)
        self.initial = torch.randn(dim, generator=g, dtype=D)

    def forward(self, t, y):
        return self.A @ y

    def y_exact(self, t):
        return torch.stack([torch.linalg.matrix_exp(ti * self.A) @ self.initial for ti in t])


class ExpODE(nn.Module):
    """y' = w exp(-t): a function of t only (no dependence on y)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -0.5], dtype=D))

    def forward(self, t, y):
        return self.w * torch.exp(-t)


ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rk4_38": 4}


def _problem(name):
    if name == "constant":
        p = ConstantODE()
        t = torch.linspace(1.0, 8.0, 41, dtype=D)
        return p, p.y_exact(t[:1]).detach().reshape(1), t, lambda tt: p.y_exact(tt).detach()[:, None]
    if name == "sine":
        p = SineODE()
        t = torch.linspace(1.0, 2.0, 41, dtype=D)
        return p, p.y_exact(t[:1]).reshape(1), t, lambda tt: p.y_exact(tt)[:, None]
    if name == "linear":
        p = LinearODE()
        t = torch.linspace(0.0, 1.0, 41, dtype=D)
        return p, p.initial.clone(), t, lambda tt: p.y_exact(tt).detach()
    raise KeyError(name)


@pytest.mark.parametrize("method", sorted(ORDERS))
@pytest.mark.parametrize("name", ["constant", "sine", "linear"])
def test_forward_accuracy_and_order(name, method):
    """Error on the grid is small, and halving the step divides it by about 2^order."""
    errs = []
    for n in (21, 41):
        p, y0, t, exact = _problem(name)
        t = torch.linspace(float(t[0]), float(t[-1]), n, dtype=D)
        with torch.no_grad():
            ys = prg_fast.odeint(p, y0, t, method=method, adjoint=False)
        assert ys.shape == (n, *y0.shape)
        errs.append((ys - exact(t)).abs().max().item())
    if name == "constant":
        assert max(errs) < 1e-10
        return
    observed = math.log2(errs[0] / errs[1])
    assert observed > ORDERS[method] - 0.3, (errs, observed)


@pytest.mark.parametrize("method", sorted(ORDERS))
@pytest.mark.parametrize("name", ["constant", "sine", "linear", "exp", "exp_t_only"])
def test_adjoint_equals_backprop(name, method):
    if name == "exp":
        p, y0, t = ExpODE(), torch.zeros(2, dtype=D), torch.linspace(0.0, 2.0, 9, dtype=D)
    elif name == "exp_t_only":
        # no parameter and no y: the evaluation's output has no graph at all
        p, y0, t = (lambda tt, y: torch.exp(-tt) * torch.ones(2, dtype=D)), torch.zeros(2, dtype=D), \
            torch.linspace(0.0, 2.0, 9, dtype=D)
    else:
        p, y0, t, _ = _problem(name)
        t = t[:9]
    params = list(p.parameters()) if isinstance(p, nn.Module) else []
    grads = {}
    for adjoint in (True, False):
        y = y0.clone().requires_grad_()
        ys = prg_fast.odeint(p, y, t, method=method, adjoint=adjoint)
        w = torch.randn(ys.shape, generator=torch.Generator().manual_seed(1), dtype=D)
        grads[adjoint] = torch.autograd.grad((ys * w).sum(), [y, *params], allow_unused=True)
    for a, b in zip(grads[True], grads[False]):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_exp_ode_gradient_is_analytic():
    """For y' = w e^{-t}, every fixed-grid method's result is linear in w; rk4 is close to the
    exact integral, d y(T)/d w = 1 - e^{-T}."""
    p, t = ExpODE(), torch.linspace(0.0, 2.0, 21, dtype=D)
    ys = prg_fast.odeint(p, torch.zeros(2, dtype=D), t, method="rk4")
    (g,) = torch.autograd.grad(ys[-1].sum(), [p.w])
    torch.testing.assert_close(g, torch.full((2,), 1 - math.exp(-2.0), dtype=D), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_gradient_wrt_time_grid(method):
    p = SineODE()
    t0 = torch.linspace(1.0, 1.5, 5, dtype=D)
    y0 = p.y_exact(t0[:1]).reshape(1)
    grads = {}
    for adjoint in (True, False):
        t = t0.clone().requires_grad_()
        ys = prg_fast.odeint(p, y0, t, method=method, adjoint=adjoint)
        (grads[adjoint],) = torch.autograd.grad(ys.sum(), [t])
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-9, atol=1e-12)
    assert grads[False].abs().sum() > 0
    for adjoint in (True, False):
        assert torch.autograd.gradcheck(
            lambda tt: prg_fast.odeint(p, y0, tt, method=method, adjoint=adjoint), (t0.clone().requires_grad_(),))


def _tuple_func(t, state):
    a, b = state
    return (-b * torch.cos(t), a * 0.5 + torch.tanh(b))


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_tuple_state(method):
    a = torch.randn(3, dtype=D)
    b = torch.randn(3, dtype=D)
    t = torch.linspace(0.0, 1.0, 6, dtype=D)
    grads = {}
    for adjoint in (True, False):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ys = prg_fast.odeint(_tuple_func, (aa, bb), t, method=method, adjoint=adjoint)
        assert isinstance(ys, tuple) and len(ys) == 2
        assert ys[0].shape == (6, 3) and ys[1].shape == (6, 3)
        grads[adjoint] = torch.autograd.grad((ys[0] ** 2).sum() + ys[1].sum(), [aa, bb])
    # the tuple solve equals the same ODE on the concatenated state
    cat = prg_fast.odeint(lambda tt, y: torch.cat(_tuple_func(tt, (y[:3], y[3:]))), torch.cat([a, b]), t,
                          method=method, adjoint=False)
    torch.testing.assert_close(torch.cat([ys[0], ys[1]], dim=1), cat.detach(), rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads[True], grads[False]):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_nested_tuple_state():
    def f(t, state):
        a, (b, c) = state
        return (-b, (a * c, torch.sin(a) - c))

    a, b, c = (torch.randn(2, dtype=D).requires_grad_() for _ in range(3))
    t = torch.linspace(0.0, 1.0, 4, dtype=D)
    grads = {}
    for adjoint in (True, False):
        ys = prg_fast.odeint(f, (a, (b, c)), t, method="rk4", adjoint=adjoint)
        ya, (yb, yc) = ys
        assert ya.shape == yb.shape == yc.shape == (4, 2)
        grads[adjoint] = torch.autograd.grad(ya.sum() + (yb * yc).sum(), [a, b, c])
    for g1, g2 in zip(grads[True], grads[False]):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_closure_over_module_with_default_adjoint():
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    y0 = torch.randn(3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=D)
    ys = prg_fast.odeint(lambda tt, y: net(y), y0, t, method="rk4")  # adjoint=True is the default
    grads = torch.autograd.grad(ys.sum(), [y0, *net.parameters()])
    ys_ref = prg_fast.odeint(lambda tt, y: net(y), y0, t, method="rk4", adjoint=False)
    ref = torch.autograd.grad(ys_ref.sum(), [y0, *net.parameters()])
    for g1, g2 in zip(grads, ref):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ours,theirs", [("euler", "euler"), ("midpoint", "midpoint"), ("rk4_38", "rk4")])
@pytest.mark.parametrize("name", ["sine", "linear"])
def test_matches_torchdiffeq_on_the_same_grid(name, ours, theirs):
    """torchdiffeq's fixed-grid solvers without step_size take one step per interval of t (the grid
    is the output grid), as prg_fast.odeint does; its "rk4" is the 3/8 rule. Its outputs are
    linear interpolations evaluated at the step end points, equal to the step result up to rounding."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    p, y0, t, _ = _problem(name)
    with torch.no_grad():
        ys = prg_fast.odeint(p, y0, t, method=ours, adjoint=False)
        ref = torchdiffeq.odeint(p, y0, t, method=theirs)
    torch.testing.assert_close(ys, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# complex states (torchdiffeq allows them): solved as their real view


_A = torch.tensor([[0.1 + 1j, 0.3], [-0.2j, -0.1 + 0.5j]], dtype=torch.complex128)


def _complex_f(t, y):
    return y @ _A.T.to(y.dtype) * torch.cos(t).to(y.real.dtype)


def _complex_oracle(y, grid, method):
    """The tableau stepped in complex arithmetic, written here."""
    tab = prg_fast.SOLVERS[method]
    out = [y]
    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        ks = []
        for i in range(tab.stages):
            yi = y + h * sum((tab.a[i][j] * ks[j] for j in range(i) if tab.a[i][j] != 0.0), torch.zeros_like(y))
            ks.append(_complex_f(torch.tensor(a + tab.c[i] * h, dtype=torch.float64), yi))
        y = y + h * sum((bi * k for bi, k in zip(tab.b, ks) if bi != 0.0), torch.zeros_like(y))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("method", sorted(prg_fast.SOLVERS))
def test_complex_state_matches_complex_arithmetic(method, adjoint, dtype):
    y0 = torch.tensor([1 + 0.5j, -0.3j], dtype=dtype, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ys = prg_fast.odeint(_complex_f, y0, t, method=method, adjoint=adjoint)
    ref = _complex_oracle(y0, t.tolist(), method)
    assert ys.dtype == dtype and ys.shape == (5, 2)
    tol = 1e-12 if dtype == torch.complex128 else 1e-5
    torch.testing.assert_close(ys, ref, rtol=tol, atol=tol)
    g = torch.autograd.grad(ys.abs().square().sum(), y0)[0]
    g_ref = torch.autograd.grad(ref.abs().square().sum(), y0)[0]
    torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("adjoint", [False, True])
def test_complex_gradcheck(adjoint):
    w = torch.tensor([0.3 - 0.2j], dtype=torch.complex128, requires_grad=True)

    def fn(y0, w):
        return prg_fast.odeint(lambda t, y: _complex_f(t, y) * w, y0, torch.linspace(0, 1, 4, dtype=torch.float64),
                               method="rk4", adjoint=adjoint)

    y0 = torch.tensor([1 + 0.5j, -0.3j], dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (y0, w))


def test_complex_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    y0 = torch.tensor([1 + 0.5j, -0.3j], dtype=torch.complex128)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(prg_fast.odeint(_complex_f, y0, t, method="rk4_38"),
                               torchdiffeq.odeint(_complex_f, y0, t, method="rk4"), rtol=1e-12, atol=1e-12)


def test_complex_errors_are_named():
    y0 = torch.ones(2, dtype=torch.complex64)
    t = torch.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="func must return a complex tensor shaped like y0"):
        prg_fast.odeint(lambda t, y: y.real, y0, t, method="rk4")
    with pytest.raises(TypeError, match="component 1 is complex"):
        prg_fast.odeint(lambda t, y: y, (torch.ones(2), y0), t, method="rk4")


@pytest.mark.parametrize("adjoint", [False, True])
def test_scalar_state_with_a_grid_that_requires_grad(adjoint):
    """torchdiffeq's own test problems use a 0-dim y0 and a grid that requires grad."""
    p = ConstantODE()

    def fn(y0, t):
        return prg_fast.odeint(p, y0, t, method="rk4", adjoint=adjoint)

    y0 = torch.tensor(3.2, dtype=D, requires_grad=True)
    t = torch.linspace(1, 2, 4, dtype=D, requires_grad=True)
    ys = fn(y0, t)
    assert ys.shape == (4,)
    assert torch.autograd.gradcheck(fn, (y0, t))


def test_tuple_of_scalar_states():
    y0 = (torch.tensor(1.0, dtype=D), torch.tensor(2.0, dtype=D))
    t = torch.linspace(0, 1, 5, dtype=D)
    a, b = prg_fast.odeint(lambda s, y: (-y[0], -2 * y[1]), y0, t, method="rk4")
    assert a.shape == b.shape == (5,)
    torch.testing.assert_close(a, prg_fast.odeint(lambda s, y: -y, y0[0], t, method="rk4"), rtol=1e-14, atol=0)
    torch.testing.assert_close(b, prg_fast.odeint(lambda s, y: -2 * y, y0[1], t, method="rk4"), rtol=1e-14, atol=0)
