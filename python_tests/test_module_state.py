"""Buffers a velocity writes while it runs (prg_fast/ode/module_state.py).

The oracle is plain backprop through the same solver (adjoint=False): after forward + backward the
buffers (BatchNorm running statistics and counter, spectral_norm's vectors) must hold exactly what
plain backprop leaves, and the gradients must equal its gradients -- for every method and every
adjoint strategy. Without the state handling the adjoint's reruns moved BatchNorm's statistics a
second time and spectral_norm's recomputed weight differed from the forward's (gradient error ~1e-6).
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn

import prg_fast
from prg_fast.models import UNet
from prg_fast.ode.module_state import ModuleState
from prg_fast.ode.discovery import reachable
from gradient_checks import THREE_WAYS, BatchNormMLP, TwoLayer, assert_grads_close, cotangent, seeded_net

METHODS = sorted(prg_fast.SOLVERS)
STRATEGIES = {
    "recompute": dict(adjoint=True, memory_budget=0),
    "auto": dict(adjoint=True),  # the default: here every graph fits
    "keep_all": dict(adjoint=True, memory_budget=float("inf")),
    "keep_some": dict(adjoint=True, memory_budget=1),  # sized below: about half the graphs
    "store_steps": dict(adjoint=True, store="steps"),
    "steps_keep_some": dict(adjoint=True, store="steps", memory_budget=1),  # kept graphs saved the stats
    "reversible": dict(adjoint=True, reversible=True),
}


class SpectralNet(nn.Module):
    def __init__(self, d=6, width=16):
        super().__init__()
        self.l1 = nn.utils.parametrizations.spectral_norm(nn.Linear(d + 1, width))
        self.l2 = nn.Linear(width, d)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None].to(x.dtype)], 1))))


def _make(kind):
    torch.manual_seed(3)
    net = {"batchnorm": BatchNormMLP, "spectral_norm": SpectralNet}[kind]().double().train()
    return net


def _run(net, fn, kw, method, steps=3):
    """(gradients of x and every parameter, buffers after forward + backward)."""
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    kw = dict(kw)
    if kw.get("memory_budget") == 1:
        kw["memory_budget"] = _half_budget(fn, x, method, steps)
    out = prg_fast.reverse(fn, x, steps=steps, method=method, **kw)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    params = list(net.parameters())
    grads = torch.autograd.grad((out * w).sum(), [x] + params)
    return grads, {n: b.clone() for n, b in net.named_buffers()}


def _half_budget(fn, x, method, steps):
    from prg_fast.ode.discovery import SavedBytes

    fn = copy.deepcopy(fn)  # measuring must not move the network's buffers
    counter = SavedBytes(exclude=[x])
    t = torch.zeros(x.shape[0], dtype=x.dtype)
    with counter.hooks(), torch.enable_grad():
        k = fn(t, x.detach().clone().requires_grad_(True))
    one = counter.nbytes + k.numel() * k.element_size()
    return one * steps * prg_fast.SOLVERS[method].stages // 2


def _assert_same(got, want, what):
    (g_adj, b_adj), (g_ref, b_ref) = got, want
    flat_adj = torch.cat([g.flatten() for g in g_adj])
    flat_ref = torch.cat([g.flatten() for g in g_ref])
    err = ((flat_adj - flat_ref).norm() / flat_ref.norm()).item()
    assert err < 1e-9, f"{what}: gradient relative error {err:.3g}"
    for (i, a), b in zip(enumerate(g_adj), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * flat_ref.abs().max().item(), msg=f"{what}: gradient {i}")
    assert b_adj.keys() == b_ref.keys()
    for name in b_ref:
        torch.testing.assert_close(b_adj[name], b_ref[name], rtol=1e-12, atol=1e-14, msg=f"{what}: buffer {name}")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["batchnorm", "spectral_norm"])
def test_adjoint_leaves_state_and_gradients_as_plain_backprop(kind, method, strategy):
    kw = STRATEGIES[strategy]
    oracle_kw = {"adjoint": False, "reversible": kw.get("reversible", False)}
    net = _make(kind)
    want = _run(net, net, oracle_kw, method)
    net = _make(kind)
    got = _run(net, net, kw, method)
    _assert_same(got, want, f"{kind}/{method}/{strategy}")


def test_reruns_happened_and_state_was_restored():
    """The test above is not vacuous: the adjoint does rerun evaluations (which move a BatchNorm's
    statistics and counter), and the forward alone moves them as many times as plain backprop."""
    net = _make("batchnorm")
    calls = []
    net.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, method="rk4", adjoint=True, memory_budget=0)
    forward_calls = len(calls)
    after_forward = {n: b.clone() for n, b in net.named_buffers()}
    assert after_forward["bn.num_batches_tracked"].item() == forward_calls == 8
    out.sum().backward()
    assert len(calls) > forward_calls  # reruns
    for n, b in net.named_buffers():
        torch.testing.assert_close(b, after_forward[n], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["lambda", "global", "partial", "bound_method", "callable_object", "time_reversed"])
def test_state_is_found_through_wrappers(wrap):
    net = _make("batchnorm")
    fn = _wrap(wrap, net)
    assert any(m is net.bn for m in reachable(fn).modules)
    want = _run(net, _wrap(wrap, net) if wrap != "time_reversed" else fn, {"adjoint": False}, "heun")
    net2 = _make("batchnorm")
    got = _run(net2, _wrap(wrap, net2), {"adjoint": True}, "heun")
    _assert_same(got, want, wrap)


_GLOBAL_NET = None


def _call_global(t, x):
    return _GLOBAL_NET(t, x)


class _Caller:
    def __init__(self, net):
        self.inner = {"net": net}

    def __call__(self, t, x):
        return self.inner["net"](t, x)


class _Holder:
    def __init__(self, net):
        self.net = net

    def velocity(self, t, x):
        return self.net(t, x)


def _wrap(kind, net):
    global _GLOBAL_NET
    if kind == "lambda":
        return lambda t, x: net(t, x)
    if kind == "global":
        _GLOBAL_NET = net
        return _call_global
    if kind == "partial":
        return functools.partial(lambda m, t, x: m(t, x), net)
    if kind == "bound_method":
        return _Holder(net).velocity
    if kind == "callable_object":
        return _Caller(net)
    if kind == "time_reversed":
        return prg_fast.time_reversed(prg_fast.time_reversed(net))
    raise AssertionError(kind)


def test_networks_without_written_buffers_keep_nothing():
    assert reachable(UNet.preset("tiny", image_size=8)).buffers == []  # no buffers at all: no ModuleState
    net = _make("batchnorm").eval()  # buffers, but eval mode writes none
    state = ModuleState(reachable(net).buffers)
    assert state is not None
    state.before_first_evaluation()
    net(torch.zeros(5, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64))
    assert not state.after_first_evaluation()


class _Sometimes(nn.Module):
    """Writes its buffer only late in the solve: the first evaluation cannot tell."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("late", torch.zeros(()))

    def forward(self, t, x):
        if float(t[0]) > 0.5:
            self.late += 1
        return torch.tanh(self.lin(x)) + self.late


