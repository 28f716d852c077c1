"""memory_budget="auto", the default (issue 25): graphs kept within half the free memory
(PRG_FAST_FREE_MEMORY_BYTES forces the free memory here), observable on the solve's backward node,
exact whatever it keeps; an allocation failure while keeping graphs starts the forward over
keeping none, and the gradients still equal plain backprop. Float64; the oracle is adjoint=False."""
import logging

import pytest
import torch

import prg_fast
from prg_fast.ode import free_memory
from prg_fast.ode.solvers import SOLVERS
from solve_nodes import adjoint_node

INF = float("inf")


def _grads(out, inputs):
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(out, inputs, g)


def _assert_exact(got, want):
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm().clamp_min(1e-300)).item() < 1e-12


def _graph_bytes(model, x, **kw):
    return adjoint_node(prg_fast.reverse(model, x, memory_budget=INF, **kw)).evals.graph_bytes


class Net(torch.nn.Module):
    """A small velocity with dropout and a BatchNorm in training mode (random draws and written
    buffers: what starting the forward over must put back)."""

    def __init__(self, dim=4, hidden=16, dropout=0.0, batchnorm=False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        self.drop = torch.nn.Dropout(dropout)
        self.bn = torch.nn.BatchNorm1d(hidden) if batchnorm else torch.nn.Identity()

    def forward(self, t, x):
        return self.b(self.drop(self.bn(torch.tanh(self.a(x) + t[:, None]))))


class FailsOnce(torch.nn.Module):
    """Raises `error` on its `at`-th call with grad mode on (call 1 is the solve's first
    evaluation; later ones run with grad only while the forward keeps their graphs)."""

    def __init__(self, inner, at=2, error=None):
        super().__init__()
        self.inner, self.at, self.grad_calls = inner, at, 0
        self.error = error if error is not None else torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")

    def forward(self, t, x):
        if torch.is_grad_enabled():
            self.grad_calls += 1
            if self.grad_calls == self.at:
                raise self.error
        return self.inner(t, x)


@pytest.mark.parametrize("store", ["stages", "steps"])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_auto_keeps_what_fits_in_half_the_free_memory(monkeypatch, method, store):
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(steps=3, method=method, store=store)
    ref = _grads(prg_fast.reverse(model, x, adjoint=False, steps=3, method=method), inputs)
    g = _graph_bytes(model, x, **kw)
    total = 3 * SOLVERS[method].stages
    for free, kept in [(0, 0), (2 * g - 1, 0), (2 * g, 1), (2 * (total - 1) * g, total - 1), (10**15, total)]:
        monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(free))
        out = prg_fast.reverse(model, x, **kw)
        evals = adjoint_node(out).evals
        assert (evals.kept_count, evals.budget, evals.fell_back) == (kept, free_memory.AUTO_FRACTION * free, False)
        _assert_exact(_grads(out, inputs), ref)


def test_auto_with_unknown_free_memory_recomputes_everything(monkeypatch, caplog):
    model = Net().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr("prg_fast.ode.stored_adjoint.free_bytes", lambda device: None)
    with caplog.at_level(logging.DEBUG, logger="prg_fast.ode.strategies"):
        out = prg_fast.reverse(model, x, steps=2, method="rk4")
    assert adjoint_node(out).evals.kept_count == 0
    assert "0 of 8 evaluation graphs kept" in caplog.text  # the choice is logged


def test_auto_measures_the_free_memory():
    free = free_memory.free_bytes(torch.device("cpu"))
    assert free is None or free > 0  # /proc/meminfo's MemAvailable on Linux
    model = Net().double()
    out = prg_fast.reverse(model, torch.randn(3, 4, dtype=torch.float64, requires_grad=True), steps=2)
    assert adjoint_node(out).evals.budget == (None if free is None else pytest.approx(0.5 * free, rel=0.2))


def test_free_memory_variable_must_be_bytes(monkeypatch):
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="PRG_FAST_FREE_MEMORY_BYTES must be a number of bytes"):
        prg_fast.reverse(Net(), torch.randn(3, 4, requires_grad=True), steps=2)


