"""Time as a tensor (issue 11): exact gradients w.r.t. t, t0, t_end, save_at and odeint's grid
(gradcheck in float64, adjoint == plain backprop), per-sample times (a batch with t, t0 of shape
(B,) equals B separate solves, on every backend that runs here), and the errors for bad time
tensors.

The Triton backend runs on CPU tensors under the interpreter: TRITON_INTERPRET=1 is set at the top
of this module where no GPU is visible (as test_stage_combine_rows.py does); sizes are tiny there.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any import of triton or prg_fast.kernels

import pytest  # noqa: E402

import prg_fast  # noqa: E402
from prg_fast.ode import backends  # noqa: E402

D = torch.float64
METHODS = ["euler", "midpoint", "heun", "rk4", "rk4_38"]


class Net(torch.nn.Module):
    """A per-sample velocity with a real time dependence (through its input and a factor)."""

    def __init__(self, d=3, dtype=D):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.6 * torch.randn(d + 1, d, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=dtype))

    def forward(self, t, x):
        t = t.to(x.dtype)
        return torch.tanh(torch.cat([x, t[:, None]], 1) @ self.w + self.b) * torch.cos(t)[:, None]


def _x(b=4, d=3, dtype=D):
    return torch.linspace(-1, 1, b * d, dtype=dtype).reshape(b, d)


T = torch.tensor([0.9, 0.7, 1.0, 0.5], dtype=D)
T0 = torch.tensor([0.1, 0.0, 0.3, 0.2], dtype=D)
# per-sample save times, none of them on a uniform grid point of its sample (steps=4)
SAVE = torch.tensor([[0.31, 0.33, 0.45, 0.37], [0.52, 0.6, 0.75, 0.45]], dtype=D)
# gradcheck steps each time 1e-6 either side: one on the boundary of [0, 1] (T's 1.0, T0's 0.0) would
# step outside, which reverse/generate refuse; these interior copies keep SAVE inside every interval
T_INSIDE, T0_INSIDE = T.clamp(max=0.99), T0.clamp(min=0.01)


def _weights(shape):
    return torch.cos(torch.arange(torch.Size(shape).numel(), dtype=D)).reshape(shape)


def _grads(net, x, t, t0, *, save_at=None, weights=None, **kw):
    """Output and the gradients of a fixed weighted sum of it w.r.t. t, t0, save_at, x, params."""
    t, t0, x = t.clone().requires_grad_(), t0.clone().requires_grad_(), x.clone().requires_grad_()
    leaves = [t, t0]
    if isinstance(save_at, torch.Tensor):
        save_at = save_at.clone().requires_grad_()
        leaves.append(save_at)
    out = prg_fast.reverse(net, x, t=t, t0=t0, save_at=save_at, **kw)
    w = _weights(out.shape) if weights is None else weights.to(out.device)
    grads = torch.autograd.grad((out * w).sum(), leaves + [x] + list(net.parameters()))
    return (out.detach(),) + grads


def _assert_all_close(got, want, rtol=1e-9):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        # relative to each gradient's scale: a time gradient may be a small difference of large terms
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()))


# -- exact time gradients: gradcheck, adjoint == plain backprop ----------------------------------


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_shared_times(method, adjoint):
    net, x = Net(), _x(2)
    f = lambda t, t0, s: prg_fast.reverse(net, x, t=t, t0=t0, steps=3, method=method,  # noqa: E731
                                          adjoint=adjoint, save_at=s)
    args = (torch.tensor(0.9, dtype=D, requires_grad=True), torch.tensor(0.1, dtype=D, requires_grad=True),
            torch.tensor([0.33, 0.6], dtype=D, requires_grad=True))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda t, t0: f(t, t0, None), args[:2])


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_per_sample_times(method, adjoint):
    net, x = Net(), _x()
    f = lambda t, t0, s: prg_fast.reverse(net, x, t=t, t0=t0, steps=4, method=method,  # noqa: E731
                                          adjoint=adjoint, save_at=s)
    args = (T_INSIDE.clone().requires_grad_(), T0_INSIDE.clone().requires_grad_(), SAVE.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda t, t0: f(t, t0, None), args[:2])


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_gradcheck_generate_times(method, reversible, per_sample):
    net, z = Net(), _x()
    t, t_end = (T_INSIDE, T0_INSIDE) if per_sample else (torch.tensor(0.95, dtype=D), torch.tensor(0.05, dtype=D))
    f = lambda a, b: prg_fast.generate(net, z, t=a, t_end=b, steps=3, method=method,  # noqa: E731
                                       reversible=reversible)
    assert torch.autograd.gradcheck(f, (t.clone().requires_grad_(), t_end.clone().requires_grad_()))


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_odeint_grid(method, reversible, adjoint):
    lin = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=D)
    f = lambda t, y: torch.tanh(y @ lin) * (1 + torch.sin(3 * t))  # noqa: E731  t is 0-dim here
    y0 = torch.tensor([[0.3, -0.7], [1.0, 0.2]], dtype=D)
    grid = torch.tensor([0.0, 0.3, 0.45, 1.0], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g: prg_fast.odeint(f, y0, g, method=method, adjoint=adjoint, reversible=reversible), (grid,))
    decreasing = grid.detach().flip(0).requires_grad_()
    assert torch.autograd.gradcheck(lambda g: prg_fast.odeint(f, y0, g, method=method, adjoint=adjoint), (decreasing,))


@pytest.mark.parametrize("adjoint", [True, False])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_odeint_per_sample_grid(method, adjoint):
    """t of shape (T, B): each sample on its own grid (func sees (B,) times), equal to B separate
    odeint solves; gradcheck w.r.t. the grid."""
    lin = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=D)
    f = lambda t, y: torch.tanh(y @ lin) * (1 + torch.sin(3 * t))[:, None]  # noqa: E731
    f1 = lambda t, y: torch.tanh(y @ lin) * (1 + torch.sin(3 * t))  # noqa: E731  a 0-dim t
    y0 = torch.tensor([[0.3, -0.7], [1.0, 0.2], [-0.4, 0.1]], dtype=D)
    grid = torch.tensor([[0.0, 0.3, 0.9], [0.2, 0.5, 0.6], [1.0, 0.8, 0.4]], dtype=D)  # (T, B); sample 2 runs backwards
    ys = prg_fast.odeint(f, y0, grid, method=method, adjoint=adjoint)
    assert ys.shape == (3, 3, 2)
    for b in range(3):
        want = prg_fast.odeint(f1, y0[b], grid[:, b], method=method)
        torch.testing.assert_close(ys[:, b], want, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(
        lambda g: prg_fast.odeint(f, y0, g, method=method, adjoint=adjoint), (grid.clone().requires_grad_(),))


def test_odeint_per_sample_grid_errors():
    f = lambda t, y: y  # noqa: E731
    y0 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"needs y0 of shape \(B, \.\.\.\) with B = 2, got \(3, 2\)"):
        prg_fast.odeint(f, y0, torch.zeros(4, 2), method="rk4")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing for every sample; sample 1"):
        prg_fast.odeint(f, y0, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]), method="rk4")
    with pytest.raises(ValueError, match="finite times for every sample; sample 2"):
        prg_fast.odeint(f, y0, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, float("nan")]]), method="rk4")
    with pytest.raises(ValueError, match="not a tuple state"):
        prg_fast.odeint(lambda t, y: y, (y0, y0), torch.zeros(2, 3), method="rk4")


@pytest.mark.parametrize("save_at", [None, "shared", "per_sample"])
@pytest.mark.parametrize("method", METHODS)
def test_adjoint_equals_plain_backprop_per_sample(method, save_at):
    net, x = Net(), _x()
    save = {None: None, "shared": torch.tensor([0.45, 0.5], dtype=D), "per_sample": SAVE}[save_at]
    got = _grads(net, x, T, T0, save_at=save, steps=4, method=method, adjoint=True)
    want = _grads(net, x, T, T0, save_at=save, steps=4, method=method, adjoint=False)
    assert all(g.abs().sum() > 0 for g in want[1:])
    _assert_all_close(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_adjoint_equals_plain_backprop_shared(method):
    net, x = Net(), _x()
    t, t0 = torch.tensor(0.9, dtype=D), torch.tensor(0.15, dtype=D)
    save = torch.tensor([0.3, 0.9, 0.5], dtype=D)  # 0.9 snaps to t, 0.3 falls between grid points
    for s in (None, save):
        got = _grads(net, x, t, t0, save_at=s, steps=5, method=method, adjoint=True)
        want = _grads(net, x, t, t0, save_at=s, steps=5, method=method, adjoint=False)
        assert all(g.abs().sum() > 0 for g in want[1:])
        _assert_all_close(got, want)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_reversible_adjoint_equals_plain_backprop(method):
    net, x = Net(), _x()
    got = _grads(net, x, T, T0, steps=4, method=method, reversible=True, adjoint=True)
    want = _grads(net, x, T, T0, steps=4, method=method, reversible=True, adjoint=False)
    _assert_all_close(got, want)


def test_time_gradient_matches_the_ode():
    """For a fine grid dz(t)/dt -> f(t, z(t)) and dz(t)/dt0 -> -J f(t0, x): the discrete derivative
    converges to the continuous one (the silent zero gradient of old would fail this)."""
    net, x = Net(), _x()
    t = torch.tensor(0.8, dtype=D, requires_grad=True)
    out = prg_fast.reverse(net, x, t=t, steps=64, method="rk4")
    (gt,) = torch.autograd.grad(out.sum(), [t])
    with torch.no_grad():
        expected = net(torch.full((4,), 0.8, dtype=D), out).sum()
    torch.testing.assert_close(gt, expected, rtol=1e-8, atol=1e-10)


def test_requires_grad_time_under_no_grad_takes_the_float_path():
    net, x = Net(), _x()
    t = torch.tensor(0.9, dtype=D, requires_grad=True)
    with torch.no_grad():
        a = prg_fast.reverse(net, x, t=t, steps=4)
        b = prg_fast.reverse(net, x, t=0.9, steps=4)
    assert torch.equal(a, b)


def test_tensor_grid_matches_the_float_grid():
    net, x = Net(), _x()
    for kw in (dict(), dict(save_at=[0.3, 0.9, 0.5]), dict(method="rk4_38", steps=7)):
        with torch.no_grad():
            want = prg_fast.reverse(net, x, t=0.9, t0=0.15, **kw)
        got = prg_fast.reverse(net, x, t=torch.tensor(0.9, dtype=D, requires_grad=True), t0=0.15, **kw)
        torch.testing.assert_close(got.detach(), want, rtol=1e-14, atol=1e-15)


# -- per-sample times == B separate solves -------------------------------------------------------


def _backend_cases():
    cases = []
    for name in ("reference", "cpu", "triton"):
        why = backends.unavailable_reason(name, torch.device("cpu"))
        cases.append(pytest.param(name, "cpu", marks=pytest.mark.skipif(why is not None, reason=f"{name} on cpu: {why}")))
    for name in ("cuda", "triton"):
        cuda = torch.cuda.is_available()
        why = backends.unavailable_reason(name, torch.device("cuda")) if cuda else "no GPU visible"
        cases.append(pytest.param(name, "cuda", marks=[pytest.mark.cuda,
                                                       pytest.mark.skipif(why is not None, reason=f"{name} on cuda: {why}")]))
    return cases


def _separate(net, x, t, t0, save_at, **kw):
    """The per-sample gradients from B separate (shared-time) solves, stacked like a batch's (the
    batch's weighted sum restricted to each sample)."""
    dim = 0 if save_at is None else 1
    w = _weights(x.shape if save_at is None else (save_at.shape[0],) + tuple(x.shape))
    per = [_grads(net, x[b:b + 1], t[b], t0[b], save_at=None if save_at is None else save_at[:, b],
                  weights=w.narrow(dim, b, 1), **kw)
           for b in range(x.shape[0])]
    out = torch.cat([p[0] for p in per], dim)
    times = [torch.stack([p[i] for p in per], -1) for i in range(1, 3 if save_at is None else 4)]
    k = len(times) + 1
    gx = torch.cat([p[k] for p in per])
    params = [sum(p[i] for p in per) for i in range(k + 1, len(per[0]))]
    return (out, *times, gx, *params)


