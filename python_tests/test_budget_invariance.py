"""Issue 34: the memory budget never changes the answer. Over the model zoo (test_model_zoo's cases)
and the velocities of issue 34 -- a hook the velocity registers on its own input or on a tensor it
makes, a parameter read only through a module hook after the first evaluation (forward pre-hook,
forward hook, global module hook), a LazyLinear materialised inside the solve -- memory_budget=0,
"auto" at several simulated free-memory sizes (PRG_FAST_FREE_MEMORY_BYTES: none, one graph, a step
and one more evaluation, all but one), float("inf") and adjoint=False give the same gradients
(float64, 1e-10 relative) or the same error. A small slice runs by default, the sweep is slow."""

import functools

import pytest
import torch
from torch import nn

import prg_fast
from prg_fast.ode import free_memory
from solve_nodes import adjoint_node
from test_model_zoo import CASES as ZOO, adjoint_and_backprop_gradients, worst_relative_error

RTOL = 1e-10
HANDLES = []  # global module hooks a case registers (removed after each test)


@pytest.fixture(autouse=True)
def _remove_global_hooks():
    yield
    while HANDLES:
        HANDLES.pop().remove()


class InputHook(nn.Module):
    """Registers a hook on its input x that changes the gradient (gradient surgery) and counts."""

    def __init__(self, on_hidden=False):
        super().__init__()
        self.lin, self.out, self.on_hidden, self.calls = nn.Linear(3, 4), nn.Linear(4, 3), on_hidden, 0

    def hook(self, g):
        self.calls += 1
        return 2 * g + 0.1

    def forward(self, t, x):
        if x.requires_grad and not self.on_hidden:
            x.register_hook(self.hook)
        h = self.lin(x) * (1 + t[:, None])
        if h.requires_grad and self.on_hidden:
            h.register_hook(self.hook)
        return self.out(torch.tanh(h))


def _input_hook():
    torch.manual_seed(0)
    net = InputHook().double()
    return net, torch.randn(3, 3, dtype=torch.float64), dict(net.named_parameters()), {}, 3


def _hidden_hook():
    torch.manual_seed(0)
    net = InputHook(on_hidden=True).double()
    return net, torch.randn(3, 3, dtype=torch.float64), dict(net.named_parameters()), {}, 3


def _closure_input_hook():
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64).mul_(0.5).requires_grad_()

    def velocity(t, x):
        if x.requires_grad:
            x.register_hook(lambda g: g * 3)
        return torch.tanh(x @ w) * t[:, None]
    return velocity, torch.randn(4, 3, dtype=torch.float64), {"w": w}, {}, 3


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t, x):
        return torch.tanh(self.lin(x)) * (1 + t[:, None])


def _late(t) -> bool:
    return float(t.reshape(-1)[0]) > 0.3  # after the first evaluation (t = 0) only


def _late_pre_hook():
    """A parameter injected by a forward pre-hook (an adapter, a prompt) once t > 0.3."""
    torch.manual_seed(0)
    net, extra = Base().double(), nn.Parameter(torch.randn(3, dtype=torch.float64))
    net.register_forward_pre_hook(lambda m, args: (args[0], args[1] + extra) if _late(args[0]) else None)
    return net, torch.randn(4, 3, dtype=torch.float64), {**dict(net.named_parameters()), "extra": extra}, {}, 3


class Timed(Base):
    def forward(self, t, x):
        self.t = t
        return super().forward(t, x)


def _late_forward_hook():
    torch.manual_seed(0)
    net, scale = Timed().double(), nn.Parameter(torch.randn(3, dtype=torch.float64))
    net.lin.register_forward_hook(lambda m, args, out: out * scale if _late(net.t) else None)
    return net, torch.randn(4, 3, dtype=torch.float64), {**dict(net.named_parameters()), "scale": scale}, {}, 3


def _late_global_hook():
    torch.manual_seed(0)
    net, shift = Timed().double(), nn.Parameter(torch.randn(3, dtype=torch.float64))

    def hook(m, args, out):
        if m is net.lin and _late(net.t):
            return out + shift
    HANDLES.append(nn.modules.module.register_module_forward_hook(hook))
    return net, torch.randn(4, 3, dtype=torch.float64), {**dict(net.named_parameters()), "shift": shift}, {}, 3


class Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LazyLinear(5, dtype=torch.float64), nn.Linear(5, 3).double()

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t[:, None]))


def _lazy():
    torch.manual_seed(0)
    net = Lazy()
    x = torch.randn(2, 3, dtype=torch.float64)
    # the lazy parameters exist only after the first evaluation: asked for by position (below)
    return net, x, None, {}, 3


