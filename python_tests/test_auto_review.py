"""Review of memory_budget="auto" (the default) and its whole-step tail: adversarial velocities,
each compared in float64 with plain backprop (adjoint=False, the oracle) and with the
per-evaluation path (memory_budget=0) -- gradients of x, the times, the parameters and what the
velocity closes over, the hooks' call counts, the buffers left behind, the random stream.
PRG_FAST_FREE_MEMORY_BYTES forces "auto" to keep everything (the tail) where the case needs it."""
import pytest
import torch
import torch.nn as nn

import prg_fast
from prg_fast.ode import free_memory
from solve_nodes import adjoint_node

INF = float("inf")
F64 = torch.float64
STRATEGIES = {"auto": dict(), "recompute": dict(memory_budget=0), "keep_all": dict(memory_budget=INF)}


@pytest.fixture(autouse=True)
def _everything_fits(monkeypatch):
    """"auto" keeps every graph here (the tail covers the whole solve), whatever the machine has free."""
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(10**15))


def _cotangent(out):
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))


def _assert_close(got, want, what, tol=1e-12):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}: gradient {i} is {a} where backprop's is {b}"
        if a is not None:
            err = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
            assert err < tol, f"{what}: gradient {i} relative error {err:.3g}"


class Net(nn.Module):
    def __init__(self, dim=4, hidden=16):
        super().__init__()
        self.a, self.b = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t[:, None]))


# -- a buffer written in place (its version moves) and saved by the graph ------------------------

class RunningScale(nn.Module):
    """Updates a running scale in place every call (an EMA under no_grad: the buffer's version moves)
    and reads it through a product, which saves it for the backward. Plain backprop raises
    (a later evaluation modified what an earlier graph saved); each evaluation's own value is what
    the adjoint replays (prg_fast.ode.module_state), so its gradient is that of `snapshot=True`:
    the same network reading a copy of the scale."""

    def __init__(self, snapshot=False):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))
        self.snapshot = snapshot

    def forward(self, t, x):
        with torch.no_grad():
            self.scale.mul_(0.5).add_(0.5 * x.abs().mean(0))
        scale = self.scale.clone() if self.snapshot else self.scale
        return torch.tanh(self.lin(x * scale)) * t[:, None]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("store", ["stages", "steps"])
def test_a_buffer_written_in_place_and_saved_by_the_graph_is_recomputed_not_an_error(name, store):
    """Kept graphs saved the buffer that every later evaluation writes in place: their backward would
    meet autograd's "modified by an inplace operation" (the per-evaluation path, the default before
    "auto", is exact here). Such graphs are not kept: the evaluations are recomputed."""
    torch.manual_seed(0)
    net = RunningScale().double()
    oracle = RunningScale(snapshot=True).double()
    oracle.load_state_dict(net.state_dict())
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    want_out = prg_fast.reverse(oracle, x, steps=3, adjoint=False)
    want = torch.autograd.grad(want_out, [x, *oracle.parameters()], _cotangent(want_out))
    out = prg_fast.reverse(net, x, steps=3, store=store, **STRATEGIES[name])
    assert torch.equal(out, want_out)
    _assert_close(torch.autograd.grad(out, [x, *net.parameters()], _cotangent(out)), want, name)
    assert torch.equal(net.scale, oracle.scale)  # written once per evaluation, as in backprop
    assert adjoint_node(out) is not None and adjoint_node(out).evals.kept_count == 0


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan", "lots"])
def test_free_memory_variable_that_is_no_finite_number_is_named(monkeypatch, value):
    """int(float("inf")) raised a bare OverflowError that named neither the variable nor the value."""
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, value)
    with pytest.raises(ValueError, match="PRG_FAST_FREE_MEMORY_BYTES must be a number of bytes"):
        prg_fast.reverse(Net().double(), torch.randn(3, 4, dtype=F64, requires_grad=True), steps=2)


# -- many velocities, one comparison ------------------------------------------------------------
#
# Each case builds a fresh velocity (same seed for every strategy) and returns a dict of what must
# equal plain backprop's: gradients, hook call counts, buffers, the random stream afterwards.

class Drop(nn.Module):
    """Dropout and BatchNorm in training mode: random draws and written buffers to replay."""

    def __init__(self, dim=4, hidden=16):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.3)

    def forward(self, t, x):
        return self.b(self.drop(self.bn(torch.tanh(self.a(x) + t[:, None]))))