@pytest.mark.parametrize("backend,device", _backend_cases())
@pytest.mark.parametrize("save_at", [False, True])
@pytest.mark.parametrize("adjoint", [True, False])
def test_per_sample_batch_equals_separate_solves(backend, device, adjoint, save_at):
    method = "heun" if backend == "triton" and device == "cpu" else "rk4"  # the interpreter is slow
    net, x = Net().to(device), _x().to(device)
    t, t0, save = T.to(device), T0.to(device), SAVE.to(device) if save_at else None
    kw = dict(steps=3, method=method, backend=backend)
    got = _grads(net, x, t, t0, save_at=save, adjoint=adjoint, **kw)
    want = _separate(net, x, t, t0, save, adjoint=False, **kw)
    _assert_all_close(got, want)


def test_save_time_on_a_grid_point_is_a_zero_length_step():
    """A save time equal to a sample's uniform grid point adds a step of length 0 to that sample:
    an exact no-op, so outputs and the gradients w.r.t. x and the parameters equal separate solves
    (which snap it onto the grid point instead)."""
    net, x = Net(), _x()
    # on-grid: sample 0's second point (0.1 + 0.8 / 4 = 0.30000000000000004, not 0.3: 0.3 would be a step of
    # 5.6e-17, which moves the state by an ulp), 0.35, 0.475, 0.5, 1.0; 0.6 is off sample 1's grid
    save = torch.tensor([[0.1 + (0.9 - 0.1) * 1 / 4, 0.35, 0.475, 0.35], [0.5, 0.6, 1.0, 0.5]], dtype=D)
    for adjoint in (True, False):
        got = _grads(net, x, T, T0, save_at=save, steps=4, method="rk4", adjoint=adjoint)
        want = _separate(net, x, T, T0, save, steps=4, method="rk4", adjoint=False)
        assert torch.equal(got[0], want[0])
        _assert_all_close(got[4:], want[4:])


