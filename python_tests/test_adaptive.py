"""Adaptive odeint (prg_fast.ode.solvers, prg_fast.ode.adaptive): the embedded pairs' order
conditions and measured orders, the controller against torchdiffeq (evaluations, errors, callbacks,
options) on Van der Pol, Lotka-Volterra, exponential decay and a neural ODE, the states torchdiffeq
allows, jump_t, and the errors that replace silent NaNs."""
import math
from types import SimpleNamespace

import pytest
import torch

import prg_fast
from prg_fast.ode.solvers import EMBEDDED, EmbeddedTableau
from test_solvers import _density, _elementary_weight, _rooted_trees

D = torch.float64
ORDERS = {"dopri5": (5, 4), "bosh3": (3, 2), "adaptive_heun": (2, 1), "fehlberg2": (2, 1), "dopri8": (8, 7),
          "tsit5": (5, 4)}  # (order of b, order of b_hat)
THEIRS = ["dopri5", "bosh3", "dopri8"]  # the pairs whose evaluations torchdiffeq counts as we do (see solvers.py)


def _satisfied_order(tab, weights, up_to):
    """The largest p such that `weights` meet every order condition of order <= p."""
    trees = _rooted_trees(up_to)
    hat = SimpleNamespace(stages=tab.stages, a=tab.a, b=tuple(weights))
    for order in range(1, up_to + 1):
        if any(abs(_elementary_weight(hat, t) - 1 / _density(t)) > 1e-12 for t in trees[order]):
            return order - 1
    return up_to


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_order_conditions_of_the_pair(name):
    tab, (p, q) = EMBEDDED[name], ORDERS[name]
    assert tab.order == p and tab.fsal
    assert _satisfied_order(tab, tab.b, p + 1) == p
    assert _satisfied_order(tab, tab.b_hat, q + 1) == q


def _vdp(mu):
    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
    return f


def _reference(fun, y0, t):
    """scipy's DOP853 at rtol = atol = 1e-13 (the issue's reference)."""
    solve_ivp = pytest.importorskip("scipy.integrate", reason="scipy is not installed").solve_ivp
    sol = solve_ivp(lambda s, y: fun(torch.tensor(s, dtype=D), torch.tensor(y, dtype=D)).numpy(),
                    (float(t[0]), float(t[-1])), y0.numpy(), method="DOP853", rtol=1e-13, atol=1e-13,
                    t_eval=t.numpy())
    return torch.tensor(sol.y.T, dtype=D)


class Counting(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f, self.n = f, 0

    def forward(self, t, y):
        self.n += 1
        return self.f(t, y)


def _lotka(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3 * y[1] + y[0] * y[1]])


PROBLEMS = {
    "vdp1": (_vdp(1.0), torch.tensor([2.0, 0.0], dtype=D), torch.linspace(0, 10, 11, dtype=D)),
    "vdp5": (_vdp(5.0), torch.tensor([2.0, 0.0], dtype=D), torch.linspace(0, 10, 11, dtype=D)),
    "lotka": (_lotka, torch.tensor([1.0, 1.0], dtype=D), torch.linspace(0, 10, 21, dtype=D)),
    "decay": (lambda t, y: -0.7 * y, torch.tensor([1.0, -2.0], dtype=D), torch.linspace(0, 5, 6, dtype=D)),
}