def _gradients(out, inputs, names=None):
    got = torch.autograd.grad(out, list(inputs), _cotangent(out), allow_unused=True)
    return {(names[i] if names else f"grad{i}"): g for i, g in enumerate(got)}


def _solve(net, kw, x=None, inputs=(), **solve):
    """reverse(net, x) and the gradients of x, the parameters and `inputs`, plus the buffers and a
    draw from the generator after the backward (the replay must leave it where backprop does)."""
    x = torch.randn(5, 4, dtype=F64, requires_grad=True) if x is None else x
    solve.setdefault("steps", 3)
    out = prg_fast.reverse(net, x, **solve, **kw)
    leaves = [x] if x.requires_grad else []
    params = list(net.parameters()) if isinstance(net, nn.Module) else []
    found = _gradients(out, leaves + params + list(inputs))
    found["out"] = out.detach()
    if isinstance(net, nn.Module):
        found.update({f"buffer {n}": b.clone() for n, b in net.named_buffers()})
    found["rng after"] = torch.rand(2, dtype=F64)
    return found


class Energy(Net):
    """v = -dE/dx by autograd.grad(create_graph=True) inside the velocity."""

    def forward(self, t, x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = (torch.tanh(self.a(x) + t[:, None]) ** 2).sum()
            return -torch.autograd.grad(energy, x, create_graph=True)[0]


class FuncGrad(Drop):
    """torch.func.grad inside the velocity (which refuses saved-tensor hooks), after dropout and a
    BatchNorm: the adjoint's measured first evaluation is run again without its hooks, from the
    same random state and buffers."""

    def forward(self, t, x):
        h = self.b(self.drop(self.bn(torch.tanh(self.a(x) + t[:, None]))))
        return -torch.func.grad(lambda z: ((z * h) ** 2).sum())(x)


def _hooks_disabled(kw):
    with torch.autograd.graph.disable_saved_tensors_hooks("saved-tensor hooks are off here"):
        return _solve(Drop().double(), kw)


class VmapInside(Net):
    def forward(self, t, x):
        return torch.vmap(lambda xi, ti: self.b(torch.tanh(self.a(xi) + ti)))(x, t)


class Checkpointed(Drop):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, t, x):
        h = torch.utils.checkpoint.checkpoint(lambda z: torch.tanh(self.a(z)), x,
                                              use_reentrant=self.reentrant)
        return self.b(self.drop(h + t[:, None]))


class Hooked(Drop):
    """Counts what plain backprop runs once per evaluation (module backward hooks, a tensor hook
    inside the forward) or once per backward (parameter tensor hooks, post-accumulate hooks)."""

    def __init__(self):
        super().__init__()
        self.calls = dict(module_backward=0, module_backward_pre=0, inner=0, param=0, post_accumulate=0)
        self.a.register_full_backward_hook(lambda *a: self._count("module_backward"))
        self.b.register_full_backward_pre_hook(lambda *a: self._count("module_backward_pre"))
        self.a.weight.register_hook(lambda g: (self._count("param"), g.clamp(-0.05, 0.05))[1])  # modifies too
        self.b.weight.register_post_accumulate_grad_hook(lambda p: self._count("post_accumulate"))

    def _count(self, name):
        self.calls[name] += 1

    def forward(self, t, x):
        h = torch.tanh(self.a(x) + t[:, None])
        if h.requires_grad:
            h.register_hook(lambda g: (self._count("inner"), 2 * g)[1])
        return self.b(self.drop(self.bn(h)))


def _backward(net, kw):
    """.backward() and the .grad it leaves (a reentrant checkpoint refuses torch.autograd.grad)."""
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=3, **kw)
    (out * _cotangent(out)).sum().backward()
    found = {f"grad {n}": p.grad for n, p in net.named_parameters()}
    found.update({f"buffer {n}": b.clone() for n, b in net.named_buffers()})
    return dict(found, x=x.grad)


def _hooked(kw):
    net = Hooked().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=3, **kw)
    (out * _cotangent(out)).sum().backward()
    found = {f"grad {n}": p.grad for n, p in net.named_parameters()}
    found.update(x=x.grad, **net.calls)
    return found