def test_shared_save_at_with_per_sample_times():
    net, x = Net(), _x()
    out = prg_fast.reverse(net, x, t=T, t0=T0, steps=4, save_at=[0.45, 0.5])
    want = prg_fast.reverse(net, x, t=T, t0=T0, steps=4, save_at=torch.tensor([[0.45] * 4, [0.5] * 4], dtype=D))
    assert out.shape == (2, 4, 3)
    assert torch.equal(out, want)


def test_model_sees_each_samples_time():
    seen = []

    def f(t, x):
        seen.append(t.clone())
        return -x

    prg_fast.reverse(f, _x(), t=T, t0=T0, steps=2, method="midpoint", adjoint=False)
    torch.testing.assert_close(seen[1], T0 + 0.25 * (T - T0))  # stage 2 of step 1: t0 + h/2
    assert seen[1].shape == (4,)


@pytest.mark.parametrize("net_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_per_sample_forward_against_the_reference(backend, net_dtype):
    why = backends.unavailable_reason(backend, torch.device("cpu"))
    if why is not None:
        pytest.skip(f"{backend} on cpu: {why}")
    x_dtype = torch.float64 if net_dtype == torch.float64 else torch.float32
    net, x = Net(dtype=net_dtype), _x(dtype=x_dtype)
    with torch.no_grad():
        got = prg_fast.reverse(net, x, t=T.to(x_dtype), t0=T0.to(x_dtype), steps=3, method="heun", backend=backend)
        want = prg_fast.reverse(net, x, t=T.to(x_dtype), t0=T0.to(x_dtype), steps=3, method="heun", backend="reference")
    assert got.dtype == x_dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[net_dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(t=torch.ones(3)), ValueError, r"t must be a number, a one-element tensor or a tensor of shape \(B,\) = \(4,\)"),
        (dict(t0=torch.zeros(4, 1)), ValueError, r"t0 must be a number, a one-element tensor or a tensor of shape \(B,\)"),
        (dict(t=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "t must be finite for every sample; sample 1 has t=nan"),
        (dict(t0=torch.tensor([0.0, 0.0, 0.0, float("inf")])), ValueError, "sample 3 has t0=inf"),
        (dict(t=torch.tensor(float("nan"))), ValueError, "t must be a finite number"),
        (dict(t=torch.tensor([1.0, 1.0, 0.2, 1.0]), t0=torch.tensor([0.0, 0.0, 0.5, 0.0])), ValueError,
         "t must be > t0 for every sample; sample 2 has t0=0.5, t=0.2"),
        (dict(t=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "sample 1 has t0=0, t=0"),
        (dict(t=torch.ones(4, dtype=torch.int64)), TypeError, "t must be a number or a floating-point tensor, got a torch.int64"),
        (dict(t=torch.ones(4, device="meta")), ValueError, "t is on meta but x is on cpu"),
        (dict(t=T, t0=T0, save_at=[0.95]), ValueError, r"save_at\[0\] = 0.95 is outside sample 0's \[t0, t\] = \[0.1, 0.9\]"),
        (dict(t=T, t0=T0, save_at=torch.full((2, 3), 0.5)), ValueError, r"save_at must have shape \(S,\) or \(S, B\) = \(S, 4\)"),
        (dict(t=T, t0=T0, save_at=[0.45], reversible=True), ValueError, "reversible=True cannot be combined with save_at on per-sample"),
        (dict(t=T, cuda_graph=True), ValueError, "cuda_graph=True replays a solve on plain float times"),
    ],
)
def test_bad_time_tensors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        prg_fast.reverse(Net(dtype=torch.float32), _x(dtype=torch.float32), steps=2, **kwargs)


def test_bad_generate_times():
    z = _x(dtype=torch.float32)
    with pytest.raises(ValueError, match="t must be > t_end for every sample; sample 0 has t_end=0.5, t=0.5"):
        prg_fast.generate(Net(dtype=torch.float32), z, t=torch.tensor([0.5, 1.0, 1.0, 1.0]), t_end=0.5)
    with pytest.raises(ValueError, match=r"t_end must be a number, a one-element tensor or a tensor of shape \(B,\) = \(4,\)"):
        prg_fast.generate(Net(dtype=torch.float32), z, t_end=torch.zeros(2))


def test_per_sample_check_finite_names_the_sample():
    f = lambda t, x: torch.where(t[:, None] > 0.55, torch.full_like(x, float("nan")), x)  # noqa: E731
    t = torch.tensor([0.5, 0.6, 0.5])
    with pytest.raises(FloatingPointError, match=r"step 1 of 1, sample 1 from t=0 to t=0\.6"):
        prg_fast.reverse(f, torch.ones(3, 2), t=t, steps=1, method="heun", check_finite=True)
