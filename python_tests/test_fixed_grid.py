"""odeint's torchdiffeq fixed-grid options (prg_fast/ode/fixed_grid.py): options=dict(step_size=...)
and dict(grid_constructor=...) step along a finer grid and interpolate linearly at the output
times. Oracles: torchdiffeq itself on the same problem (when installed), a hand-written reference
(solve on the fine grid, interpolate by hand), plain backprop for the adjoint, gradcheck in float64."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import prg_fast
from prg_fast.ode import fixed_grid

D = torch.float64
PAIRS = [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2"), ("rk4_38", "rk4")]


def _problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return net, (lambda t, y: net(y) * torch.cos(3 * t)), torch.randn(4, 3, dtype=D)


GRIDS = {
    "increasing": [0.0, 0.33, 1.0],
    "decreasing": [1.0, 0.55, 0.0],
    "on_grid_points": [0.0, 0.25, 0.5, 0.75, 1.0],
    "single_interval": [0.2, 0.9],
}


@pytest.mark.parametrize("step", [0.1, 0.25, 0.3, 2.0])
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_step_size_matches_torchdiffeq(ours, theirs, grid, step):
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    _, f, y0 = _problem()
    t = torch.tensor(GRIDS[grid], dtype=D)
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, y0, t, method=theirs, options=dict(step_size=step))
        got = prg_fast.odeint(f, y0, t, method=ours, options=dict(step_size=step), adjoint=False)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_step_size_by_hand():
    """Without torchdiffeq: solve on 0, .3, .6, .9, 1 and interpolate at .33 by hand."""
    _, f, y0 = _problem()
    t = torch.tensor([0.0, 0.33, 1.0], dtype=D)
    got = prg_fast.odeint(f, y0, t, method="rk4", options=dict(step_size=0.3), adjoint=False)
    fine = prg_fast.odeint(f, y0, torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0], dtype=D), method="rk4", adjoint=False)
    w = (0.33 - 0.3) / 0.3
    torch.testing.assert_close(got[0], y0)
    torch.testing.assert_close(got[1], fine[1] + w * (fine[2] - fine[1]), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[2], fine[4], rtol=1e-13, atol=1e-13)  # 3 * 0.3 vs 0.9: rounding


def test_evaluation_count_follows_the_step_size():
    """torchdiffeq's test_steps: step_size=0.1 over [0, 1] is 10 steps."""
    calls = []

    def f(t, y):
        calls.append(float(t))
        return -y

    prg_fast.odeint(f, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="euler",
                    options=dict(step_size=0.1), adjoint=False)
    assert len(calls) == 10 and calls[0] == 0.0 and math.isclose(calls[-1], 0.9)


def test_grid_constructor_as_torchdiffeq_tests_it():
    """torchdiffeq's test_grid_constructor: euler on 11 points of [0, 1] for x' = x gives 1.1^10."""
    x0 = torch.tensor(1.0, dtype=D, requires_grad=True)
    seen = []

    def ctor(func, y0, t):
        seen.append(t.tolist())
        return torch.linspace(0, 1, 11, dtype=D)

    xs = prg_fast.odeint(lambda t, x: x, x0, torch.tensor([0.0, 1.0], dtype=D), method="euler",
                         options=dict(grid_constructor=ctor))
    assert seen == [[0.0, 1.0]]
    assert abs(xs[1].item() - 1.1 ** 10) < 1e-12
    xs[1].backward()
    assert abs(x0.grad.item() - 1.1 ** 10) < 1e-12


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("strategy", [dict(), dict(memory_budget=0), dict(memory_budget=float("inf")),
                                      dict(store="steps", memory_budget=0), dict(reversible=True)])
def test_adjoint_equals_backprop_with_a_step_size(method, strategy):
    net, f, y0 = _problem(1)
    params = list(net.parameters())
    results = []
    for adjoint in (False, True):
        y = y0.clone().requires_grad_(True)
        t = torch.tensor([0.0, 0.37, 0.8], dtype=D, requires_grad=True)
        kw = dict(strategy) if adjoint else {"reversible": strategy.get("reversible", False)}
        out = prg_fast.odeint(f, y, t, method=method, options=dict(step_size=0.15), adjoint=adjoint, **kw)
        w = torch.randn(out.shape, dtype=D, generator=torch.Generator().manual_seed(3))
        results.append(torch.autograd.grad((out * w).sum(), [y, t] + params))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("adjoint", [False, True])