@pytest.mark.parametrize("method", THEIRS)
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_evaluations_and_error_as_torchdiffeq(problem, method):
    """Same controller, same pair: the same evaluations (dopri8 fewer: it skips its last stage on
    rejected steps), an error no larger (within 1.2x) than torchdiffeq's against DOP853."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    f, y0, t = PROBLEMS[problem]
    ours, theirs = Counting(f), Counting(f)
    tol = dict(rtol=1e-5, atol=1e-7) if method == "bosh3" else {}  # bosh3 at 1e-7: thousands of steps
    with torch.no_grad():
        ys, stats = prg_fast.odeint(ours, y0, t, method=method, return_stats=True, **tol)
        ref = torchdiffeq.odeint(theirs, y0, t, method=method, **tol)
    exact = _reference(f, y0, t)
    assert ours.n == stats.evaluations
    assert theirs.n - stats.rejected <= ours.n <= theirs.n + 2
    err, err_theirs = (ys - exact).abs().max().item(), (ref - exact).abs().max().item()
    assert err <= 1.2 * err_theirs + 1e-13, (err, err_theirs)


def test_van_der_pol_is_accurate_by_default_not_nan():
    """The issue's report: VdP with odeint's defaults (here method="dopri5", torchdiffeq's default)
    is accurate to its tolerance."""
    f, y0, t = PROBLEMS["vdp1"]
    ys = prg_fast.odeint(f, y0, t, method="dopri5")
    assert (ys - _reference(f, y0, t)).abs().max() < 2e-6


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_error_shrinks_as_rtol_tightens(method):
    f, y0, t = PROBLEMS["lotka"]
    exact = _reference(f, y0, t)
    rtols = (1e-3, 1e-4, 1e-5) if ORDERS[method][0] <= 3 else (1e-4, 1e-6, 1e-8)
    errs = [(prg_fast.odeint(f, y0, t, method=method, rtol=r, atol=r * 1e-2) - exact).abs().max().item()
            for r in rtols]
    assert errs[0] > errs[1] > errs[2], errs


def _fixed_steps(h):
    """Options that make the controller take steps of exactly h (every error accepted)."""
    return dict(first_step=h, max_step=h)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_measured_order_of_solution_and_dense_output(method):
    """With steps held at h: the step-end error falls as h^order, the dense output's (between step
    ends) at least as h^min(order, 3) (the quartic fits and tsit5's are 4th order, the Hermite 3rd)."""
    p = ORDERS[method][0]
    f = lambda t, y: torch.cos(t) * y  # noqa: E731  y = y0 exp(sin t)
    y0 = torch.tensor([1.0, -0.5], dtype=D)
    ends, mids = [], []
    hs = (0.4, 0.2) if p >= 8 else (0.1, 0.05)
    for h in hs:
        t = torch.tensor([0.0, 2.0, 2.0 + 0.37 * h], dtype=D)
        ys = prg_fast.odeint(f, y0, t, method=method, rtol=1e3, atol=1e3, options=_fixed_steps(h))
        exact = y0 * torch.exp(torch.sin(t))[:, None]
        ends.append((ys[1] - exact[1]).abs().max().item())
        mids.append((ys[2] - exact[2]).abs().max().item())
    assert math.log2(ends[0] / ends[1]) > p - 0.3, ends
    assert math.log2(mids[0] / mids[1]) > min(p, 3) - 0.3, mids


def test_decreasing_times_tuple_complex_and_scalar_states_match_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    f = lambda t, y: -y * torch.cos(t)  # noqa: E731
    cases = [
        (f, torch.tensor([1.0, 2.0], dtype=D), torch.linspace(3, 0, 7, dtype=D)),
        (lambda t, s: (-s[1], s[0] * torch.cos(t)), (torch.ones(1, dtype=D), torch.full((1,), 0.7, dtype=D)),
         torch.linspace(0, 2, 5, dtype=D)),
        (lambda t, y: y @ torch.tensor([[0.1 + 1j, 0.3], [-0.2j, -0.1 + 0.5j]], dtype=torch.complex128).T,
         torch.tensor([1 + 0.5j, -0.3j], dtype=torch.complex128), torch.linspace(0, 2, 5, dtype=D)),
        (lambda t, y: -y, torch.tensor(1.0, dtype=D), torch.linspace(0, 1, 3, dtype=D)),
    ]
    for func, y0, t in cases:
        ours, theirs = prg_fast.odeint(func, y0, t, method="dopri5"), torchdiffeq.odeint(func, y0, t)
        for a, b in zip(ours if isinstance(ours, tuple) else [ours], theirs if isinstance(theirs, tuple) else [theirs]):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class Logged(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f, self.log = f, []

    def forward(self, t, y):
        return self.f(t, y)

    def callback_step(self, t0, y0, dt):
        self.log.append(("step", t0.item(), dt.item()))

    def callback_accept_step(self, t0, y0, dt):
        self.log.append(("accept", t0.item(), dt.item()))

    def callback_reject_step(self, t0, y0, dt):
        self.log.append(("reject", t0.item(), dt.item()))


@pytest.mark.parametrize("options", [
    {}, dict(first_step=0.3), dict(max_step=0.05), dict(min_step=0.2), dict(step_t=[0.55, 1.25]),
    dict(safety=0.5, ifactor=3.0, dfactor=0.5), dict(norm=lambda e: e.abs().max()),
])
def test_callbacks_and_options_as_torchdiffeq(options):
    """The same steps, accepted and rejected, in the same order, through torchdiffeq's step callbacks
    (the step sizes equal to rounding: the error estimates are summed in another order)."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    f, y0, t = _vdp(5.0), torch.tensor([2.0, 0.0], dtype=D), torch.linspace(0, 2, 3, dtype=D)
    ours, theirs = Logged(f), Logged(f)
    prg_fast.odeint(ours, y0, t, method="dopri5", rtol=1e-5, atol=1e-7, options=dict(options))
    theirs_options = {k: torch.tensor(v, dtype=D) if k == "step_t" else v for k, v in options.items()}
    torchdiffeq.odeint(theirs, y0, t, method="dopri5", rtol=1e-5, atol=1e-7, options=theirs_options)
    assert [e[0] for e in ours.log] == [e[0] for e in theirs.log]
    for a, b in zip(ours.log, theirs.log):
        assert a[1:] == pytest.approx(b[1:], rel=1e-8, abs=1e-12)


def test_per_component_tolerances_as_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    f, y0, t = PROBLEMS["lotka"]
    rtol, atol = torch.tensor([1e-6, 1e-9], dtype=D), torch.tensor([1e-8, 1e-12], dtype=D)
    ours, theirs = Counting(f), Counting(f)
    a = prg_fast.odeint(ours, y0, t, method="dopri5", rtol=rtol, atol=atol)
    b = torchdiffeq.odeint(theirs, y0, t, rtol=rtol, atol=atol)
    assert ours.n == theirs.n
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_jump_t_is_exact():
    """A velocity that jumps at t = 1: announced in jump_t, the step ends there and the next starts
    afresh on the right side, so the piecewise-linear solution is exact; unannounced, it is smeared."""
    f = lambda t, y: torch.where(t < 1.0, 1.0, -2.0) + 0 * y  # noqa: E731
    y0, t = torch.zeros(1, dtype=D), torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=D)
    exact = torch.tensor([0.0, 0.5, 1.0, 0.0, -1.0], dtype=D)[:, None]
    for method in sorted(ORDERS):
        ys, stats = prg_fast.odeint(f, y0, t, method=method, options=dict(jump_t=[1.0]), return_stats=True)
        torch.testing.assert_close(ys, exact, rtol=0, atol=1e-14)
        assert 1.0 in stats.times
    smeared = prg_fast.odeint(f, y0, t, method="dopri5", options=dict(max_step=0.3))
    assert (smeared - exact).abs().max() > 1e-6
    down = prg_fast.odeint(f, y0, t.flip(0), method="dopri5", options=dict(jump_t=[1.0]))  # from t = 2 down
    torch.testing.assert_close(down, torch.tensor([0.0, 1.0, 2.0, 1.5, 1.0], dtype=D)[:, None], rtol=0, atol=1e-14)
    for one in (torch.tensor([1.0]), torch.tensor(1.0)):  # a tensor of one time is a list of one time
        torch.testing.assert_close(prg_fast.odeint(f, y0, t, method="dopri5", options=dict(jump_t=one)), exact,
                                   rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", ["blowup", "nan", "max_num_steps", "forced"])
def test_never_a_silent_nan(case):
    y0, t = torch.ones(1, dtype=D), torch.tensor([0.0, 2.0], dtype=D)
    if case == "blowup":  # y' = y^2 blows up at t = 1
        with pytest.raises(FloatingPointError, match=r"step size underflowed at t=1 .*h=.*options\['min_step'\]"):
            prg_fast.odeint(lambda s, y: y ** 2, y0, t, method="dopri5")
    elif case == "nan":
        with pytest.raises(FloatingPointError, match="func returned NaN/Inf at the initial time t=0"):
            prg_fast.odeint(lambda s, y: y * float("nan"), y0, t, method="dopri5")
        bad = lambda s, y: torch.where(s > 0.5, float("nan"), 1.0) * y  # noqa: E731
        with pytest.raises(FloatingPointError, match=r"at t=0\.5.*error estimate was not finite"):
            prg_fast.odeint(bad, y0, t, method="dopri5")
    elif case == "max_num_steps":
        with pytest.raises(RuntimeError, match=r"max_num_steps=3 .*output time t=2 \(reached t=0\.\d+, step size "
                                               r"h=.*options\['max_num_steps'\]"):
            prg_fast.odeint(lambda s, y: -y, y0, t, method="dopri5", options=dict(max_num_steps=3))
    else:
        with pytest.raises(FloatingPointError, match=r"not finite at t=.*min_step=0\.1 forces"):
            prg_fast.odeint(lambda s, y: y ** 2, y0, t, method="dopri5", options=dict(min_step=0.1))


def test_bad_input_is_named():
    f, y0, t = (lambda s, y: -y), torch.ones(2, dtype=D), torch.linspace(0, 1, 3, dtype=D)
    with pytest.raises(ValueError, match=r"unsupported key\(s\) \['step_size'\] for the adaptive method 'dopri5'"):
        prg_fast.odeint(f, y0, t, method="dopri5", options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="per-sample grid"):
        prg_fast.odeint(f, torch.ones(3, 2), torch.rand(4, 3).cumsum(0), method="dopri5")
    with pytest.raises(ValueError, match=r"options\['dfactor'\] must be a number > 0"):
        prg_fast.odeint(f, y0, t, method="dopri5", options=dict(dfactor=0.0))
    with pytest.raises(ValueError, match="rtol must be a number >= 0"):
        prg_fast.odeint(f, y0, t, method="dopri5", rtol=-1.0)
    with pytest.raises(ValueError, match="step_t and jump_t must not share a time"):
        prg_fast.odeint(f, y0, t, method="dopri5", options=dict(step_t=[0.5], jump_t=[0.5]))
    with pytest.raises(ValueError, match="'dopri5' is adaptive: reverse and generate step a fixed grid"):
        prg_fast.reverse(lambda s, x: -x, torch.ones(2, 3), method="dopri5")
    with pytest.raises(ValueError, match="return_stats=True needs an adaptive method; 'rk4' is fixed-step"):
        prg_fast.odeint(f, y0, t, method="rk4", return_stats=True)


def test_stats_count_what_ran():
    f, y0, t = PROBLEMS["vdp1"]
    counted = Counting(f)
    _, stats = prg_fast.odeint(counted, y0, t, method="dopri5", return_stats=True)
    # f0, the first step's probe, then 6 new stages per attempted step (FSAL)
    assert stats.evaluations == counted.n == 2 + 6 * (stats.accepted + stats.rejected)
    assert stats.times[0] == 0.0 and len(stats.times) == stats.accepted + 1
    assert all(a < b for a, b in zip(stats.times, stats.times[1:])) and stats.times[-1] >= 10.0


def test_buffered_no_grad_path_equals_the_graph_path():
    """Without grad mode the loop writes into its own buffers; with it, fresh tensors with graphs:
    the same numbers, also for a velocity that returns its own input (a buffer the loop reuses)."""
    for f in (PROBLEMS["vdp1"][0], lambda t, y: y):
        y0, t = torch.tensor([2.0, 0.5], dtype=D), torch.linspace(0, 1.5, 4, dtype=D)
        with torch.no_grad():
            a = prg_fast.odeint(f, y0, t, method="tsit5")
        b = prg_fast.odeint(f, y0.clone().requires_grad_(), t, method="tsit5", adjoint=False)
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_neural_ode_float32_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is not installed")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    f = lambda t, y: net(y)  # noqa: E731
    y0, t = torch.randn(16, 4), torch.linspace(0, 1, 5)
    ours, theirs = Counting(f), Counting(f)
    with torch.no_grad():
        a = prg_fast.odeint(ours, y0, t, method="dopri5", rtol=1e-5, atol=1e-6)
        b = torchdiffeq.odeint(theirs, y0, t, rtol=1e-5, atol=1e-6)
    assert a.dtype == torch.float32 and abs(ours.n - theirs.n) <= 6
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_users_embedded_tableau():
    """Heun-Euler written by hand: the FSAL stage is appended and the Hermite dense output derived."""
    tab = EmbeddedTableau.of("mine", 2, "0 1", ["", "1"], "1/2 1/2", "1 0")
    assert tab.stages == 3 and tab.fsal and tab.b == EMBEDDED["adaptive_heun"].b
    f, y0, t = PROBLEMS["decay"]
    torch.testing.assert_close(prg_fast.odeint(f, y0, t, method=tab, rtol=1e-4),
                               prg_fast.odeint(f, y0, t, method="adaptive_heun", rtol=1e-4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="b_hat must have 2 entries summing to 1"):
        EmbeddedTableau("bad", 1, ((), (1.0,)), (0.0, 1.0), (0.0, 1.0), (1.0,), ((1.0,), (0.0,)))
    with pytest.raises(ValueError, match="dense output must equal b at theta = 1"):
        EmbeddedTableau.of("bad", 2, "0 1", ["", "1"], "1/2 1/2", "1 0", dense=[("1",), ("0",)])


# ---------------------------------------------------------------------------------------------
# torchdiffeq's own test problems and tolerances (tests/problems.py, odeint_tests.py, event_tests.py,
# norm_tests.py of torchdiffeq), written anew: y(t) on t = linspace(1, 8, 10), 0-dim or 10-dim states


class _ExpODE(torch.nn.Module):
    def forward(self, t, y):
        return -0.1 * self.y_exact(t)

    def y_exact(self, t):
        return torch.exp(-0.1 * t)


def _torchdiffeq_problem(ode, dtype, reverse):
    from test_torchdiffeq_compat import ConstantODE, LinearODE, SineODE

    f = {"constant": ConstantODE, "sine": SineODE, "linear": LinearODE, "exp": _ExpODE}[ode]().to(dtype)
    t = torch.linspace(1, 8, 10, dtype=D)
    if ode == "linear":
        f.initial = torch.ones(10, dtype=dtype)
    sol = f.y_exact(t).detach().to(dtype)
    sol = sol.reshape(10, -1).squeeze(-1) if ode != "linear" else sol
    return (f, sol[-1], t.flip(0), sol.flip(0)) if reverse else (f, sol[0], t, sol)


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "adaptive_heun" else m
                                    for m in sorted(ORDERS)])  # adaptive_heun: ~40,000 evaluations a solve
def test_torchdiffeq_problems_within_its_tolerances(method, dtype):
    tol = {D: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-7, atol=1e-7)}[dtype] if method == "dopri8" else {}
    for ode in ("constant", "sine", "linear", "exp"):
        eps = 4e-3 if method in ("adaptive_heun", "bosh3") else 2e-3 if ode == "linear" else 5e-2 if ode == "exp" else 3e-4
        for reverse in (False, True):
            f, y0, t, sol = _torchdiffeq_problem(ode, dtype, reverse)
            with torch.no_grad():
                ys = prg_fast.odeint(f, y0, t, method=method, **tol)
            assert ys.dtype == dtype and ys.shape == sol.shape
            assert ((sol - ys) / sol).abs().max() < eps, (ode, reverse)
            assert torch.equal(prg_fast.odeint(f, y0, t[:1], method=method), y0[None])  # no integration


def test_torchdiffeq_jump_and_min_step_tests():
    """jump_t saves evaluations on a velocity that jumps at 0.5; min_step = 2 on the linear problem
    takes far fewer evaluations than none (torchdiffeq's TestDiscontinuities, TestMinMaxStep)."""
    def jump(t, x):
        return -0.5 * x if t < 0.5 else x ** 2

    for method in sorted(ORDERS):
        x0, t = torch.tensor([1.0, 2.0], dtype=D), torch.tensor([0.0, 1.0], dtype=D)
        simple, better = Counting(jump), Counting(jump)
        prg_fast.odeint(simple, x0, t, atol=1e-6, method=method)
        prg_fast.odeint(better, x0, t, rtol=1e-6, atol=1e-6, method=method, options=dict(jump_t=[0.5]))
        assert better.n < simple.n, method
    for min_step, fewer in ((0.0, False), (2.0, True)):
        f, y0, t, _ = _torchdiffeq_problem("linear", D, False)
        counted = Counting(f)
        prg_fast.odeint(counted, y0, t, method="dopri5", options=dict(min_step=min_step))
        assert (counted.n < 50) if fewer else (counted.n > 100)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("ode", ["constant", "sine"])
def test_torchdiffeq_event_tests(ode, reverse):
    """The event where sum(y - sol[2]) = 0: found at t[2] with the state sol[2] (rel. 1e-4)."""
    for method in sorted(ORDERS):
        f, y0, t, sol = _torchdiffeq_problem(ode, D, reverse)
        event_t, ys = prg_fast.odeint(f, y0, t[:2], method=method, event_fn=lambda s, y: torch.sum(y - sol[2]))
        assert ys.shape == (2,) + y0.shape
        assert abs((sol[2] - ys[-1]) / sol[2]) < 1e-4 and abs((t[2] - event_t) / t[2]) < 1e-4, method
    event_t, ys = prg_fast.odeint_event(f, y0, t[0], event_fn=lambda s, y: torch.sum(y - sol[2]), reverse_time=reverse)
    assert abs((t[2] - event_t) / t[2]) < 1e-4


def test_torchdiffeq_norm_tests():
    """The norm sees the state as y0 is: a 0-dim tensor, a tuple of them."""
    seen = []

    def norm(state):
        seen.append(state)
        return state.pow(2).mean().sqrt() if isinstance(state, torch.Tensor) else max(s.abs().max() for s in state)

    prg_fast.odeint(lambda t, x: x, torch.tensor(1.0), torch.tensor([0.0, 1.0]), method="dopri5", options=dict(norm=norm))
    assert seen and all(s.shape == () for s in seen)
    seen.clear()
    y0 = (torch.tensor(1.0), torch.tensor([1.0, 2.0]))
    prg_fast.odeint(lambda t, x: x, y0, torch.tensor([0.0, 1.0]), method="dopri5", options=dict(norm=norm))
    assert seen and all(isinstance(s, tuple) and s[0].shape == () and s[1].shape == (2,) for s in seen)


@pytest.mark.parametrize("adjoint", [dict(adjoint=False), {}, dict(memory_budget=0)])
def test_event_time_gradient_by_the_implicit_function_theorem(adjoint):
    """A ball dropped from h0 under gravity g hits y = 0 at t* = sqrt(2 h0 / g) with speed
    -sqrt(2 g h0): the gradients of both with respect to h0 and g, analytic."""
    g = torch.tensor(9.81, dtype=D, requires_grad=True)
    h0 = torch.tensor(10.0, dtype=D, requires_grad=True)
    f = lambda t, y: torch.stack([y[1], -g + 0 * y[0]])  # noqa: E731
    event_t, ys = prg_fast.odeint_event(f, torch.stack([h0, torch.zeros((), dtype=D)]), torch.tensor(0.0, dtype=D),
                                        event_fn=lambda t, y: y[0], rtol=1e-10, atol=1e-12, **adjoint)
    (dt_dh, dt_dg), (dv_dh, dv_dg) = (torch.autograd.grad(out, [h0, g], retain_graph=True) for out in (event_t, ys[-1, 1]))
    hv, gv = 10.0, 9.81
    expected = [1 / math.sqrt(2 * gv * hv), -0.5 * math.sqrt(2 * hv) / gv ** 1.5, -math.sqrt(gv / (2 * hv)),
                -math.sqrt(hv / (2 * gv))]
    for got, want in zip([dt_dh, dt_dg, dv_dh, dv_dg], expected):
        assert got.item() == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_gradcheck_y0_parameters_and_times(method):
    """With the steps held (first_step = max_step, every error accepted) the solve is a smooth function
    of y0, the parameters and t: gradcheck in float64, times included (t[0] moves the grid, the
    output times move through the dense output)."""
    w = torch.tensor([0.8, -0.3], dtype=D, requires_grad=True)
    f = lambda t, y: -w * y * torch.cos(t) + w.flip(0) * y.flip(0)  # noqa: E731

    def solve(y0, t, w_):
        return prg_fast.odeint(f, y0, t, method=method, rtol=1e3, atol=1e3, options=_fixed_steps(0.15), adjoint=False)

    y0 = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.3, 0.7, 1.0, 0.3 + 0.15 * 6], dtype=D, requires_grad=True)  # the last on a step end
    assert torch.autograd.gradcheck(solve, (y0, t, w))


def test_torchdiffeq_gradient_tests():
    """torchdiffeq's gradient test: gradcheck of odeint w.r.t. (y0, t) on its constant problem (solved
    exactly by every pair, whatever the steps), every adaptive method."""
    from test_torchdiffeq_compat import ConstantODE

    f = ConstantODE()
    t = torch.linspace(1, 8, 10, dtype=D, requires_grad=True)
    y0 = f.y_exact(t[:1].detach()).detach().reshape(()).requires_grad_()
    for method in sorted(ORDERS):
        assert torch.autograd.gradcheck(lambda y, tt: prg_fast.odeint(f, y, tt, method=method), (y0, t)), method


# ---------------------------------------------------------------------------------------------
# gradients: the exact derivative of the discrete solve on the accepted steps, by every strategy

STRATEGIES = {"recompute": dict(memory_budget=0), "steps": dict(memory_budget=0, store="steps"),
              "window": dict(memory_budget=20000), "auto": {}, "keep_all": dict(memory_budget=float("inf"))}


def _net_problem(dropout=0.0):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                              torch.nn.Linear(16, 2)).double()
    w = torch.tensor(0.7, dtype=D, requires_grad=True)  # a closed-over tensor, found by discovery

    def f(t, y):
        return net(torch.cat([y, t.expand(y.shape[0], 1)], 1)) * torch.where(t < 0.6, 1.0, -w)

    return f, [w, *net.parameters()], torch.randn(4, 2, dtype=D)


