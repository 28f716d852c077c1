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
from gradient_checks import BUDGET_STRATEGIES, FailsOnce, Hooked, TwoLayer, assert_grads_close, cotangent, grads
from solve_nodes import adjoint_node

INF = float("inf")
F64 = torch.float64


def _graph_bytes(model, x, **kw):
    return adjoint_node(prg_fast.reverse(model, x, memory_budget=INF, **kw)).evals.graph_bytes


@pytest.mark.parametrize("store", ["stages", "steps"])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_auto_keeps_what_fits_in_half_the_free_memory(monkeypatch, method, store):
    torch.manual_seed(0)
    model = TwoLayer().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(steps=3, method=method, store=store)
    ref = grads(prg_fast.reverse(model, x, adjoint=False, steps=3, method=method), inputs)
    g = _graph_bytes(model, x, **kw)
    total = 3 * SOLVERS[method].stages
    for free, kept in [(0, 0), (2 * g - 1, 0), (2 * g, 1), (2 * (total - 1) * g, total - 1), (10**15, total)]:
        monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(free))
        out = prg_fast.reverse(model, x, **kw)
        evals = adjoint_node(out).evals
        assert (evals.kept_count, evals.budget, evals.fell_back) == (kept, free_memory.AUTO_FRACTION * free, False)
        assert_grads_close(grads(out, inputs), ref)


def test_auto_with_unknown_free_memory_recomputes_everything(monkeypatch, caplog):
    model = TwoLayer().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr("prg_fast.ode.stored_adjoint.free_bytes", lambda device: None)
    with caplog.at_level(logging.DEBUG, logger="prg_fast.ode.strategies"):
        out = prg_fast.reverse(model, x, steps=2, method="rk4")
    assert adjoint_node(out).evals.kept_count == 0
    assert "0 of 8 evaluation graphs kept" in caplog.text  # the choice is logged


def _mem_available():
    """The kernel's MemAvailable in bytes, read here independently of prg_fast, or None."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in fields else None


def test_auto_measures_the_free_memory(monkeypatch):
    """With no PRG_FAST_FREE_MEMORY_BYTES, "auto" reads the machine: on Linux the kernel's
    MemAvailable (read here from /proc/meminfo on our own), and the budget is AUTO_FRACTION of it.
    rel=0.2: other processes allocate and free between the two readings."""
    monkeypatch.delenv(free_memory.FREE_MEMORY_ENV, raising=False)
    available = _mem_available()
    if available is None:
        pytest.skip("no /proc/meminfo MemAvailable here to compare the measurement with")
    assert free_memory.free_bytes(torch.device("cpu")) == pytest.approx(available, rel=0.2)
    model = TwoLayer().double()
    out = prg_fast.reverse(model, torch.randn(3, 4, dtype=torch.float64, requires_grad=True), steps=2)
    assert adjoint_node(out).evals.budget == pytest.approx(free_memory.AUTO_FRACTION * available, rel=0.2)


def test_free_memory_variable_must_be_bytes(monkeypatch):
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="PRG_FAST_FREE_MEMORY_BYTES must be a number of bytes"):
        prg_fast.reverse(TwoLayer(), torch.randn(3, 4, requires_grad=True), steps=2)


def _node_types(out):
    """The type names of every autograd node behind `out`."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return names