def test_gradcheck_through_grid_and_interpolation(adjoint):
    """Both the solve on the step_size grid (whose ends are t[0], t[-1]) and the interpolation
    weights depend on t; gradcheck checks the whole derivative w.r.t. y0 and t."""
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=D)

    def f(t, y):
        return torch.tanh(y @ A) * (1 + t)

    def fn(y0, t):
        return prg_fast.odeint(f, y0, t, method="midpoint", options=dict(step_size=0.2), adjoint=adjoint)

    y0 = torch.tensor([0.5, -0.4], dtype=D, requires_grad=True)
    # t[-1] - t[0] not a multiple of the step: there the number of steps (and so the derivative)
    # jumps, and a central difference would straddle the jump
    t = torch.tensor([0.1, 0.45, 0.93], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (y0, t))


def test_tuple_state_with_step_size():
    _, f, y0 = _problem()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    a, b = prg_fast.odeint(lambda s, y: (f(s, y[0]), -y[1]), (y0, torch.ones(2, dtype=D)), t, method="rk4",
                           options=dict(step_size=0.3), adjoint=False)
    torch.testing.assert_close(a, prg_fast.odeint(f, y0, t, method="rk4", options=dict(step_size=0.3), adjoint=False))
    assert b.shape == (3, 2)


def test_a_step_size_dividing_the_span_up_to_rounding_takes_no_sliver_step():
    """0.8 / 0.2 = 4.000000000000001: torchdiffeq would add a ~1e-16 step; here the grid is 4 steps."""
    t = torch.tensor([0.1, 0.9], dtype=D)
    grid = fixed_grid.solver_grid(dict(step_size=0.2), None, None, t, t.tolist())
    assert grid.tolist() == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9], abs=1e-15) and len(grid) == 5
    assert all(b > a for a, b in zip(grid.tolist()[:-1], grid.tolist()[1:]))


def test_solve_returns_only_the_states_it_interpolates_from():
    needed, plan = fixed_grid.interpolation_plan([0.0, 0.3, 0.6, 0.9, 1.0], [0.0, 0.33, 1.0])
    assert needed == [0, 1, 2, 4] and plan == [(0, None), (1, 2), (4, None)]
    needed, plan = fixed_grid.interpolation_plan([1.0, 0.7, 0.4, 0.1, 0.0], [1.0, 0.55, 0.0])
    assert needed == [0, 1, 2, 4] and plan == [(0, None), (1, 2), (4, None)]