def _gradients(f, params, y0, t, **kw):
    torch.manual_seed(5)
    y = y0.clone().requires_grad_()
    ys = prg_fast.odeint(f, y, t, **kw)
    return ys.detach(), torch.autograd.grad((ys ** 2).sum(), [y, *params])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3"])
def test_adjoint_equals_backprop_through_the_same_solve(method, strategy):
    """Every strategy differentiates the accepted steps exactly as plain backprop through them does
    (float64, 1e-10): the dense outputs' cotangents enter their steps' stages, a step's first stage
    is its previous step's last (FSAL), a jump point is stepped over exactly."""
    f, params, y0 = _net_problem()
    t = torch.tensor([1.5, 1.0, 0.37, 0.0], dtype=D)  # decreasing, over the jump at 0.6
    kw = dict(method=method, rtol=1e-6, atol=1e-8, options=dict(jump_t=[0.6]))
    ys_ref, ref = _gradients(f, params, y0, t, adjoint=False, **kw)
    ys, got = _gradients(f, params, y0, t, **kw, **STRATEGIES[strategy])
    torch.testing.assert_close(ys, ys_ref, rtol=0, atol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_time_gradients_through_every_strategy(strategy):
    """t requiring grad: t[0] moves the whole accepted grid (every evaluation's time), each output
    time its dense output; every strategy gives plain backprop's gradients (float64, 1e-10), and
    the recomputing adjoint holds no more for it (test_recomputing_adjoint_holds_only_the_stage_inputs)."""
    f, params, y0 = _net_problem()
    kw = dict(method="dopri5", rtol=1e-6, atol=1e-8, options=dict(jump_t=[0.6]))

    def grads(**strategy_kw):
        torch.manual_seed(5)
        y, t = y0.clone().requires_grad_(), torch.tensor([1.5, 1.0, 0.37, 0.0], dtype=D, requires_grad=True)
        ys = prg_fast.odeint(f, y, t, **kw, **strategy_kw)
        return ys, torch.autograd.grad((ys ** 2).sum(), [y, t, *params])

    ys_ref, ref = grads(adjoint=False)
    ys, got = grads(**STRATEGIES[strategy])
    torch.testing.assert_close(ys.detach(), ys_ref.detach(), rtol=0, atol=0)
    assert bool(ref[1].ne(0).all())  # every time moves an output
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["auto", "recompute"])
def test_times_made_from_a_parameter(strategy):
    """t computed from an nn.Parameter (a learned end time, as PRGClassifier's learn_t): the solve
    stops its graph walk at t, and the parameter gets plain backprop's gradient."""
    f, params, y0 = _net_problem()
    end = torch.nn.Parameter(torch.tensor(1.3, dtype=D))

    def grads(**kw):
        ys = prg_fast.odeint(f, y0, torch.stack([torch.zeros((), dtype=D), end]), method="dopri5", **kw)
        return torch.autograd.grad((ys ** 2).sum(), [end, *params])

    for a, b in zip(grads(**STRATEGIES[strategy]), grads(adjoint=False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["recompute", "steps", "window"])
def test_adjoint_replays_dropout(strategy):
    """Dropout in the velocity: each recomputed evaluation draws what the forward drew (steps held:
    dropout makes the error estimate noise)."""
    f, params, y0 = _net_problem(dropout=0.3)
    t = torch.tensor([0.0, 0.37, 1.0], dtype=D)
    kw = dict(method="dopri5", rtol=1e3, atol=1e3, options=_fixed_steps(0.1))
    _, ref = _gradients(f, params, y0, t, adjoint=False, **kw)
    _, got = _gradients(f, params, y0, t, **kw, **STRATEGIES[strategy])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_auto_past_its_budget_restarts_as_the_recomputing_adjoint(monkeypatch):
    """memory_budget="auto" runs as plain backprop while the graphs fit (the budget over one
    evaluation's graph); past it, the forward starts over recomputing every evaluation -- the same
    gradients."""
    from prg_fast.ode.stored_adjoint import StoredAdjoint

    f, params, y0 = _net_problem()
    t = torch.tensor([0.0, 1.0], dtype=D)
    _, ref = _gradients(f, params, y0, t, adjoint=False, method="dopri5")
    fits = prg_fast.odeint(f, y0.clone().requires_grad_(), t, method="dopri5")
    assert fits.grad_fn.evals.as_backprop and not fits.grad_fn.evals.fell_back  # plain backprop's graph
    monkeypatch.setattr(StoredAdjoint, "budget_bytes", lambda self, device: 20000.0)
    ys = prg_fast.odeint(f, y0.clone().requires_grad_(), t, method="dopri5")
    assert ys.grad_fn.evals.fell_back
    _, got = _gradients(f, params, y0, t, method="dopri5")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("time_grad", [False, True])
def test_recomputing_adjoint_holds_only_the_stage_inputs(time_grad):
    """memory_budget=0 keeps, between forward and backward, the accepted steps' stage inputs (a
    step's last shared with the next's first) and nothing of the network's activations: what it
    holds grows with the accepted steps by one state per stage, while backprop's grows by the
    activations of every evaluation. With time gradients the same, and one state per output (the
    dense outputs' slopes in their times)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 256), torch.nn.Tanh(), torch.nn.Linear(256, 2)).double()
    y0 = torch.randn(64, 2, dtype=D, requires_grad=True)

    def held(**kw):
        seen = {}

        def pack(x):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            _, stats = prg_fast.odeint(lambda t, y: net(y) * (1 + 0.1 * t), y0, t, method="dopri5", rtol=1e-8,
                                       atol=1e-10, return_stats=True, **kw)
        return sum(seen.values()), stats

    t = torch.linspace(0, 3, 4, dtype=D, requires_grad=time_grad)  # time gradients: the same, and a slope per output
    recompute, stats = held(memory_budget=0)
    backprop, _ = held(adjoint=False)
    state = y0.numel() * 8
    assert recompute <= (stats.accepted * 6 + 2 + 4 * time_grad) * state  # 6 new stage inputs a step (dopri5, FSAL)
    assert backprop > 10 * recompute


@pytest.mark.parametrize("strategy", ["recompute", "steps"])
def test_gradcheck_through_the_adjoint(strategy):
    w = torch.tensor([0.8, -0.3], dtype=D, requires_grad=True)
    f = lambda t, y: -w * y * torch.cos(t) + w.flip(0) * y.flip(0)  # noqa: E731
    t = torch.tensor([0.3, 0.7, 1.2], dtype=D, requires_grad=True)

    def solve(y0, t_, w_):
        return prg_fast.odeint(f, y0, t_, method="tsit5", rtol=1e3, atol=1e3, options=_fixed_steps(0.15),
                               **STRATEGIES[strategy])

    assert torch.autograd.gradcheck(solve, (torch.tensor([1.0, 2.0], dtype=D, requires_grad=True), t, w))


def test_a_second_derivative_through_the_adjoints_time_gradient_is_refused():
    """The adjoint is differentiable once, its outputs' moves with their times too: a second
    derivative raises (plain backprop, adjoint=False, gives it)."""
    w = torch.tensor(0.8, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.7], dtype=D, requires_grad=True)
    kw = dict(method="dopri5", rtol=1e3, atol=1e3, options=_fixed_steps(0.15))
    (g,) = torch.autograd.grad(prg_fast.odeint(lambda t, y: -w * y, torch.ones(2, dtype=D), t, adjoint=False, **kw)
                               .sum(), t, create_graph=True)
    assert torch.autograd.grad(g[1], w)[0] != 0
    (g,) = torch.autograd.grad(prg_fast.odeint(lambda t, y: -w * y, torch.ones(2, dtype=D), t, memory_budget=0, **kw)
                               .sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(g[1], w)


def test_reversible_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="the reversible scheme needs a fixed grid"):
        prg_fast.odeint(lambda t, y: -y, torch.ones(2, requires_grad=True), torch.tensor([0.0, 1.0]),
                        method="dopri5", reversible=True)


def test_odeint_adjoint_as_torchdiffeqs_users_call_it():
    from prg_fast import odeint_adjoint as odeint

    f, params, y0 = _net_problem()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    _, ref = _gradients(f, params, y0, t, adjoint=False, method="dopri5")
    y = y0.clone().requires_grad_()
    with pytest.warns(UserWarning, match=r"\['adjoint_rtol', 'adjoint_method'\] do not apply here"):
        ys = odeint(f, y, t, rtol=1e-7, atol=1e-9, adjoint_rtol=1e-4, adjoint_method="dopri5",
                    adjoint_params=tuple(params))
    got = torch.autograd.grad((ys ** 2).sum(), [y, *params])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