def _energy():
    """A velocity that makes its own leaf (the gradient of an energy): no gradient is owed to it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def velocity(t, x):
        with torch.enable_grad():
            own = x.detach().requires_grad_(True)
            return -torch.autograd.grad(net(own).sum(), own, create_graph=True)[0] * (1 + t[:, None])
    return velocity, torch.randn(4, 3, dtype=torch.float64), dict(net.named_parameters()), {}, 3


ISSUE34 = {
    "energy_own_leaf": _energy,
    "input_hook": _input_hook,
    "hidden_hook": _hidden_hook,
    "closure_input_hook": _closure_input_hook,
    "late_pre_hook": _late_pre_hook,
    "late_forward_hook": _late_forward_hook,
    "late_global_hook": _late_global_hook,
    "lazy_linear": _lazy,
}
CASES = {**ISSUE34, **{f"zoo_{k}": v for k, v in ZOO.items()}}


def _build(case):
    torch.manual_seed(0)  # for the builders that draw without seeding
    return CASES[case]()


def _grads(case, method, **strategy):
    """(output, {name: gradient}) or the error, for one strategy."""
    fn, x, tensors, kw, steps = _build(case)
    try:
        if tensors is None:  # lazy: every parameter after the solve, in order
            xg = x.clone().requires_grad_(True)
            torch.manual_seed(0)
            out = prg_fast.reverse(fn, xg, steps=steps, method=method, **strategy)
            params = list(fn.parameters())
            g = torch.autograd.grad(out.square().sum(), [xg, *params])
            return out.detach(), dict(enumerate(g))
        return adjoint_and_backprop_gradients(fn, x, tensors, adjoint=strategy.pop("adjoint", True), method=method,
                                              steps=steps, **strategy, **kw)
    except (RuntimeError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"


def _graph_bytes(case, method) -> int:
    fn, x, tensors, kw, steps = _build(case)
    x = x.clone().requires_grad_(True)
    return adjoint_node(prg_fast.reverse(fn, x, steps=steps, method=method, memory_budget=float("inf"), **kw)) \
        .evals.graph_bytes


def _strategies(case, method):
    """name -> the keywords of every strategy compared: the budgets, and "auto" at free memories
    that keep no graph, one, one step and one evaluation more (a step kept in part), all but one."""
    out = {"budget0": dict(memory_budget=0), "inf": dict(memory_budget=float("inf")), "auto_huge": {}}
    evals = _build(case)[4] * prg_fast.SOLVERS[method].stages
    graph = _graph_bytes(case, method)
    for kept in sorted({0, 1, prg_fast.SOLVERS[method].stages + 1, evals - 1}):
        if kept < evals:
            out[f"auto_keep{kept}"] = dict(free=int((kept + 0.5) * graph / free_memory.AUTO_FRACTION))
    return out


def _check(case, method, monkeypatch):
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(2 ** 50))
    out_ref, ref = _grads(case, method, adjoint=False)
    for name, kw in _strategies(case, method).items():
        kw = dict(kw)
        monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(kw.pop("free", 2 ** 50)))
        out, got = _grads(case, method, **kw)
        if isinstance(ref, str) or isinstance(got, str):
            assert got == ref, f"{case}/{method}/{name}: {got!r} where plain backprop gives {ref!r}"
            continue
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        worst, err = worst_relative_error(got, ref)
        assert err < RTOL, f"{case}/{method}/{name}: gradient {worst!r} off by {err:.3g} relative"


FAST = ["input_hook", "energy_own_leaf", "hidden_hook", "closure_input_hook", "late_pre_hook", "late_global_hook", "lazy_linear",
        "zoo_closure_over_tensors"]


@pytest.mark.parametrize("case", FAST)
def test_the_budget_never_changes_the_answer(case, monkeypatch):
    _check(case, "rk4", monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["heun", "rk4_38"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_budget_never_changes_the_answer_over_the_zoo(case, method, monkeypatch):
    _check(case, method, monkeypatch)


def test_an_input_hook_runs_once_per_evaluation_under_every_budget(monkeypatch):
    calls = {}
    for name, kw in [("backprop", dict(adjoint=False)), ("budget0", dict(memory_budget=0)),
                     ("inf", dict(memory_budget=float("inf")))]:
        net, x, _, _, steps = _input_hook()
        out = prg_fast.reverse(net, x.requires_grad_(True), steps=steps, method="rk4", **kw)
        out.sum().backward()
        calls[name] = net.calls
    assert calls == {"backprop": 12, "budget0": 12, "inf": 12}


def test_the_reversible_adjoint_refuses_an_input_hook_by_name():
    net, x, _, _, steps = _input_hook()
    with pytest.raises(RuntimeError, match=r"registers a hook on its input x \(InputHook.hook\)"):
        prg_fast.reverse(net, x.requires_grad_(True), steps=steps, reversible=True).sum().backward()


class Hidden:
    __slots__ = ("p",)  # no __dict__: the search of the velocity cannot see into it


def _hidden_parameter():
    """A parameter in a __slots__ box (the search cannot see it), added by a pre-hook once t > 0.3."""
    torch.manual_seed(0)
    box, extra = Hidden(), nn.Parameter(torch.randn(3, dtype=torch.float64))
    box.p = extra
    net = Base().double()
    net.register_forward_pre_hook(lambda m, args: (args[0], args[1] + box.p) if _late(args[0]) else None)
    return net, extra, [extra], r"parameter that requires grad \(shape \(3,\).*adjoint_params="


def _hidden_parameter_in_a_closure():
    torch.manual_seed(0)
    box, net = Hidden(), Base().double()
    box.p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    return (lambda t, x: net(t, x + box.p if _late(t) else x)), box.p, [*net.parameters(), box.p], r"parameter that requires grad.*adjoint_params="


def _late_computed_tensor():
    """A computed tensor (W = A + 1, A trained) the closure holds and reads only once t > 0.3 (its
    graph saves nothing, so the test may backpropagate through it more than once)."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    w, net = a + 1, Base().double()
    return (lambda t, x: net(t, x @ w if _late(t) else x)), a, [*net.parameters(), w], r"computed outside it \(shape \(3, 3\).*adjoint_params"