def test_a_buffer_written_only_later_is_an_error_not_a_silent_difference():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    net = _Sometimes().double()
    with pytest.raises(RuntimeError, match=r"buffer '_Sometimes\.late'.*not in its first evaluation"):
        prg_fast.reverse(net, x, steps=4, method="euler", adjoint=True, memory_budget=0)
    # nothing is rerun when every graph is kept: then it is exact
    torch.manual_seed(0)
    net = _Sometimes().double()
    out = prg_fast.reverse(net, x, steps=4, method="euler", adjoint=True, memory_budget=float("inf"))
    torch.manual_seed(0)
    ref_net = _Sometimes().double()
    ref = prg_fast.reverse(ref_net, x, steps=4, method="euler", adjoint=False)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
    assert net.late.item() == ref_net.late.item() == 1  # only t = 0.75 of 0, 0.25, 0.5, 0.75


def test_second_backward_with_retained_graph_is_the_same():
    net = _make("spectral_norm")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=3, method="rk4", adjoint=True)
    g1 = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    g2 = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    for n, b in net.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)


def test_a_backward_that_fails_still_restores_the_state():
    net = _make("batchnorm")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, method="midpoint", adjoint=True, memory_budget=0)
    after_forward = {n: b.clone() for n, b in net.named_buffers()}

    def boom(*_):
        raise KeyError("stop")

    net.register_forward_pre_hook(boom)
    with pytest.raises(KeyError):
        out.sum().backward()
    for n, b in net.named_buffers():
        torch.testing.assert_close(b, after_forward[n], rtol=0, atol=0)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_eval_between_forward_and_backward_changes_nothing(strategy):
    """model.eval() after the forward (a validation pass before loss.backward(), say): plain
    backprop's graph is fixed at the forward; the adjoints rerun under the forward's train/eval
    flags (dropout and BatchNorm as in the forward) and leave the user's flags set afterwards."""
    kw = STRATEGIES[strategy]  # (keep_some's budget of 1 byte keeps nothing here: no harm)

    def run(adjoint_kw):
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 6))
        net = net.double().train()
        x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        torch.manual_seed(4)
        out = prg_fast.reverse(lambda t, y: net(y), x, steps=3, method="midpoint", **adjoint_kw)
        net.eval()
        out.sum().backward()
        assert not any(m.training for m in net.modules())
        return [x.grad] + [p.grad for p in net.parameters()]

    want = run({"adjoint": False, "reversible": kw.get("reversible", False)})
    got = run(kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["keep_all", "keep_some", "steps_keep_some"])