@pytest.mark.parametrize("options,match", [
    (dict(step_size=0), r"options\['step_size'\] must be a finite number > 0"),
    (dict(step_size=float("nan")), r"step_size"),
    (dict(step_size=0.1, grid_constructor=lambda f, y, t: t), "mutually exclusive"),
    (dict(perturb="yes"), r"options\['perturb'\] must be True or False"),
    (dict(jump_t=[0.5]), r"unsupported key\(s\) \['jump_t'\]"),
    (dict(interp="cubic"), r"options\['interp'\] must be 'linear'"),
    (dict(grid_constructor=lambda f, y, t: torch.tensor([0.0, 0.5], dtype=D)), r"from t\[0\] = 0 to t\[-1\] = 1"),
    (dict(grid_constructor=lambda f, y, t: torch.tensor([0.0, 0.7, 0.5, 1.0], dtype=D)), "strictly monotone"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prg_fast.odeint(lambda t, y: -y, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="rk4", options=options)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4_38"])
def test_perturb_reads_no_grid_point_forward_or_backward(method, dtype, adjoint):
    """torchdiffeq's test_odeint_perturb: with perturb=True no stage reads a grid time (0, 0.5, 1),
    in the forward and in the adjoint's reruns; without it they do."""
    for perturb in (True, False):
        ts = []

        def f(t, x):
            ts.append(float(t))
            return -x

        x0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
        xs = prg_fast.odeint(f, x0, torch.tensor([0.0, 1.0]), method=method, adjoint=adjoint,
                             options=dict(step_size=0.5, perturb=perturb))
        assert (0.0 in ts and 0.5 in ts) != perturb
        ts.clear()
        xs.sum().backward()
        if perturb:
            assert 1.0 not in ts and 0.5 not in ts and 0.0 not in ts


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_perturb_matches_torchdiffeq_on_a_jump(ours, theirs):
    """A forcing that jumps at t = 0.5, a grid point: perturb=True sees it from the right side of each
    step, as torchdiffeq does (the results differ from perturb=False)."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    f = lambda t, y: -y + 2.0 * (t > 0.5).to(y.dtype)  # noqa: E731
    y0, t = torch.tensor([1.0, 2.0], dtype=D), torch.tensor([0.0, 0.3, 1.0], dtype=D)
    got = prg_fast.odeint(f, y0, t, method=ours, options=dict(step_size=0.25, perturb=True))
    want = torchdiffeq.odeint(f, y0, t, method=theirs, options=dict(step_size=0.25, perturb=True))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain = prg_fast.odeint(f, y0, t, method=ours, options=dict(step_size=0.25))
    assert (got - plain).abs().max() > 1e-3


def test_perturb_needs_a_float_grid():
    with pytest.raises(ValueError, match="perturb.*t must not require grad"):
        prg_fast.odeint(lambda t, y: -y, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D, requires_grad=True), method="rk4",
                        options=dict(perturb=True))
    s = torch.tensor(0.5, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="perturb.*grid_constructor's grid must not require grad"):
        prg_fast.odeint(lambda t, y: -y, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="rk4",
                        options=dict(perturb=True, grid_constructor=lambda f, y0, t: torch.stack([t[0], s, t[-1]])))


def test_perturb_false_is_the_default_behaviour():
    f = lambda t, y: -y  # noqa: E731
    y0, t = torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    torch.testing.assert_close(prg_fast.odeint(f, y0, t, method="rk4", options=dict(step_size=0.5, perturb=False)),
                               prg_fast.odeint(f, y0, t, method="rk4", options=dict(step_size=0.5)), rtol=0, atol=0)


def test_options_must_be_a_dict_and_not_per_sample():
    with pytest.raises(TypeError, match="options must be a dict"):
        prg_fast.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4", options=[("step_size", 0.1)])
    with pytest.raises(ValueError, match="per-sample"):
        prg_fast.odeint(lambda t, y: -y, torch.ones(2, 3), torch.rand(3, 2).cumsum(0), method="rk4", options=dict(step_size=0.1))


def test_tolerances_are_accepted_and_said_to_be_ignored():
    y0, t = torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    with pytest.warns(UserWarning, match="rtol/atol are ignored"):
        a = prg_fast.odeint(lambda s, y: -y, y0, t, method="rk4", rtol=1e-7, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = prg_fast.odeint(lambda s, y: -y, y0, t, method="rk4")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(adjoint=False), dict(), dict(store="steps"), dict(reversible=True)])
@pytest.mark.parametrize("method", ["heun", "rk4_38"])
def test_perturbed_stage_times_stay_inside_their_step(method, kw):
    """0.9 + (0.1 - 0.9) rounds to 0.09999999999999998 in float64: a c = 1 stage must start from the
    grid point itself, or one step 'inside' lands past a jump at 0.1 (and the reversible inverse
    step would read another time than the forward)."""
    grid = [0.9, 0.1, -0.7]
    ts = []

    def f(t, y):
        ts.append(float(t))
        return -y + (t < 0.1).to(y.dtype)

    y0 = torch.ones(2, dtype=D, requires_grad=True)
    out = prg_fast.odeint(f, y0, torch.tensor(grid, dtype=D), method=method, options=dict(perturb=True), **kw)
    out.sum().backward()
    for tt in ts:
        assert any(min(a, b) < tt < max(a, b) for a, b in zip(grid[:-1], grid[1:])), tt
    if method == "rk4_38":
        torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
        want = torchdiffeq.odeint(f, y0.detach(), torch.tensor(grid, dtype=D), method="rk4", options=dict(perturb=True))
        if not kw.get("reversible"):
            torch.testing.assert_close(out.detach(), want, rtol=1e-12, atol=1e-12)