def _every_budget(monkeypatch, graph_bytes):
    yield "budget0", dict(memory_budget=0)
    yield "inf", dict(memory_budget=float("inf"))
    for kept in (1, 5, 11):
        monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(int((kept + 0.5) * graph_bytes / free_memory.AUTO_FRACTION)))
        yield f"auto_keep{kept}", {}
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(2 ** 50))


@pytest.mark.parametrize("case", [_hidden_parameter, _hidden_parameter_in_a_closure, _late_computed_tensor])
def test_a_tensor_only_a_later_evaluation_reads_is_the_same_error_under_every_budget(case, monkeypatch):
    """The solve cannot take what it never saw as an input: under every budget (kept graphs, plain
    backprop when all fit, reruns) the same error naming adjoint_params -- the budget never changes
    the answer -- while adjoint=False (plain autograd) and adjoint_params=[...] are exact."""
    fn, extra, named, message = case()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(2 ** 50))
    graph = adjoint_node(prg_fast.reverse(fn, x, steps=3, method="rk4", memory_budget=0)).evals.graph_bytes
    for name, kw in _every_budget(monkeypatch, graph):
        out = prg_fast.reverse(fn, x, steps=3, method="rk4", **kw)
        with pytest.raises(RuntimeError, match=message):
            out.sum().backward()
    out = prg_fast.reverse(fn, x, steps=3, method="rk4", adjoint=False)
    want = torch.autograd.grad(out.sum(), [x, extra])
    for kw in (dict(memory_budget=0), dict(memory_budget=float("inf"))):
        out = prg_fast.reverse(fn, x, steps=3, method="rk4", adjoint_params=[*(fn.parameters() if isinstance(fn, nn.Module) else ()), *named], **kw)
        got = torch.autograd.grad(out.sum(), [x, extra])
        for g, w in zip(got, want):
            assert ((g - w).norm() / w.norm()).item() < RTOL


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("kw", [dict(memory_budget=0), dict(memory_budget=float("inf")), dict(store="steps"),
                                dict(store="steps", memory_budget=float("inf"))], ids=str)
def test_an_input_hook_under_time_gradients_and_stored_steps_is_plain_backprops(kw, x_grad):
    """Time gradients keep evaluation 0's graph from a leaf of the solve's own; store="steps" reruns
    step 0 from its start state: neither may hand the velocity x itself a second time."""
    def run(**strategy):
        net, x, _, _, steps = _input_hook()
        x, t = x.requires_grad_(x_grad), torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(net, x, t=t, steps=steps, method="rk4", save_at=[0.4, 0.8], **strategy)
        grads = torch.autograd.grad(out.square().sum(), [t, *([x] if x_grad else []), *net.parameters()])
        return torch.cat([g.reshape(-1) for g in grads]), net.calls
    (got, calls), (want, want_calls) = run(**kw), run(adjoint=False)
    assert calls == want_calls
    assert ((got - want).norm() / want.norm()).item() < RTOL