def _twice(kw):
    """.backward(retain_graph=True) twice: .grad accumulates both, each as plain backprop's."""
    net = Drop().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=3, **kw)
    found = {}
    for i, retain in enumerate([True, False]):
        (out * _cotangent(out) * (i + 1)).sum().backward(retain_graph=retain)
        found.update({f"{i} {n}": p.grad.clone() for n, p in net.named_parameters()})
        found[f"{i} x"] = x.grad.clone()
    return found


def _closure(kw, computed=False):
    w = torch.randn(4, 4, dtype=F64, requires_grad=True)
    c = torch.randn(4, dtype=F64, requires_grad=True)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    w_used = w * 2 if computed else w  # computed: passed as adjoint_params
    extra = dict(adjoint_params=[w_used]) if computed and kw.get("adjoint", True) else {}
    velocity = lambda t, z: torch.tanh(z @ w_used) + c * t[:, None] + 0.1 * x  # noqa: E731
    out = prg_fast.reverse(velocity, x, steps=3, **extra, **kw)
    return _gradients(out, [x, w, c], ["x", "w", "c"])


def _times(kw, per_sample):
    net = Drop().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    t = torch.full((5,) if per_sample else (), 0.9, dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, t=t, t0=t0, steps=3, **kw)
    return _gradients(out, [x, t, t0, *net.parameters()])


def _odeint(kw, grid_grad=False, tuple_state=False, options=None):
    net = Drop().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    grid = torch.tensor([0.0, 0.35, 0.7, 1.0], dtype=F64, requires_grad=grid_grad)
    if tuple_state:
        y = torch.randn(5, 4, dtype=F64, requires_grad=True)
        out = prg_fast.odeint(lambda t, s: (net(t.expand(5), s[0]) + s[1], -s[0]), (x, y), grid, method="rk4", **kw)
        out = torch.stack(out)
        return _gradients(out, [x, y, *net.parameters()])
    out = prg_fast.odeint(lambda t, s: net(t.expand(5), s), x, grid, options=options, method="rk4", **kw)
    return _gradients(out, [x, *net.parameters()] + ([grid] if grid_grad else []))


def _generate(kw):
    net = Drop().double()
    z = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.generate(net, z, steps=3, **kw)
    return _gradients(out, [z, *net.parameters()])


def _functional_call(kw):
    net = Drop().double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(lambda t, z: torch.func.functional_call(net, params, (t, z)), x, steps=3, **kw)
    return _gradients(out, [x, *params.values()])


def _parametrized(kind, cached=False):
    def run(kw):
        net = Net().double()
        if kind == "orthogonal":
            net = Net(hidden=4).double()
        getattr(nn.utils.parametrizations, kind)(net.a)
        if not cached:
            return _solve(net, kw)
        with nn.utils.parametrize.cached():
            return _solve(net, kw)
    return run


def _per_sample_save_at(kw):
    net = Drop().double()
    t = torch.linspace(0.5, 1.0, 5, dtype=F64)
    return _solve(net, kw, t=t, save_at=torch.stack([0.5 * t, t]))


def _steps(kw):
    return {} if "adjoint" in kw else {"store": "steps"}  # store= is the stored adjoint's


def _x(view):
    return view.requires_grad_(True)


def _model(make):
    return lambda kw: _solve(make().double(), kw)


class ReturnsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, t, x):
        return x * self.w if t[0] > 0.5 else x


class NonContiguous(Net):
    def forward(self, t, x):
        return super().forward(t, x.t().contiguous().t()).t().contiguous().t()


class ExpandedParameter(Net):
    def forward(self, t, x):
        return (self.b.bias * t[0]).expand_as(x) + torch.tanh(x)


class NoGradInside(Net):
    def forward(self, t, x):
        with torch.no_grad():
            shift = self.a(x).mean()
        return self.b(torch.tanh(self.a(x))) + shift


class Nested(Net):
    """A velocity that runs a solve of its own (the default adjoint inside the outer one)."""

    def forward(self, t, x):
        inner = prg_fast.reverse(lambda s, z: torch.tanh(z @ self.a.weight[:4, :4]) * s[:, None], x,
                                 t=0.5, steps=2)
        return self.b(torch.tanh(self.a(inner) + t[:, None]))


