"""Tableaus are consistent, and each integrator shows its order of convergence on ODEs with known
solutions (measured, not assumed)."""
import math

import pytest
import torch

import prg_fast
from prg_fast.ode.solvers import SOLVERS, ButcherTableau, get_tableau

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "rk4_38": 4}


def test_solvers_dict_has_the_designed_methods():
    assert set(SOLVERS) == set(ORDERS)
    for name, tab in SOLVERS.items():
        assert tab.order == ORDERS[name]


def test_rk4_is_classic_and_rk4_38_is_the_three_eighths_rule():
    assert SOLVERS["rk4"].b == (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    assert SOLVERS["rk4_38"].b == (1 / 8, 3 / 8, 3 / 8, 1 / 8)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_order_conditions(name):
    """Check the Butcher order conditions up to the tableau's claimed order."""
    tab = SOLVERS[name]
    b, c, s = tab.b, tab.c, tab.stages
    a = [[tab.a[i][j] if j < i else 0.0 for j in range(s)] for i in range(s)]
    conds = [(1, sum(b), 1.0)]
    conds.append((2, sum(b[i] * c[i] for i in range(s)), 1 / 2))
    conds.append((3, sum(b[i] * c[i] ** 2 for i in range(s)), 1 / 3))
    conds.append((3, sum(b[i] * a[i][j] * c[j] for i in range(s) for j in range(s)), 1 / 6))
    conds.append((4, sum(b[i] * c[i] ** 3 for i in range(s)), 1 / 4))
    conds.append((4, sum(b[i] * c[i] * a[i][j] * c[j] for i in range(s) for j in range(s)), 1 / 8))
    conds.append((4, sum(b[i] * a[i][j] * c[j] ** 2 for i in range(s) for j in range(s)), 1 / 12))
    conds.append((4, sum(b[i] * a[i][j] * a[j][k] * c[k] for i in range(s) for j in range(s) for k in range(s)), 1 / 24))
    for order, value, expected in conds:
        if order <= tab.order:
            assert value == pytest.approx(expected, abs=1e-14)
    # and the next order fails, so the claimed order is not an understatement
    assert any(abs(v - e) > 1e-6 for o, v, e in conds if o == tab.order + 1) or tab.order == 4


def test_bad_tableau_is_rejected():
    with pytest.raises(ValueError, match="explicit"):
        ButcherTableau("bad", 1, a=((0.0,),), b=(1.0,), c=(0.0,))
    with pytest.raises(ValueError, match="method must be one of"):
        get_tableau("dopri5")


def _rotation(t, x):
    # x' = [[0, 1], [-1, 0]] x  ->  rotation; solution x(t) = R(t) x(0)
    return torch.stack([x[:, 1], -x[:, 0]], dim=1)


def _cos_rate(t, x):
    # x' = cos(t) x  ->  x(t) = x(0) exp(sin t - sin t0): exercises the stage times c_i
    return torch.cos(t)[:, None] * x


def _measured_order(func, exact, name, backend, steps=(8, 16, 32, 64)):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    errs = []
    for n in steps:
        out = prg_fast.reverse(func, x0, t=2.0, steps=n, method=name, backend=backend)
        errs.append((out - exact(x0, 2.0)).abs().max().item())
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


def _rot_exact(x0, t):
    c, s = math.cos(t), math.sin(t)
    return torch.stack([c * x0[:, 0] + s * x0[:, 1], -s * x0[:, 0] + c * x0[:, 1]], dim=1)


def _cos_exact(x0, t):
    return x0 * math.exp(math.sin(t))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("problem", ["rotation", "cos_rate"])
def test_measured_order_of_convergence(name, backend, problem):
    func, exact = (_rotation, _rot_exact) if problem == "rotation" else (_cos_rate, _cos_exact)
    slopes = _measured_order(func, exact, name, backend)
    # the finest pair is closest to asymptotic
    assert ORDERS[name] - 0.2 < slopes[-1] < ORDERS[name] + 0.5, slopes