def test_second_backward_reruns_kept_evaluations_with_their_state(strategy):
    """retain_graph: the second backward reruns the evaluations whose kept graphs the first one
    consumed, so their buffer copies must exist too."""
    kw = dict(STRATEGIES[strategy])
    net = _make("batchnorm")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    if kw.get("memory_budget") == 1:
        kw["memory_budget"] = _half_budget(net, x, "rk4", 3)
    out = prg_fast.reverse(net, x, steps=3, method="rk4", **kw)
    g1 = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    g2 = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    for n, b in net.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)


class _BNFirst(nn.Module):
    """BatchNorm applied to the state itself: from x = 0 the first evaluation's batch mean is 0,
    so running_mean keeps its value 0 while running_var and the counter move."""

    def __init__(self):
        super().__init__()
        self.bn, self.lin = nn.BatchNorm1d(4), nn.Linear(4, 4)

    def forward(self, t, x):
        return self.lin(torch.tanh(self.bn(x))) + 1.0


def test_batchnorm_whose_running_mean_stays_put_is_still_state():
    """A module's buffers are one state: all kept when one is written (was: a spurious 'written
    later but not in its first evaluation' error)."""
    results = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        net = _BNFirst().double()
        x = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
        prg_fast.reverse(net, x, steps=3, method="rk4", adjoint=adjoint).pow(2).sum().backward()
        results.append((x.grad, dict(net.named_buffers())))
    (g_adj, b_adj), (g_ref, b_ref) = results[1], results[0]
    torch.testing.assert_close(g_adj, g_ref, rtol=1e-12, atol=1e-14)
    for n in b_ref:
        torch.testing.assert_close(b_adj[n], b_ref[n], rtol=0, atol=0, msg=n)


class _BigTable(nn.Module):
    """A large read-only buffer (a positional table, say) and optionally a large written one."""

    def __init__(self, write):
        super().__init__()
        from prg_fast.ode.module_state import COPY_LIMIT

        self.register_buffer("table", torch.randn(COPY_LIMIT + 1, dtype=torch.float64))
        self.lin = nn.Linear(4, 4).double()
        self.write = write

    def forward(self, t, x):
        if self.write:
            self.table.mul_(1.0)
        return torch.tanh(self.lin(x)) * self.table[:4]