def test_auto_does_not_apply_to_the_other_strategies(monkeypatch):
    """memory_budget="auto" with the reversible adjoint or plain backprop: accepted, and ignored --
    the free memory is never read, the graph holds that strategy's node (the reversible adjoint's
    Function; none for backprop) and no stored adjoint's, and the gradients are those of the call
    that leaves memory_budget out."""
    def no_reading(device):
        raise AssertionError("the free memory was read: 'auto' applied to a strategy it does not belong to")

    monkeypatch.setattr("prg_fast.ode.stored_adjoint.free_bytes", no_reading)
    model = TwoLayer().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    for kw, node in ((dict(reversible=True), "ReversibleSolveBackward"), (dict(adjoint=False), None),
                     (dict(adjoint=False, reversible=True), None)):
        out = prg_fast.reverse(model, x, steps=2, memory_budget="auto", **kw)
        types = _node_types(out)
        assert not any("AdjointSolve" in name for name in types), (kw, types)
        assert (node in types) if node else ("ReversibleSolveBackward" not in types), (kw, types)
        want = grads(prg_fast.reverse(model, x, steps=2, **kw), inputs)
        assert all(torch.equal(a, b) for a, b in zip(grads(out, inputs), want)), kw


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")])
@pytest.mark.parametrize("at", [2, 5])  # the first kept graph, or one in the middle of the forward
@pytest.mark.parametrize("store", ["stages", "steps"])
def test_out_of_memory_while_keeping_graphs_recomputes_instead(error, at, store):
    torch.manual_seed(0)
    inner = TwoLayer(dropout=0.3, batchnorm=True).double()
    reference = TwoLayer(dropout=0.3, batchnorm=True).double()
    reference.load_state_dict(inner.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(steps=3, method="rk4")
    torch.manual_seed(7)
    ref_out = prg_fast.reverse(reference, x, adjoint=False, **kw)
    ref = grads(ref_out, [x] + list(reference.parameters()))
    after_ref = torch.rand(1)
    model = FailsOnce(inner, at=at, error=error)
    torch.manual_seed(7)
    out = prg_fast.reverse(model, x, memory_budget=INF, store=store, **kw)
    after = torch.rand(1)
    evals = adjoint_node(out).evals
    assert model.grad_calls >= at and evals.fell_back and evals.kept_count == 0
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same dropout draws
    torch.testing.assert_close(after, after_ref, rtol=0, atol=0)  # the generator left where backprop leaves it
    assert_grads_close(grads(out, [x] + list(inner.parameters())), ref)
    for (name, a), b in zip(inner.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # BatchNorm ran as often as in backprop


def test_out_of_memory_while_keeping_graphs_is_logged(caplog):
    model = FailsOnce(TwoLayer().double(), at=3)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="prg_fast.ode.strategies"):
        out = prg_fast.reverse(model, x, steps=2, method="rk4", memory_budget=INF)
    assert "out of memory while keeping" in caplog.text
    out.sum().backward()


def test_out_of_memory_with_nothing_kept_is_the_callers():
    """Recomputation cannot serve an allocation that fails with no graph kept: it is raised."""
    model = FailsOnce(TwoLayer().double(), at=1)  # the first evaluation, which every adjoint runs with a graph
    with pytest.raises(torch.OutOfMemoryError):
        prg_fast.reverse(model, torch.randn(3, 4, dtype=torch.float64, requires_grad=True), steps=2, memory_budget=INF)


def test_other_errors_while_keeping_graphs_are_raised():
    model = FailsOnce(TwoLayer().double(), at=2, error=RuntimeError("shape mismatch"))
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
    model = TwoLayer(dropout=0.3, batchnorm=True).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    out = prg_fast.reverse(model, x, steps=3, method=method)  # "auto": every graph kept here
    assert adjoint_node(out).evals.as_backprop  # the kept steps are one graph, x's
    buffers = [b.clone() for b in model.buffers()]
    first = grads(out, inputs, retain_graph=True)
    second = grads(out, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(model.buffers(), buffers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the recomputation left the state as it found it


@pytest.mark.parametrize("store", ["stages", "steps"])
def test_a_tail_stores_no_stage_inputs(store):
    """The steps before the tail store their stage inputs (or start states); the tail stores
    nothing: its one VJP reads its graph, and a second backward reruns it from its start state."""
    torch.manual_seed(0)
    model = TwoLayer().double()
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
    model = TwoLayer(dropout=0.3, batchnorm=True).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(steps=4, method=method)
    budget = 2 * SOLVERS[method].stages * _graph_bytes(model, x, **kw)  # the last two steps
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(3)
    out = prg_fast.reverse(model, x, memory_budget=budget, **kw)
    evals = adjoint_node(out).evals
    assert evals.tail is not None and evals.tail.start == 2 and evals.replay.rng is not None
    first = grads(out, inputs, retain_graph=True)
    second = grads(out, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    torch.manual_seed(3)
    assert_grads_close(first, grads(prg_fast.reverse(model, x, adjoint=False, **kw), inputs))


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
        net = TwoLayer(dropout=0.2).double()
        seen = []
        net.a.register_full_backward_hook(lambda m, gin, gout: seen.append(gin[0] is None))
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_grad)
        calls = []
        if x_grad:
            x.register_hook(lambda g: calls.append(1))
        out = prg_fast.reverse(net, x, steps=3, method=method, **kw)
        inputs = ([x] if x_grad else []) + list(net.parameters())
        return out, grads(out, inputs), seen, calls

    out, got, seen, calls = run()
    _, want, seen_bp, calls_bp = run(adjoint=False)
    evals = adjoint_node(out).evals
    assert evals.as_backprop and evals.kept_count == 3 * SOLVERS[method].stages
    types = _graph_node_types(out)
    assert "AdjointSolveKeptBackward" in types and "AdjointSolveBackward" not in types
    assert seen == seen_bp and calls == calls_bp
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_time_gradients_run_as_plain_backprop_when_every_graph_fits():
    """A tensor grid whose times require grad, every graph fitting: the solve is plain backprop
    (discovery's first evaluation read a time leaf of its own: it runs again, from the times'
    graph), exactly."""
    torch.manual_seed(0)
    net = TwoLayer().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    found = []
    for kw in (dict(memory_budget=INF), dict(adjoint=False)):
        t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
        out = prg_fast.odeint(lambda s, y: net(s.expand(y.shape[0]), y), x, t, method="rk4", **kw)
        if "memory_budget" in kw:
            assert adjoint_node(out).evals.as_backprop
        found.append(grads(out, [x, t] + list(net.parameters())))
    assert_grads_close(*found)


# -- no finite number of bytes, the fallback's hooks and random stream, autocast's tail (all kept) ---


@pytest.mark.usefixtures("everything_fits")
@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan", "lots"])
def test_free_memory_variable_that_is_no_finite_number_is_named(monkeypatch, value):
    """int(float("inf")) raised a bare OverflowError that named neither the variable nor the value."""
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, value)
    with pytest.raises(ValueError, match="PRG_FAST_FREE_MEMORY_BYTES must be a number of bytes"):
        prg_fast.reverse(TwoLayer().double(), torch.randn(3, 4, dtype=F64, requires_grad=True), steps=2)


@pytest.mark.usefixtures("everything_fits")
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
        (out * cotangent(out)).sum().backward()
        param_grads = [p.grad for p in net.parameters()]
        return param_grads, [b.clone() for b in net.buffers()], dict(net.calls), after, out.detach()

    want = run(dict(adjoint=False), fail=False)
    got = run(dict(), fail=True)
    assert_grads_close(got[0], want[0], "gradients")
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1])), "buffers"
    assert got[2] == want[2]
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])


