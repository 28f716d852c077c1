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


def _rooted_trees(max_order):
    """All rooted trees up to max_order, by order. A tree is the sorted tuple of its subtrees, so
    equal trees compare equal; trees of order n+1 are those of order n with one leaf grafted on."""
    def graft(tree):
        yield tuple(sorted(tree + ((),)))
        for i, child in enumerate(tree):
            for grown in graft(child):
                yield tuple(sorted(tree[:i] + (grown,) + tree[i + 1:]))

    trees = {1: {()}}
    for n in range(2, max_order + 1):
        trees[n] = {grown for tree in trees[n - 1] for grown in graft(tree)}
    return trees


def _density(tree):
    """gamma(t) = |t| * prod gamma(children); the order condition is Phi(t) = 1 / gamma(t)."""
    size = lambda t: 1 + sum(size(c) for c in t)
    return size(tree) * math.prod(_density(c) for c in tree)


def _elementary_weight(tab, tree):
    """Phi(t) = sum_i b_i g_i(t), with g_i(t) = prod over children u of sum_j a_ij g_j(u)."""
    s = tab.stages
    a = [[tab.a[i][j] if j < i else 0.0 for j in range(s)] for i in range(s)]

    def g(t):
        out = [1.0] * s
        for child in t:
            gc = g(child)
            out = [out[i] * sum(a[i][j] * gc[j] for j in range(s)) for i in range(s)]
        return out

    return sum(bi * gi for bi, gi in zip(tab.b, g(tree)))


def test_rooted_tree_counts():
    # 1, 1, 2, 4, 9 rooted trees of orders 1..5 (OEIS A000081): the generator misses none
    assert [len(v) for _, v in sorted(_rooted_trees(5).items())] == [1, 1, 2, 4, 9]


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_order_conditions(name):
    """Every order condition (one per rooted tree) holds up to the claimed order p, and not all
    of those of order p+1 do, so the claimed order is neither an overstatement nor an understatement."""
    tab = SOLVERS[name]
    trees = _rooted_trees(tab.order + 1)
    for order in range(1, tab.order + 1):
        for tree in trees[order]:
            assert _elementary_weight(tab, tree) == pytest.approx(1 / _density(tree), abs=1e-14), (order, tree)
    misses = [abs(_elementary_weight(tab, t) - 1 / _density(t)) for t in trees[tab.order + 1]]
    assert max(misses) > 1e-6, f"{name} satisfies every order-{tab.order + 1} condition"


def test_bad_tableau_is_rejected():
    with pytest.raises(ValueError, match="explicit"):
        ButcherTableau("bad", 1, a=((0.0,),), b=(1.0,), c=(0.0,))
    with pytest.raises(ValueError, match="method must be one of.*adaptive method: odeint runs it"):
        get_tableau("dopri5")
    with pytest.raises(ValueError, match="torchdiffeq's heun2 is 'heun' here"):
        get_tableau("heun2")
    with pytest.raises(ValueError, match=r"method must be one of .* got None$"):
        get_tableau(None)


def _rotation(t, x):
    # x' = [[0, 1], [-1, 0]] x  ->  rotation; solution x(t) = R(t) x(0)
    return torch.stack([x[:, 1], -x[:, 0]], dim=1)


def _cos_rate(t, x):
    # x' = cos(t) x  ->  x(t) = x(0) exp(sin t - sin t0): exercises the stage times c_i
    return torch.cos(t).reshape(-1, 1) * x  # t: (B,) from reverse, 0-dim from odeint


def _measured_order(func, exact, name, backend, steps=(8, 16, 32, 64)):
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    errs = []
    for n in steps:
        # a generic ODE on [0, 2]: odeint's domain (reverse reads the unit interval only)
        grid = torch.linspace(0.0, 2.0, n + 1, dtype=torch.float64)
        out = prg_fast.odeint(func, x0, grid, method=name, backend=backend)[-1]
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