def test_large_read_only_buffers_are_not_copied_and_large_written_ones_are_refused():
    net = _BigTable(write=False)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    state = ModuleState(reachable(net).buffers)
    state.before_first_evaluation()
    assert state.before_first == [None]  # nothing copied
    out = prg_fast.reverse(net, x, steps=2, method="rk4")
    ref = prg_fast.reverse(net, x, steps=2, method="rk4", adjoint=False)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
    with pytest.raises(RuntimeError, match=r"writes its buffer '_BigTable\.table'"):
        prg_fast.reverse(_BigTable(write=True), x, steps=2, method="rk4")


def test_an_unrelated_module_stepped_between_forward_and_backward_is_fine():
    """A GAN: the velocity is a bound method of an object holding G (read) and D (not read), and D
    is stepped between the solve and the generator's backward -- as plain backprop allows. D's
    parameters, reached through the object, get no gradient (None, not zeros) on every strategy."""
    for kw in ({}, {"store": "steps"}, {"reversible": True}):
        torch.manual_seed(0)

        class GAN(nn.Module):
            def __init__(self):
                super().__init__()
                self.G = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
                self.D = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

            def velocity(self, t, x):
                return self.G(x)

        gan = GAN()
        fake = prg_fast.generate(gan.velocity, torch.randn(8, 4), steps=3, **kw)
        with torch.no_grad():
            for p in gan.D.parameters():
                p.add_(0.1)
        (-gan.D(fake).mean()).backward()
        assert all(p.grad is not None for p in gan.G.parameters())
        assert all(p.grad is not None for p in gan.D.parameters())  # from D(fake) itself
        gan.zero_grad(set_to_none=True)
        fake = prg_fast.generate(gan.velocity, torch.randn(8, 4), steps=3, **kw)
        fake.sum().backward()
        assert all(p.grad is None for p in gan.D.parameters()), kw


def test_a_kept_loss_on_the_module_does_not_tie_solves_together():
    """Tensors requiring grad that the module keeps (losses appended to a history) are not
    inputs of later solves: each backward reruns only its own solve's evaluations."""
    calls = []

    class H(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 4)
            self.hist = []

        def forward(self, t, x):
            calls.append(1)
            return torch.tanh(self.net(x))

    m = H()
    for _ in range(3):
        y = prg_fast.reverse(m, torch.randn(8, 4), steps=2, method="euler", memory_budget=0)
        m.hist.append(y.sum())
    calls.clear()
    y.pow(2).sum().backward()
    assert len(calls) == 2  # this solve's two reruns, none of the earlier solves'


class _DataEMA(nn.Module):
    """An EMA buffer written through .data (no version bump) that the output reads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.ones(4))

    def forward(self, t, x):
        y = self.lin(x)
        self.ema.data.mul_(0.9).add_(0.1 * y.detach().pow(2).mean(0))
        return y / self.ema.sqrt()


def test_a_buffer_written_through_data_is_kept():
    results = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        net = _DataEMA().double()
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        prg_fast.reverse(net, x, steps=3, method="rk4", adjoint=adjoint).sum().backward()
        results.append((x.grad, [p.grad for p in net.parameters()], net.ema.clone()))
    (gx, gp, ema), (gx0, gp0, ema0) = results[1], results[0]
    torch.testing.assert_close(gx, gx0, rtol=1e-12, atol=1e-14)
    for a, b in zip(gp, gp0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ema, ema0, rtol=0, atol=0)


def test_keep_all_reruns_nothing_so_a_buffer_written_later_is_backprops():
    """memory_budget=inf keeps every graph: the solve is plain backprop, so a buffer written only by
    a later evaluation is differentiated as backprop does, by a first and a second backward
    (retain_graph) alike; a budget that reruns the last step refuses it."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for strategy in (dict(memory_budget=float("inf")), dict(adjoint=False)):
        torch.manual_seed(0)
        net = _Sometimes().double()
        out = prg_fast.reverse(net, x, steps=4, method="euler", **strategy)
        grads += [torch.autograd.grad(out.sum(), x, retain_graph=True)[0], torch.autograd.grad(out.sum(), x)[0]]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not in its first evaluation"):
        prg_fast.reverse(_Sometimes().double(), x, steps=4, method="euler", memory_budget=0)


