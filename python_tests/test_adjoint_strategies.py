"""Adjoint strategies (issue 10): memory_budget (keep evaluation graphs, skip their recomputation)
and store="steps" (one state per step). Every strategy is exact: gradients equal plain backprop
through the same solver, every method, float64; the budget boundaries keep exactly the number of
graphs they pay for; the hot path runs no extra evaluations. Every strategy also equals plain
backprop on a corpus of adversarial velocities (dropout, BatchNorm, hooks, closures, checkpoint,
parametrizations, torch.func inside, nested solves: gradients, hook counts, buffers, the random
stream after); the plain path (every graph kept) is backprop's for a second backward and for second
derivatives, where the adjoints' once-differentiable backward is an error; solves free their
graphs without the garbage collector."""
import copy
import gc
import math
import weakref

import pytest
import torch
import torch.utils.checkpoint  # (torch < 2.6 does not import it with torch)
import torch.nn as nn

import prg_fast
from prg_fast.ode.solvers import SOLVERS
from gradient_checks import (BUDGET_STRATEGIES, THREE_WAYS, Hooked, TwoLayer, assert_grads_close, cotangent, grads,
                             rel_err, seeded_net)
from solve_nodes import adjoint_node

METHODS = sorted(SOLVERS)
INF = float("inf")
F64 = torch.float64