CASES = {
    "euler": lambda kw: _solve(Drop().double(), kw, method="euler"),
    "midpoint": lambda kw: _solve(Drop().double(), kw, method="midpoint"),
    "rk4": lambda kw: _solve(Drop().double(), kw, method="rk4"),
    "rk4 store=steps": lambda kw: _solve(Drop().double(), kw, **_steps(kw)),
    "x without grad, parameters only": lambda kw: _solve(Drop().double(), kw, x=torch.randn(5, 4, dtype=F64)),
    "save_at with t0 and a repeated time": lambda kw: _solve(Drop().double(), kw, save_at=[0.5, 0, 0.5, 1]),
    "per-sample t and save_at": _per_sample_save_at,
    "time gradients": lambda kw: _times(kw, per_sample=False),
    "per-sample time gradients": lambda kw: _times(kw, per_sample=True),
    "generate": _generate,
    "odeint": _odeint,
    "odeint grid gradient": lambda kw: _odeint(kw, grid_grad=True),
    "odeint tuple state": lambda kw: _odeint(kw, tuple_state=True),
    "odeint step_size": lambda kw: _odeint(kw, options=dict(step_size=0.3)),
    "closure over tensors and x itself": _closure,
    "adjoint_params computed outside": lambda kw: _closure(kw, computed=True),
    "hooks": _hooked,
    "retain_graph, backward twice": _twice,
    "functional_call": _functional_call,
    "checkpoint": _model(lambda: Checkpointed(reentrant=False)),
    "reentrant checkpoint": lambda kw: _backward(Checkpointed(reentrant=True).double(), kw),
    "weight_norm": _parametrized("weight_norm"),
    "weight_norm cached": _parametrized("weight_norm", cached=True),
    "orthogonal cached": _parametrized("orthogonal", cached=True),
    "spectral_norm": _parametrized("spectral_norm"),
    "autograd.grad inside": _model(Energy),
    "torch.func.grad inside": _model(FuncGrad),
    "saved-tensor hooks disabled by the caller": _hooks_disabled,
    "vmap inside": _model(VmapInside),
    "returns its input": _model(ReturnsInput),
    "non-contiguous output": _model(NonContiguous),
    "expanded parameter output": _model(ExpandedParameter),
    "no_grad inside": _model(NoGradInside),
    "a solve inside": _model(Nested),
    # (no BatchNorm: the rows of an expanded x are equal, its batch variance 0)
    "x expanded": lambda kw: _solve(Net().double(), kw, x=_x(torch.randn(4, dtype=F64).expand(5, 4))),
    "x transposed": lambda kw: _solve(Drop().double(), kw, x=_x(torch.randn(4, 5, dtype=F64).t())),
}