class PlainLeafHook(nn.Module):
    """A module whose forward pre-hook adds a plain leaf tensor (requires_grad, not a parameter)
    from a __slots__ box once t > 0.3: hidden from the search, read only after the first evaluation."""

    def __init__(self, box):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_forward_pre_hook(lambda m, args: (args[0], args[1] + box.p) if _late(args[0]) else None)

    def forward(self, t, x):
        return torch.tanh(self.lin(x)) * (1 + t[:, None])


def _plain_leaf_velocities(box):
    """name -> velocity reading box.p only after its first evaluation: a module through its hook, a
    closure, and a functools.partial wrapper around a plain function."""
    torch.manual_seed(0)
    net = Base().double()

    def late(lin, t, x):
        return torch.tanh(lin(x + box.p if _late(t) else x))
    return {"module_hook": PlainLeafHook(box).double(), "closure": lambda t, x: net(t, x + box.p if _late(t) else x),
            "partial": functools.partial(late, nn.Linear(3, 3).double())}


PLAIN_LEAF_STRATEGIES = {"budget0": dict(memory_budget=0), "inf": dict(memory_budget=float("inf")),
                         "auto": {}, "store_steps": dict(store="steps", memory_budget=0),
                         "reversible": dict(reversible=True)}


@pytest.mark.parametrize("velocity", ["module_hook", "closure", "partial"])
def test_a_plain_leaf_only_a_later_evaluation_reads_gets_plain_backprops_gradient_under_every_budget(velocity,
                                                                                                    monkeypatch):
    """A plain leaf tensor the search cannot see and only a later evaluation reads is no input of the
    solve; loss.backward() still accumulates into its .grad what plain backprop does, its hook running
    once on the total, whatever the budget kept -- as when every graph fit and the solve ran as plain
    backprop (it used to get nothing from a solve that reran evaluations)."""
    box = Hidden()
    box.p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = _plain_leaf_velocities(box)[velocity]
    calls = []
    box.p.register_hook(lambda g: calls.append(1))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def grads(**kw):
        box.p.grad = x.grad = None
        calls.clear()
        prg_fast.reverse(fn, x, steps=3, method="rk4", **kw).square().sum().backward()
        assert box.p.grad is not None and len(calls) == 1, kw
        return box.p.grad.clone(), x.grad.clone()

    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(2 ** 50))
    want = grads(adjoint=False)
    graph = adjoint_node(prg_fast.reverse(fn, x, steps=3, method="rk4", memory_budget=0)).evals.graph_bytes
    every = [*PLAIN_LEAF_STRATEGIES.items(), *_every_budget(monkeypatch, graph)]
    for name, kw in every:
        # the reversible scheme is another solver: its plain backprop is the truth for it
        truth = grads(reversible=True, adjoint=False) if kw.get("reversible") else want
        for g, w in zip(grads(**kw), truth):
            assert ((g - w).norm() / w.norm()).item() < RTOL, (velocity, name)


def test_a_plain_leaf_only_a_later_step_reads_gets_its_gradient_from_an_adaptive_solve():
    box = Hidden()
    box.p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = _plain_leaf_velocities(box)["partial"]  # (odeint's t is 0-dim)
    y0, t = torch.randn(4, 3, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64)
    got = {}
    for name, kw in {"backprop": dict(adjoint=False), "budget0": dict(memory_budget=0)}.items():
        box.p.grad = None
        prg_fast.odeint(fn, y0, t, method="dopri5", rtol=1e-9, atol=1e-9, **kw).square().sum().backward()
        got[name] = box.p.grad.clone()
    assert ((got["budget0"] - got["backprop"]).norm() / got["backprop"].norm()).item() < RTOL


def test_a_leaf_the_velocity_makes_is_not_kept_across_the_backward(monkeypatch):
    """An energy velocity makes its own leaf per evaluation (x.detach().requires_grad_()): its share dies
    with its evaluation's graph, so a rerunning backward holds at most the evaluation in hand's, however
    many steps (memory flat), and the gradients stay plain backprop's."""
    from prg_fast.ode import rerun
    held, add = [], rerun.HiddenLeaves.add

    def counting_add(self, leaves, grads):
        add(self, leaves, grads)
        held.append(len(self.sums))
    monkeypatch.setattr(rerun.HiddenLeaves, "add", counting_add)
    fn, x, tensors, _, _ = _energy()
    got = adjoint_and_backprop_gradients(fn, x, tensors, adjoint=True, method="rk4", steps=12, memory_budget=0)[1]
    want = adjoint_and_backprop_gradients(fn, x, tensors, adjoint=False, method="rk4", steps=12)[1]
    assert len(held) >= 12 * 4 - 1 and max(held) <= 1, held
    worst, err = worst_relative_error(got, want)
    assert err < RTOL, (worst, err)