def test_a_buffer_carrying_a_graph_between_evaluations_is_a_clear_error():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("prev", torch.zeros(5, 4))

        def forward(self, t, x):
            y = self.lin(x) + 0.5 * self.prev
            self.prev = y  # the next evaluation reads this one's output, graph and all
            return y

    # (a solve keeping every graph is plain backprop, which differentiates through the buffer)
    with pytest.raises(RuntimeError, match=r"tensor that requires grad in its buffer 'Recurrent\.prev'"):
        prg_fast.reverse(Recurrent(), torch.randn(5, 4), steps=3, method="euler", memory_budget=0)


# -- buffers and the random stream as backprop leaves them; a large written buffer; a non-idempotent write


def test_batchnorm_and_dropout_leave_backprops_buffers_and_random_stream():
    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.drop, self.b = (torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                                  torch.nn.Dropout(0.3), torch.nn.Linear(8, 4))

        def forward(self, t, x):
            return self.b(self.drop(self.bn(torch.tanh(self.a(x) + t[:, None]))))

    results = []
    for way in THREE_WAYS:
        torch.manual_seed(0)
        net = BN().double()
        x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(net, x, steps=2, method="midpoint", **way)
        grads = torch.autograd.grad(out, [x] + list(net.parameters()), cotangent(out))
        results.append((grads, [b.clone() for b in net.buffers()], torch.rand(3)))
    for got in results[:2]:
        assert_grads_close(got[0], results[2][0])
        assert_grads_close(got[1][:2], results[2][1][:2])
        assert torch.equal(got[2], results[2][2])


def test_a_large_written_buffer_runs_when_nothing_is_rerun():
    """A buffer too large to copy that the velocity writes (a counter table): refused where the
    adjoint reruns or undoes evaluations, but the plain path reruns nothing -- backprop's result,
    as the refusal's own advice (memory_budget=float('inf')) says."""
    from prg_fast.ode.module_state import COPY_LIMIT

    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("hits", torch.zeros(COPY_LIMIT + 1, dtype=torch.float64))
            self.net = seeded_net()

        def forward(self, t, x):
            self.hits[:4].add_(1)
            return self.net(t, x)

    got = []
    for way in (dict(memory_budget=float("inf")), dict(), dict(adjoint=False)):
        m = Counts()
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(m, x, steps=2, method="midpoint", **way)
        got.append(torch.autograd.grad(out, [x] + list(m.parameters()), cotangent(out)) + (m.hits[:4].clone(),))
    assert_grads_close(got[0], got[2])
    assert_grads_close(got[1], got[2])
    for way in (dict(memory_budget=0), dict(reversible=True)):
        with pytest.raises(RuntimeError, match="writes its buffer 'Counts.hits'"):
            prg_fast.reverse(Counts(), torch.randn(5, 4, dtype=torch.float64, requires_grad=True), steps=2, **way)


class ShrinkingNet(TwoLayer):
    """Writes its own parameter in place on every call, not idempotently."""

    def forward(self, t, x):
        with torch.no_grad():
            self.a.bias.mul_(0.5)
        return torch.tanh(x * self.a.bias[:3]) + self.b.bias


def test_non_idempotent_inplace_write_inside_the_model_is_named():
    net = ShrinkingNet(3, 5).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, method="euler", memory_budget=0)  # reruns
    before = net.a.bias.detach().clone()
    with pytest.raises(RuntimeError, match="writes a tensor it reads in place while it runs"):
        out.sum().backward()
    assert torch.equal(net.a.bias, before)  # put back as the forward left it