class Counting(torch.nn.Module):
    """Wraps a velocity and counts its calls with and without grad mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = {"grad": 0, "no_grad": 0}

    def forward(self, t, x):
        self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return self.inner(t, x)


def _graph_bytes(model, x, **kw):
    out = prg_fast.reverse(model, x, memory_budget=INF, **kw)
    return adjoint_node(out).evals.graph_bytes


def _budgets(model, x, kw):
    """The budget boundaries: none, zero, one byte short of one graph, one graph, half, all."""
    total = kw["steps"] * SOLVERS[kw["method"]].stages
    g = _graph_bytes(model, x, **kw)
    assert g > 0
    return [(None, 0), (0, 0), (g - 1, 0), (g, 1), ((total // 2) * g, total // 2), (INF, total)]


@pytest.mark.parametrize("store", ["stages", "steps"])
@pytest.mark.parametrize("method", METHODS)
def test_every_budget_equals_backprop(mlp, method, store):
    model = mlp(dim=5).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=4, method=method)
    ref_out = prg_fast.reverse(model, x, adjoint=False, **kw)
    ref = grads(ref_out, inputs)
    for budget, kept in _budgets(model, x, kw):
        out = prg_fast.reverse(model, x, memory_budget=budget, store=store, **kw)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert adjoint_node(out).evals.kept_count == kept, (budget, kept)
        for a, b in zip(grads(out, inputs), ref):
            assert rel_err(a, b) < 1e-12, (budget, store, rel_err(a, b))


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_counts(mlp, method):
    """No probe evaluation: the forward runs K*s evaluations; the backward recomputes exactly the
    evaluations whose graphs were not kept, plus s-1 per step for store="steps"."""
    s, steps = SOLVERS[method].stages, 3
    total = steps * s
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    inner = mlp(dim=4).double()
    g = _graph_bytes(inner, x, steps=steps, method=method)
    for budget, store, backward_evals in [
        (None, "stages", total),
        (INF, "stages", 0),
        (2 * g, "stages", total - 2),
        (None, "steps", total + steps * (s - 1)),
        (INF, "steps", 0),
    ]:
        model = Counting(inner)
        out = prg_fast.reverse(model, x, steps=steps, method=method, memory_budget=budget, store=store)
        assert sum(model.calls.values()) == total, (budget, store, model.calls)
        before = dict(model.calls)
        out.sum().backward()
        spent = sum(model.calls.values()) - sum(before.values())
        assert spent == backward_evals, (budget, store, spent)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_store_steps_keeps_one_state_per_step(mlp, method):
    model = mlp(dim=6)
    x = torch.randn(8, 6, requires_grad=True)
    for steps in (1, 4, 16):
        out = prg_fast.reverse(model, x, steps=steps, method=method, store="steps", memory_budget=0)
        kept = adjoint_node(out).saved_tensors
        assert len(kept) == steps
        assert sum(t.numel() * t.element_size() for t in kept) == steps * x.numel() * 4
        out.sum().backward()


@pytest.mark.parametrize("store", ["stages", "steps"])
@pytest.mark.parametrize("method", ["euler", "rk4", "rk4_38"])
def test_save_at_with_strategies(mlp, method, store):
    model = mlp(dim=4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(t=1.0, steps=4, method=method, save_at=[0.25, 1.0, 0.0, 0.6, 0.25])
    inputs = [x] + list(model.parameters())
    ref_out = prg_fast.reverse(model, x, adjoint=False, **kw)
    ref = grads(ref_out, inputs)
    g = _graph_bytes(model, x, **kw)
    for budget in (None, 3 * g, INF):
        out = prg_fast.reverse(model, x, memory_budget=budget, store=store, **kw)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for a, b in zip(grads(out, inputs), ref):
            assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("store", ["stages", "steps"])
@pytest.mark.parametrize("budget", ["half", INF])
def test_dropout_replayed_with_strategies(mlp, budget, store):
    model = mlp(dim=4, hidden=64, dropout=0.5).double().train()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(steps=3, method="rk4")
    if budget == "half":
        torch.manual_seed(9)
        budget = 6 * _graph_bytes(model, x, **kw)
    torch.manual_seed(5)
    a = prg_fast.reverse(model, x, memory_budget=budget, store=store, **kw)
    if budget == INF:  # every graph kept: the solve is plain backprop, nothing is replayed
        assert adjoint_node(a).evals.as_backprop
    else:
        assert adjoint_node(a).rng is not None  # dropout drew: the states are replayed
    ga = grads(a, inputs)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = prg_fast.reverse(model, x, adjoint=False, **kw)
    gb = grads(b, inputs)
    after_b = torch.rand(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(after_a, after_b)
    for u, v in zip(ga, gb):
        assert rel_err(u, v) < 1e-12


def test_no_random_state_kept_when_nothing_random_runs(mlp):
    model = mlp(dim=4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(model, x, steps=3, memory_budget=0)  # every evaluation rerun
    assert adjoint_node(out).rng is None


@pytest.mark.parametrize("budget", [0, INF])
def test_autocast_with_budget(budget):
    """A kept graph was recorded under the forward's autocast: gradients within twice PyTorch's own
    bf16 error of float64 backprop, as the recomputing adjoint."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6))

    def f_of(model):
        return lambda t, x: model(x) * t[:, None].to(x.dtype)

    x = torch.randn(4, 6)

    def solve_grads(model, xx, autocast, **kw):
        xx = xx.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = prg_fast.reverse(f_of(model), xx, steps=4, method="rk4", **kw)
        return torch.autograd.grad(z.square().sum(), [xx] + list(model.parameters()))

    ref = solve_grads(copy.deepcopy(net).double(), x.double(), False, adjoint=False)
    plain_bf16 = solve_grads(net, x, True, adjoint=False)
    ours = solve_grads(net, x, True, memory_budget=budget)
    for o, p, r in zip(ours, plain_bf16, ref):
        torch_err = (p.double() - r).abs().max().item()
        our_err = (o.double() - r).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


@pytest.mark.parametrize("store", ["stages", "steps"])
@pytest.mark.parametrize("method", ["euler", "heun", "rk4_38"])
def test_odeint_and_closures_with_strategies(method, store):
    torch.manual_seed(3)
    A = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    func = prg_fast.time_reversed(lambda t, y: net(torch.tanh(y @ A)) * (1 + t))  # closes over A and net
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grid = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    inputs = [y0, A] + list(net.parameters())
    ref = grads(prg_fast.odeint(func, y0, grid, method=method, adjoint=False), inputs)
    for budget in (None, 0, INF):
        out = prg_fast.odeint(func, y0, grid, method=method, memory_budget=budget, store=store)
        for a, b in zip(grads(out, inputs), ref):
            assert rel_err(a, b) < 1e-12