def _run_case(case, kw):
    torch.manual_seed(0)
    net_seed = torch.random.get_rng_state()
    torch.set_rng_state(net_seed)
    return CASES[case](kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_equals_backprop(case):
    """"auto" (everything kept: one tail graph), recompute-all and keep-all against plain backprop:
    gradients to 1e-12, hook counts, buffers and the random stream after, exactly."""
    want = _run_case(case, dict(adjoint=False))
    for name, kw in STRATEGIES.items():
        got = _run_case(case, kw)
        assert got.keys() == want.keys(), name
        for key, b in want.items():
            a = got[key]
            if isinstance(b, torch.Tensor) and b.is_floating_point() and key != "out" and "buffer" not in key:
                _assert_close([a], [b], f"{case} / {name} / {key}")
            elif isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{case} / {name} / {key}")
            else:
                assert a == b, f"{case} / {name} / {key}: {a!r} where backprop has {b!r}"


# -- the budget boundary, the out-of-memory fallback, second derivatives --------------------------

@pytest.mark.parametrize("store", ["stages", "steps"])
def test_every_budget_boundary_equals_backprop(store):
    """Budgets of 0 .. K*s graphs (a step kept only in part, the tail from each step), with dropout,
    BatchNorm and per-sample save_at: backprop's outputs, gradients and buffers; a second backward
    equals the first bit for bit."""
    torch.manual_seed(0)
    net = Drop().double()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    t = torch.linspace(0.5, 1.0, 5, dtype=F64)
    kw = dict(t=t, save_at=torch.stack([0.5 * t, t]), steps=3, method="rk4")
    torch.manual_seed(5)
    want_out = prg_fast.reverse(net, x, adjoint=False, **kw)
    want = torch.autograd.grad(want_out, [x, *net.parameters()], _cotangent(want_out))
    want_buffers = [b.clone() for b in net.buffers()]
    net.load_state_dict(initial)
    graph = adjoint_node(prg_fast.reverse(net, x, memory_budget=INF, **kw)).evals.graph_bytes
    for kept in range(3 * 4 + 1):
        net.load_state_dict(initial)
        torch.manual_seed(5)
        out = prg_fast.reverse(net, x, memory_budget=kept * graph, store=store, **kw)
        assert adjoint_node(out).evals.kept_count == kept and torch.equal(out, want_out)
        first = torch.autograd.grad(out, [x, *net.parameters()], _cotangent(out), retain_graph=True)
        _assert_close(first, want, f"{kept} kept")
        for a, b in zip(torch.autograd.grad(out, [x, *net.parameters()], _cotangent(out)), first):
            assert torch.equal(a, b), f"{kept} kept: second backward"
        for a, b in zip(net.buffers(), want_buffers):
            assert torch.equal(a, b), f"{kept} kept: buffers"


class FailsOnce(nn.Module):
    """Raises an allocation failure on its `at`-th call with grad mode on."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, t, x):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(t, x)


@pytest.mark.parametrize("at", [2, 7])  # in the first step; inside the tail
def test_out_of_memory_fallback_keeps_hook_counts_random_stream_and_buffers(at):
    """The forward that starts over keeping nothing: hooks that plain backprop runs once per
    evaluation or once per backward run as often, the dropout draws and BatchNorm state are
    backprop's, and the generator ends where backprop leaves it."""
    def run(kw, fail):
        torch.manual_seed(0)
        net = Hooked().double()
        x = torch.randn(5, 4, dtype=F64, requires_grad=True)
        out = prg_fast.reverse(FailsOnce(net, at) if fail else net, x, steps=3, **kw)
        after = torch.rand(2, dtype=F64)
        (out * _cotangent(out)).sum().backward()
        grads = [p.grad for p in net.parameters()]
        return grads, [b.clone() for b in net.buffers()], dict(net.calls), after, out.detach()

    want = run(dict(adjoint=False), fail=False)
    got = run(dict(), fail=True)
    _assert_close(got[0], want[0], "gradients")
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1])), "buffers"
    assert got[2] == want[2]
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_second_derivative_through_the_adjoint_is_an_error(name):
    """create_graph=True, then a backward through that gradient: the adjoint's gradient is not
    differentiable again; it is torch's once_differentiable error, never a silent zero. A solve
    that keeps every graph is plain backprop (EvaluationGraphs.as_backprop): backprop's second
    derivative (python_tests/test_backprop_path_review.py)."""
    net = Net().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, **STRATEGIES[name])
    (gx,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
    if adjoint_node(out).evals.as_backprop:
        gx.square().sum().backward()
        return
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.square().sum().backward()


def test_autocast_tail_is_backprops_arithmetic():
    """Under CPU bfloat16 autocast the kept steps run as one graph: plain backprop's arithmetic, so
    its gradients to float32 rounding (the per-evaluation path rounds its cotangents differently,
    within bfloat16's error: python_tests/test_model_zoo.py)."""
    torch.manual_seed(0)
    net = Drop()
    x = torch.randn(5, 4, requires_grad=True)

    def grads(kw):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prg_fast.reverse(net, x, steps=3, **kw)
        return torch.autograd.grad(out, [x, *net.parameters()], _cotangent(out))

    want = grads(dict(adjoint=False))
    for name in ("auto", "keep_all"):
        _assert_close(grads(STRATEGIES[name]), want, name, tol=1e-6)


def test_nothing_to_differentiate_builds_no_graph():
    """x without grad and a velocity reading nothing that requires grad: no graph, backprop's states."""
    x = torch.randn(5, 4, dtype=F64)
    velocity = lambda t, z: torch.tanh(z) * t[:, None]  # noqa: E731
    want = prg_fast.reverse(velocity, x, steps=3, adjoint=False)
    for name, kw in STRATEGIES.items():
        out = prg_fast.reverse(velocity, x, steps=3, **kw)
        assert out.grad_fn is None and not out.requires_grad, name
        assert torch.equal(out, want), name
