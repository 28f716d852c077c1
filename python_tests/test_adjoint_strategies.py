"""Adjoint strategies (issue 10): memory_budget (keep evaluation graphs, skip their recomputation)
and store="steps" (one state per step). Every strategy is exact: gradients equal plain backprop
through the same solver, every method, float64; the budget boundaries keep exactly the number of
graphs they pay for; the hot path runs no extra evaluations."""
import copy
import math

import pytest
import torch

import prg_fast
from prg_fast.ode.solvers import SOLVERS
from solve_nodes import adjoint_node

METHODS = sorted(SOLVERS)
INF = float("inf")


def _grads(out, inputs, seed=1, retain_graph=False):
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g, retain_graph=retain_graph)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


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
    ref = _grads(ref_out, inputs)
    for budget, kept in _budgets(model, x, kw):
        out = prg_fast.reverse(model, x, memory_budget=budget, store=store, **kw)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert adjoint_node(out).evals.kept_count == kept, (budget, kept)
        for a, b in zip(_grads(out, inputs), ref):
            assert _rel_err(a, b) < 1e-12, (budget, store, _rel_err(a, b))


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
    ref = _grads(ref_out, inputs)
    g = _graph_bytes(model, x, **kw)
    for budget in (None, 3 * g, INF):
        out = prg_fast.reverse(model, x, memory_budget=budget, store=store, **kw)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for a, b in zip(_grads(out, inputs), ref):
            assert _rel_err(a, b) < 1e-12


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
    ga = _grads(a, inputs)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = prg_fast.reverse(model, x, adjoint=False, **kw)
    gb = _grads(b, inputs)
    after_b = torch.rand(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(after_a, after_b)
    for u, v in zip(ga, gb):
        assert _rel_err(u, v) < 1e-12


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

    def grads(model, xx, autocast, **kw):
        xx = xx.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = prg_fast.reverse(f_of(model), xx, steps=4, method="rk4", **kw)
        return torch.autograd.grad(z.square().sum(), [xx] + list(model.parameters()))

    ref = grads(copy.deepcopy(net).double(), x.double(), False, adjoint=False)
    plain_bf16 = grads(net, x, True, adjoint=False)
    ours = grads(net, x, True, memory_budget=budget)
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
    ref = _grads(prg_fast.odeint(func, y0, grid, method=method, adjoint=False), inputs)
    for budget in (None, 0, INF):
        out = prg_fast.odeint(func, y0, grid, method=method, memory_budget=budget, store=store)
        for a, b in zip(_grads(out, inputs), ref):
            assert _rel_err(a, b) < 1e-12


def test_generate_with_budget(mlp):
    model = mlp(dim=3).double()
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    inputs = [z] + list(model.parameters())
    ref = _grads(prg_fast.generate(model, z, steps=3, adjoint=False), inputs)
    out = prg_fast.generate(model, z, steps=3, memory_budget=INF, store="steps")
    for a, b in zip(_grads(out, inputs), ref):
        assert _rel_err(a, b) < 1e-12


def test_second_backward_recomputes_consumed_graphs(mlp):
    """Each kept graph is freed by its VJP; a backward with retain_graph=True followed by a second
    one recomputes what was consumed and gives the same gradients."""
    model = mlp(dim=4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    out = prg_fast.reverse(model, x, steps=3, memory_budget=INF)
    first = _grads(out, inputs, retain_graph=True)
    assert not adjoint_node(out).evals.kept  # all handed to the first backward
    second = _grads(out, inputs)
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
    recomputed = _grads(prg_fast.reverse(model, x, memory_budget=0, **base), inputs)
    backprop = _grads(prg_fast.reverse(model, x, adjoint=False, **base), inputs)
    got = _grads(prg_fast.reverse(model, x, **base, **kw), inputs)
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
    ref = _grads(prg_fast.reverse(net, x, t, t0=t0, adjoint=False, **kw), inputs)
    got = _grads(prg_fast.reverse(net, x, t, t0=t0, memory_budget=budget, store=store, **kw), inputs)
    for name, a, b in zip(["x", "t", "t0", "w", "u"], got, ref):
        assert _rel_err(a, b) < 1e-10, name


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