def test_generate_with_budget(mlp):
    model = mlp(dim=3).double()
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    inputs = [z] + list(model.parameters())
    ref = grads(prg_fast.generate(model, z, steps=3, adjoint=False), inputs)
    out = prg_fast.generate(model, z, steps=3, memory_budget=INF, store="steps")
    for a, b in zip(grads(out, inputs), ref):
        assert rel_err(a, b) < 1e-12


def test_second_backward_recomputes_consumed_graphs(mlp):
    """Each kept graph is freed by its VJP; a backward with retain_graph=True followed by a second
    one recomputes what was consumed and gives the same gradients."""
    model = mlp(dim=4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    out = prg_fast.reverse(model, x, steps=3, memory_budget=INF)
    first = grads(out, inputs, retain_graph=True)
    assert not adjoint_node(out).evals.kept  # all handed to the first backward
    second = grads(out, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_graph_bytes_measure_saved_activations():
    """The measured bytes of one evaluation's graph are those of the activations autograd saves
    (not the parameters, not the stage input) plus the output it holds."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    model = lambda t, x: lin2(torch.tanh(lin1(x)))  # noqa: E731
    x = torch.randn(8, 16, requires_grad=True)
    g = _graph_bytes(model, x, steps=2, method="euler")
    # tanh saves its output (8x64), lin2 saves its input (the same tensor); output 8x16; float32
    assert g == (8 * 64 + 8 * 16) * 4, g


def test_time_tensor_built_once_per_time(mlp):
    seen = {}

    def f(t, x):
        seen.setdefault(float(t[0]), set()).add(id(t))
        return -x

    x = torch.randn(2, 3, requires_grad=True)
    prg_fast.reverse(f, x, steps=2, method="rk4").sum().backward()
    assert seen and all(len(ids) == 1 for ids in seen.values()), seen


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan, "1GB", True, [1]])
def test_bad_memory_budget(mlp, bad):
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="memory_budget"):
        prg_fast.reverse(mlp(dim=3), x, steps=2, memory_budget=bad)


@pytest.mark.parametrize("bad", ["stage", "STEPS", None, 1])
def test_bad_store(mlp, bad):
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="store"):
        prg_fast.reverse(mlp(dim=3), x, steps=2, store=bad)


@pytest.mark.parametrize("kw", [dict(reversible=True, memory_budget=0), dict(reversible=True, store="steps"),
                                dict(adjoint=False, memory_budget=INF), dict(adjoint=False, store="steps")])
def test_strategies_need_the_stored_adjoint(mlp, kw):
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="memory_budget.*store"):
        prg_fast.reverse(mlp(dim=3), x, steps=2, **kw)


@pytest.mark.parametrize("kw", [dict(memory_budget=INF), dict(memory_budget="half"), dict(store="steps"),
                                dict(store="steps", memory_budget="half")])
def test_gradcheck_float64_strategies(kw):
    torch.manual_seed(4)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    f = lambda t, y: torch.tanh(y @ A) * (1 + t[:, None])  # noqa: E731
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    if kw.get("memory_budget") == "half":
        kw = dict(kw, memory_budget=4 * _graph_bytes(f, x, steps=2, method="rk4"))
    assert torch.autograd.gradcheck(lambda x, A: prg_fast.reverse(f, x, steps=2, method="rk4", **kw), (x, A))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter (no GPU here)")
@pytest.mark.parametrize("kw", [dict(), dict(memory_budget=INF), dict(store="steps")])
def test_no_host_synchronisation_on_cuda(mlp, kw):
    model = mlp(dim=8).cuda()
    x = torch.randn(16, 8, device="cuda", requires_grad=True)
    run = lambda: prg_fast.reverse(model, x, steps=4, method="rk4", **kw).sum().backward()  # noqa: E731
    run()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kw", [dict(memory_budget=INF), dict(memory_budget="half"), dict(store="steps"), dict(),
                                dict(store="steps", memory_budget=0)])
def test_mixed_dtypes_strategies_match_the_default_adjoint(mlp, kw):
    """A float32 network on a float64 state (stage inputs cast to the network's dtype): graphs kept
    as whole steps run plain backprop's arithmetic, recomputed ones the recomputing adjoint's, so
    each equals its own bit for bit, and a budget mixing both equals either to float32 rounding."""
    model = mlp(dim=5)  # float32 parameters
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    base = dict(steps=3, method="rk4")
    if kw.get("memory_budget") == "half":
        kw = dict(memory_budget=6 * _graph_bytes(model, x, **base))  # one whole step and two evaluations
    recomputed = grads(prg_fast.reverse(model, x, memory_budget=0, **base), inputs)
    backprop = grads(prg_fast.reverse(model, x, adjoint=False, **base), inputs)
    got = grads(prg_fast.reverse(model, x, **base, **kw), inputs)
    # the default ("auto") keeps every graph of this small solve
    same = {INF: backprop, 0: recomputed}.get(kw.get("memory_budget", INF))
    eps = torch.finfo(torch.float32).eps  # the network's rounding; 12 evaluations' terms per gradient
    for a, b, c in zip(got, recomputed, backprop):
        torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps * b.abs().max().item())
        torch.testing.assert_close(a, c, rtol=16 * eps, atol=16 * eps * c.abs().max().item())
    if same is not None:
        for a, b in zip(got, same):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class TimeNet(torch.nn.Module):
    """A velocity that reads t nonlinearly (so dL/dt flows through the network, not only through h)."""

    def __init__(self, d=5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
        self.u = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, t, x):
        return torch.tanh(x @ self.w + torch.sin(3 * t)[:, None] * self.u)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared_t", "per_sample_t"])
@pytest.mark.parametrize("budget,store", [(INF, "stages"), (INF, "steps"), (None, "steps"), ("half", "stages")])
def test_time_gradients_under_every_strategy(method, per_sample, budget, store):
    """Kept graphs read their time through a leaf of their own (issue 11 x issue 10): dL/dt and
    dL/dt0 through kept and recomputed evaluations equal plain backprop through the same solver."""
    net = TimeNet()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    shape = (4,) if per_sample else ()
    t = torch.full(shape, 0.9, dtype=torch.float64).add(torch.linspace(0, 0.05, 4) if per_sample else 0).requires_grad_()
    t0 = torch.full(shape, 0.1, dtype=torch.float64).requires_grad_()
    kw = dict(steps=3, method=method, save_at=None)
    if budget == "half":
        budget = (3 * SOLVERS[method].stages // 2) * _graph_bytes(net, x.detach(), t=0.9, t0=0.1, steps=3, method=method)
    inputs = [x, t, t0, *net.parameters()]
    ref = grads(prg_fast.reverse(net, x, t, t0=t0, adjoint=False, **kw), inputs)
    got = grads(prg_fast.reverse(net, x, t, t0=t0, memory_budget=budget, store=store, **kw), inputs)
    for name, a, b in zip(["x", "t", "t0", "w", "u"], got, ref):
        assert rel_err(a, b) < 1e-10, name


def test_differentiated_calls_free_every_activation():
    """Regression: the first evaluation's graph used to be kept alive by a reference cycle (a
    saved-tensor pack hook returning its argument makes a node hold its own output), so every
    differentiated call leaked one evaluation's activations -- gigabytes over a finetuning run.
    Every activation the velocity makes must be freed once the backward is done."""
    import weakref

    made = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)

        def forward(self, t, x):
            h = torch.relu(self.lin(x))  # relu saves its own output: the cycle's shape
            y = torch.sigmoid(h) + t[:, None]  # so does sigmoid
            made.extend([weakref.ref(h), weakref.ref(y)])
            return y

    net = Net()
    for budget, store in [(None, "stages"), (INF, "stages"), (None, "steps"), (INF, "steps")]:
        made.clear()
        x = torch.randn(3, 6, requires_grad=True)
        prg_fast.reverse(net, x, steps=2, method="heun", memory_budget=budget, store=store).square().sum().backward()
        assert made, "the velocity was not called"
        alive = sum(r() is not None for r in made)
        assert alive == 0, f"{alive} of {len(made)} activations still alive after the backward ({budget}, {store})"


# -- every strategy on many velocities, one comparison with plain backprop ----------------------
#
# Each case builds a fresh velocity (same seed for every strategy) and returns a dict of what must
# equal plain backprop's: gradients, hook call counts, buffers, the random stream afterwards.
# "auto" keeps everything here (everything_fits: the tail covers the whole solve).


class Drop(TwoLayer):
    """Dropout and BatchNorm in training mode: random draws and written buffers to replay."""

    def __init__(self):
        super().__init__(dropout=0.3, batchnorm=True)


def _gradients(out, inputs, names=None):
    got = torch.autograd.grad(out, list(inputs), cotangent(out), allow_unused=True)
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


class Energy(TwoLayer):
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


class VmapInside(TwoLayer):
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


def _backward(net, kw):
    """.backward() and the .grad it leaves (a reentrant checkpoint refuses torch.autograd.grad)."""
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=3, **kw)
    (out * cotangent(out)).sum().backward()
    found = {f"grad {n}": p.grad for n, p in net.named_parameters()}
    found.update({f"buffer {n}": b.clone() for n, b in net.named_buffers()})
    return dict(found, x=x.grad)


def _hooked(kw):
    net = Hooked().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=3, **kw)
    (out * cotangent(out)).sum().backward()
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
        (out * cotangent(out) * (i + 1)).sum().backward(retain_graph=retain)
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
        net = TwoLayer().double()
        if kind == "orthogonal":
            net = TwoLayer(hidden=4).double()
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


class NonContiguous(TwoLayer):
    def forward(self, t, x):
        return super().forward(t, x.t().contiguous().t()).t().contiguous().t()


class ExpandedParameter(TwoLayer):
    def forward(self, t, x):
        return (self.b.bias * t[0]).expand_as(x) + torch.tanh(x)


class NoGradInside(TwoLayer):
    def forward(self, t, x):
        with torch.no_grad():
            shift = self.a(x).mean()
        return self.b(torch.tanh(self.a(x))) + shift


class Nested(TwoLayer):
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
    "x expanded": lambda kw: _solve(TwoLayer().double(), kw, x=_x(torch.randn(4, dtype=F64).expand(5, 4))),
    "x transposed": lambda kw: _solve(Drop().double(), kw, x=_x(torch.randn(4, 5, dtype=F64).t())),
}


def _run_case(case, kw):
    torch.manual_seed(0)
    net_seed = torch.random.get_rng_state()
    torch.set_rng_state(net_seed)
    return CASES[case](kw)


@pytest.mark.usefixtures("everything_fits")
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_equals_backprop(case):
    """"auto" (everything kept: one tail graph), recompute-all and keep-all against plain backprop:
    gradients to 1e-12, hook counts, buffers and the random stream after, exactly."""
    want = _run_case(case, dict(adjoint=False))
    for name, kw in BUDGET_STRATEGIES.items():
        got = _run_case(case, kw)
        assert got.keys() == want.keys(), name
        for key, b in want.items():
            a = got[key]
            if isinstance(b, torch.Tensor) and b.is_floating_point() and key != "out" and "buffer" not in key:
                assert_grads_close([a], [b], f"{case} / {name} / {key}")
            elif isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{case} / {name} / {key}")
            else:
                assert a == b, f"{case} / {name} / {key}: {a!r} where backprop has {b!r}"


# -- budget boundaries, second derivatives, nothing to differentiate, buffers saved by a graph ------


@pytest.mark.usefixtures("everything_fits")
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
    want = torch.autograd.grad(want_out, [x, *net.parameters()], cotangent(want_out))
    want_buffers = [b.clone() for b in net.buffers()]
    net.load_state_dict(initial)
    graph = adjoint_node(prg_fast.reverse(net, x, memory_budget=INF, **kw)).evals.graph_bytes
    for kept in range(3 * 4 + 1):
        net.load_state_dict(initial)
        torch.manual_seed(5)
        out = prg_fast.reverse(net, x, memory_budget=kept * graph, store=store, **kw)
        assert adjoint_node(out).evals.kept_count == kept and torch.equal(out, want_out)
        first = torch.autograd.grad(out, [x, *net.parameters()], cotangent(out), retain_graph=True)
        assert_grads_close(first, want, f"{kept} kept")
        for a, b in zip(torch.autograd.grad(out, [x, *net.parameters()], cotangent(out)), first):
            assert torch.equal(a, b), f"{kept} kept: second backward"
        for a, b in zip(net.buffers(), want_buffers):
            assert torch.equal(a, b), f"{kept} kept: buffers"


@pytest.mark.usefixtures("everything_fits")
@pytest.mark.parametrize("name", sorted(BUDGET_STRATEGIES))
def test_a_second_derivative_through_the_adjoint_is_an_error(name):
    """create_graph=True, then a backward through that gradient: the adjoint's gradient is not
    differentiable again; it is torch's once_differentiable error, never a silent zero. A solve
    that keeps every graph is plain backprop (EvaluationGraphs.as_backprop): backprop's second
    derivative (test_second_derivative_of_the_plain_path_is_backprops, below)."""
    net = TwoLayer().double()
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, **BUDGET_STRATEGIES[name])
    (gx,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
    if adjoint_node(out).evals.as_backprop:
        gx.square().sum().backward()
        return
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.square().sum().backward()


@pytest.mark.usefixtures("everything_fits")
def test_nothing_to_differentiate_builds_no_graph():
    """x without grad and a velocity reading nothing that requires grad: no graph, backprop's states."""
    x = torch.randn(5, 4, dtype=F64)
    velocity = lambda t, z: torch.tanh(z) * t[:, None]  # noqa: E731
    want = prg_fast.reverse(velocity, x, steps=3, adjoint=False)
    for name, kw in BUDGET_STRATEGIES.items():
        out = prg_fast.reverse(velocity, x, steps=3, **kw)
        assert out.grad_fn is None and not out.requires_grad, name
        assert torch.equal(out, want), name


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


@pytest.mark.usefixtures("everything_fits")
@pytest.mark.parametrize("name", sorted(BUDGET_STRATEGIES))
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
    want = torch.autograd.grad(want_out, [x, *oracle.parameters()], cotangent(want_out))
    out = prg_fast.reverse(net, x, steps=3, store=store, **BUDGET_STRATEGIES[name])
    assert torch.equal(out, want_out)
    assert_grads_close(torch.autograd.grad(out, [x, *net.parameters()], cotangent(out)), want, name)
    assert torch.equal(net.scale, oracle.scale)  # written once per evaluation, as in backprop
    assert adjoint_node(out) is not None and adjoint_node(out).evals.kept_count == 0


# -- the plain path: a second backward, second derivatives, graphs freed without gc ---------------


def test_retain_graph_second_backward_is_the_first():
    net = seeded_net()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2)
    g = cotangent(out)
    first = torch.autograd.grad(out, [x] + list(net.parameters()), g, retain_graph=True)
    for a, b in zip(torch.autograd.grad(out, [x] + list(net.parameters()), g), first):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", ["linear", "square"])
def test_second_derivative_of_the_plain_path_is_backprops(loss):
    """create_graph=True through the plain path, then torch.autograd.grad of that gradient: the
    second derivative is backprop's (it was once_differentiable, whose DelayedError node
    torch.autograd.grad(..., inputs) prunes: the term through the cotangent went missing silently)."""
    net = seeded_net()
    second = []
    for way in (THREE_WAYS[0], THREE_WAYS[2]):
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(net, x, steps=2, method="midpoint", **way)
        first = (out * cotangent(out)).sum() if loss == "linear" else out.square().sum()
        gx, = torch.autograd.grad(first, [x], create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), [x] + list(net.parameters())))
    assert_grads_close(second[0], second[1])