@pytest.mark.usefixtures("everything_fits")
def test_autocast_tail_is_backprops_arithmetic():
    """Under CPU bfloat16 autocast the kept steps run as one graph: plain backprop's arithmetic, so
    its gradients to float32 rounding (the per-evaluation path rounds its cotangents differently,
    within bfloat16's error: python_tests/test_model_zoo.py)."""
    torch.manual_seed(0)
    net = TwoLayer(dropout=0.3, batchnorm=True)
    x = torch.randn(5, 4, requires_grad=True)

    def solve_grads(kw):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prg_fast.reverse(net, x, steps=3, **kw)
        return torch.autograd.grad(out, [x, *net.parameters()], cotangent(out))

    want = solve_grads(dict(adjoint=False))
    for name in ("auto", "keep_all"):
        assert_grads_close(solve_grads(BUDGET_STRATEGIES[name]), want, name, tol=1e-6)


def test_out_of_memory_in_the_plain_path_falls_back_exactly():
    for at in (2, 3, 5):
        torch.manual_seed(0)
        inner = TwoLayer(dropout=0.2, batchnorm=True).double()
        model = FailsOnce(inner, at=at)
        calls = []
        inner.a.register_forward_hook(lambda *a: calls.append(1))
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(model, x, steps=3, method="midpoint")
        evals = adjoint_node(out).evals
        assert evals.fell_back and not evals.as_backprop
        got = torch.autograd.grad(out, [x] + list(inner.parameters()), cotangent(out))
        after = ([b.clone() for b in inner.buffers()], torch.rand(2))
        torch.manual_seed(0)
        ref_net = TwoLayer(dropout=0.2, batchnorm=True).double()
        xr = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        ref = prg_fast.reverse(ref_net, xr, steps=3, method="midpoint", adjoint=False)
        want = torch.autograd.grad(ref, [xr] + list(ref_net.parameters()), cotangent(ref))
        assert_grads_close(got, want)
        assert_grads_close(after[0][:2], [b for b in ref_net.buffers()][:2])
        assert torch.equal(after[1], torch.rand(2))
        # the failed attempt's at - 1 evaluations (the at-th fails before the network), then the
        # adjoint's forward (6, the first evaluation rerun) and its backward's 6 recomputations
        assert len(calls) == at - 1 + 6 + 6