def test_auto_does_not_apply_to_the_other_strategies():
    model = Net().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for kw in (dict(reversible=True), dict(adjoint=False), dict(adjoint=False, reversible=True)):
        prg_fast.reverse(model, x, steps=2, memory_budget="auto", **kw).sum().backward()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
@pytest.mark.parametrize("at", [2, 5])  # the first kept graph, or one in the middle of the forward
@pytest.mark.parametrize("store", ["stages", "steps"])
def test_out_of_memory_while_keeping_graphs_recomputes_instead(error, at, store):
    torch.manual_seed(0)
    inner = Net(dropout=0.3, batchnorm=True).double()
    reference = Net(dropout=0.3, batchnorm=True).double()
    reference.load_state_dict(inner.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(steps=3, method="rk4")
    torch.manual_seed(7)
    ref_out = prg_fast.reverse(reference, x, adjoint=False, **kw)
    ref = _grads(ref_out, [x] + list(reference.parameters()))
    after_ref = torch.rand(1)
    model = FailsOnce(inner, at=at, error=error)
    torch.manual_seed(7)
    out = prg_fast.reverse(model, x, memory_budget=INF, store=store, **kw)
    after = torch.rand(1)
    evals = adjoint_node(out).evals
    assert model.grad_calls >= at and evals.fell_back and evals.kept_count == 0
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same dropout draws
    torch.testing.assert_close(after, after_ref, rtol=0, atol=0)  # the generator left where backprop leaves it
    _assert_exact(_grads(out, [x] + list(inner.parameters())), ref)
    for (name, a), b in zip(inner.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # BatchNorm ran as often as in backprop


def test_out_of_memory_while_keeping_graphs_is_logged(caplog):
    model = FailsOnce(Net().double(), at=3)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="prg_fast.ode.strategies"):
        out = prg_fast.reverse(model, x, steps=2, method="rk4", memory_budget=INF)
    assert "out of memory while keeping" in caplog.text
    out.sum().backward()


def test_out_of_memory_with_nothing_kept_is_the_callers():
    """Recomputation cannot serve an allocation that fails with no graph kept: it is raised."""
    model = FailsOnce(Net().double(), at=1)  # the first evaluation, which every adjoint runs with a graph
    with pytest.raises(torch.OutOfMemoryError):
        prg_fast.reverse(model, torch.randn(3, 4, dtype=torch.float64, requires_grad=True), steps=2, memory_budget=INF)


def test_other_errors_while_keeping_graphs_are_raised():
    model = FailsOnce(Net().double(), at=2, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        prg_fast.reverse(model, torch.randn(3, 4, dtype=torch.float64, requires_grad=True), steps=2, memory_budget=INF)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA free memory needs a GPU (none here)")
def test_cuda_free_memory_counts_the_allocators_unused_cache():
    device = torch.device("cuda")
    before = free_memory.free_bytes(device)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    during = free_memory.free_bytes(device)
    del block  # back to PyTorch's cache, not to the driver: still free for the next solve
    after = free_memory.free_bytes(device)
    assert during <= before - 200 * 2**20 and after >= during + 200 * 2**20


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_second_backward_through_kept_steps_is_the_first(method):
    """Every graph kept: the solve is plain backprop, one graph from x; a second backward
    (retain_graph) goes through it again: the same gradients, bit for bit, buffers untouched."""
    torch.manual_seed(0)
    model = Net(dropout=0.3, batchnorm=True).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    out = prg_fast.reverse(model, x, steps=3, method=method)  # "auto": every graph kept here
    assert adjoint_node(out).evals.as_backprop  # the kept steps are one graph, x's
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    buffers = [b.clone() for b in model.buffers()]
    first = torch.autograd.grad(out, inputs, g, retain_graph=True)
    second = torch.autograd.grad(out, inputs, g)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(model.buffers(), buffers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the recomputation left the state as it found it


@pytest.mark.parametrize("store", ["stages", "steps"])
def test_a_tail_stores_no_stage_inputs(store):
    """The steps before the tail store their stage inputs (or start states); the tail stores
    nothing: its one VJP reads its graph, and a second backward reruns it from its start state."""
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(steps=4, method="rk4", store=store)
    per_step = 4 if store == "stages" else 1
    budget = 4 * _graph_bytes(model, x, **kw)  # the last step
    for memory_budget, tail_steps in ((INF, 4), (budget, 1), (2 * budget, 2)):
        out = prg_fast.reverse(model, x, memory_budget=memory_budget, **kw)
        node = adjoint_node(out)
        if tail_steps == 4:  # everything kept: plain backprop, the adjoint's Function is not there
            assert node.evals.as_backprop and type(node).__name__ == "AdjointSolveKeptBackward"
        else:
            assert node.evals.tail is not None and node.evals.tail.start == 4 - tail_steps
        assert len(node.saved_tensors) == (4 - tail_steps) * per_step


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_second_backward_through_a_tail_that_starts_mid_solve(method):
    """A tail after recomputed steps records one random state, its first evaluation's, and is rerun
    as a whole from it (ReplayRecord.chain): a second backward draws the forward's dropout masks
    again, in order -- the same gradients, bit for bit, and plain backprop's."""
    torch.manual_seed(0)
    model = Net(dropout=0.3, batchnorm=True).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(steps=4, method=method)
    budget = 2 * SOLVERS[method].stages * _graph_bytes(model, x, **kw)  # the last two steps
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(3)
    out = prg_fast.reverse(model, x, memory_budget=budget, **kw)
    evals = adjoint_node(out).evals
    assert evals.tail is not None and evals.tail.start == 2 and evals.replay.rng is not None
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    first = torch.autograd.grad(out, inputs, g, retain_graph=True)
    second = torch.autograd.grad(out, inputs, g)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    torch.manual_seed(3)
    _assert_exact(first, torch.autograd.grad(prg_fast.reverse(model, x, adjoint=False, **kw), inputs, g))


def _graph_node_types(out):
    """The type names of every autograd node behind `out`."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_a_solve_whose_graphs_all_fit_is_plain_backprop(method, x_grad):
    """Every graph fits: the solve is one autograd graph from x with no adjoint Function in it (only
    the thin node that carries .evals), and the backward does backprop's work, hook for hook: the
    modules' backward hooks see what they see under adjoint=False (no input gradient for the first
    evaluation when x has none), x's own hook runs once, and the gradients are backprop's bit for bit."""
    def run(**kw):
        torch.manual_seed(0)
        net = Net(dropout=0.2).double()
        seen = []
        net.a.register_full_backward_hook(lambda m, gin, gout: seen.append(gin[0] is None))
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_grad)
        calls = []
        if x_grad:
            x.register_hook(lambda g: calls.append(1))
        out = prg_fast.reverse(net, x, steps=3, method=method, **kw)
        inputs = ([x] if x_grad else []) + list(net.parameters())
        return out, _grads(out, inputs), seen, calls

    out, got, seen, calls = run()
    _, want, seen_bp, calls_bp = run(adjoint=False)
    evals = adjoint_node(out).evals
    assert evals.as_backprop and evals.kept_count == 3 * SOLVERS[method].stages
    types = _graph_node_types(out)
    assert "AdjointSolveKeptBackward" in types and "AdjointSolveBackward" not in types
    assert seen == seen_bp and calls == calls_bp
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_time_gradients_keep_the_adjoints_function():
    """A tensor grid whose times require grad is differentiated by the adjoint (its first
    evaluation reads a leaf of its own), exactly, even when every graph fits."""
    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for kw in (dict(memory_budget=INF), dict(adjoint=False)):
        t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
        out = prg_fast.odeint(lambda s, y: net(s.expand(y.shape[0]), y), x, t, method="rk4", **kw)
        if "memory_budget" in kw:
            assert not adjoint_node(out).evals.as_backprop
        grads.append(_grads(out, [x, t] + list(net.parameters())))
    _assert_exact(*grads)