def test_gradgradcheck_tiny_plain_path():
    """The plain path's second derivative, against finite differences of its first (float64)."""
    torch.manual_seed(0)
    net = TwoLayer(2, 3).double()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def solve(x, *p):
        out = prg_fast.reverse(net, x, steps=2, method="midpoint")
        assert adjoint_node(out).evals.as_backprop
        return out

    assert torch.autograd.gradgradcheck(solve, (x, *net.parameters()))


@pytest.mark.parametrize("way", [dict(memory_budget=0), dict(reversible=True), dict(memory_budget=0, store="steps")])
def test_second_derivative_through_the_adjoints_is_the_error_under_autograd_grad(way):
    """The adjoints' backward is once differentiable. torch's error node sat only on the path
    through the cotangent, which torch.autograd.grad(..., inputs) prunes when another path reaches
    the inputs: the second-order term went missing silently. Now the error, every adjoint; a
    first derivative taken with create_graph=True is unchanged."""
    net = seeded_net()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, **way)
    gx, = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
    want, = torch.autograd.grad(prg_fast.reverse(net, x, steps=2, **way).square().sum(), [x])
    assert torch.equal(gx.detach(), want)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(gx.square().sum() + x.square().sum(), [x])
    out = prg_fast.reverse(net, x, steps=2, **way)
    gp = torch.autograd.grad((out * cotangent(out)).sum(), list(net.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(sum(g.square().sum() for g in gp) + x.sum(), [x])


@pytest.mark.parametrize("way", [dict(), dict(memory_budget=0), dict(reversible=True)])
def test_sequential_solves_free_their_graphs_without_gc(way):
    """No reference cycle keeps x or the solve's record alive through its backward node (ctx.evals,
    ctx.differentiated): refcounting alone frees them once the output is gone."""
    net = seeded_net()
    gc.collect()
    gc.disable()
    try:
        refs = []
        for _ in range(3):
            x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
            out = prg_fast.reverse(net, x * 1, steps=2, **way)
            out.sum().backward()
            node = adjoint_node(out) if "reversible" not in way else out.grad_fn.next_functions[0][0]
            refs += [weakref.ref(x), weakref.ref(node.evals if "reversible" not in way else node.problem)]
            del node
            del x, out
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


# -- odeint on a per-sample (T, B) grid honours memory_budget= and store= ---------------------------


class CountingTwoLayer(TwoLayer):
    def __init__(self):
        super().__init__(3, 5)
        self.calls = {"grad": 0, "no_grad": 0}

    def forward(self, t, x):
        self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return super().forward(t, x)


@pytest.mark.parametrize("kw, forward_graphs, backward_reruns", [
    # K = 3 rk4 steps: 12 evaluations. Recompute all: the first evaluation runs with a graph
    # (discovery), every other forward one without; the backward recomputes all 12 with graph.
    (dict(memory_budget=0), 1, 12),
    # the default ("auto"): this small solve's graphs all fit
    ({}, 12, 0),
    # every graph kept: the forward runs all 12 with graph, the backward reruns none
    (dict(memory_budget=INF), 12, 0),
    # one state per step: the backward recomputes each step's 3 non-final stage inputs without
    # graph (9) besides the 12 evaluations with graph
    (dict(store="steps", memory_budget=0), 1, 12),
])
def test_odeint_per_sample_grid_honours_the_strategy(kw, forward_graphs, backward_reruns):
    torch.manual_seed(0)
    net = CountingTwoLayer().double()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.stack([torch.linspace(0, 1, 4), torch.linspace(0.2, 0.9, 4)], 1).double()  # (T, B)
    ys = prg_fast.odeint(net, y0, t, method="rk4", **kw)
    assert net.calls["grad"] == forward_graphs
    forward_plain = net.calls["no_grad"]
    ys.pow(2).sum().backward()
    assert net.calls["grad"] - forward_graphs == backward_reruns
    assert net.calls["no_grad"] - forward_plain == (9 if kw.get("store") == "steps" else 0)
    got = [y0.grad] + [q.grad for q in net.parameters()]
    net.zero_grad()
    y1 = y0.detach().requires_grad_(True)
    prg_fast.odeint(net, y1, t, method="rk4", adjoint=False).pow(2).sum().backward()
    for g, r in zip(got, [y1.grad] + [q.grad for q in net.parameters()]):
        assert rel_err(g, r) < 1e-12
