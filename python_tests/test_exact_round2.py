"""Issue 19 ("exact for every model, round 2"): the adjoints agree with plain backprop through the
same solver on what users and libraries hang on their networks -- gradient hooks (run once, on the
total), a reversible scheme whose reconstruction fails (a clear error, never a silent gradient),
reentrant checkpoint, parametrize.cached(), lazy modules, in-place renorm, per-sample grids with
memory_budget/store. Float64; the oracle is adjoint=False."""

import pytest
import torch

import prg_fast
from solve_nodes import adjoint_node

INF = float("inf")
# every adjoint strategy, and the reversible adjoint (compared with plain backprop through the
# same reversible scheme)
STRATEGIES = {
    "default": {},
    "budget0": dict(memory_budget=0),
    "budget_inf": dict(memory_budget=INF),
    "budget_partial": "partial",
    "steps": dict(store="steps"),
    "reversible": dict(reversible=True),
}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _strategy(name, model, x, **kw):
    s = STRATEGIES[name]
    if s == "partial":
        out = prg_fast.reverse(model, x, memory_budget=INF, **kw)
        return dict(memory_budget=3 * adjoint_node(out).evals.graph_bytes)
    return dict(s)


def _oracle_kw(kw):
    """plain backprop through the same scheme"""
    return dict(adjoint=False, reversible=kw.get("reversible", False))


class TwoLayer(torch.nn.Module):
    def __init__(self, dim=3, hidden=5):
        super().__init__()
        self.a = torch.nn.Linear(dim, hidden)
        self.b = torch.nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t[:, None]))


# ---- item 1: hooks run once, on the total gradient -----------------------------------------


def _hooked_run(kw, time_tensor):
    torch.manual_seed(0)
    net = TwoLayer().double()
    extra = torch.randn(3, dtype=torch.float64, requires_grad=True)  # closed over, not a parameter
    counts = {"tensor": 0, "post": 0, "extra": 0, "module": 0}

    def scale(g):
        counts["tensor"] += 1
        return 0.5 * g

    def post(p):
        counts["post"] += 1

    def extra_hook(g):
        counts["extra"] += 1
        return 3.0 * g

    def module_hook(module, gin, gout):
        counts["module"] += 1

    net.a.bias.register_hook(scale)
    net.a.weight.register_post_accumulate_grad_hook(post)
    extra.register_hook(extra_hook)
    net.b.register_full_backward_hook(module_hook)

    def velocity(t, x):
        return net(t, x) * extra

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.9, dtype=torch.float64, requires_grad=True) if time_tensor else 0.9
    out = prg_fast.reverse(velocity, x, t, steps=3, method="rk4", **kw)
    out.pow(2).sum().backward()
    grads = [net.a.bias.grad, net.a.weight.grad, net.b.weight.grad, extra.grad, x.grad]
    if time_tensor:
        grads.append(t.grad)
    return counts, grads


@pytest.mark.parametrize("time_tensor", [False, True])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_parameter_hooks_run_once_on_the_total(name, time_tensor):
    kw = _strategy(name, TwoLayer().double(), torch.randn(2, 3, dtype=torch.float64), steps=3, method="rk4")
    counts, grads = _hooked_run(kw, time_tensor)
    ref_counts, ref_grads = _hooked_run(_oracle_kw(kw), time_tensor)
    assert counts == ref_counts
    assert ref_counts["tensor"] == 1 and ref_counts["post"] == 1 and ref_counts["extra"] == 1
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-12


# ---- item 2: the reversible adjoint checks its own reconstruction ----------------------------


class SharpBatchNormNet(torch.nn.Module):
    """A conv net with BatchNorm in train mode and weights scaled up: a large local Lipschitz
    constant, which blows up the reversible scheme's inverse steps in float32 (timm's
    mobilenetv3 in train mode did in the issue)."""

    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            self.c1.weight.mul_(scale)
            self.c2.weight.mul_(scale)

    def forward(self, t, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def _reversible_grad(scale, **kw):
    net = SharpBatchNormNet(scale)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    prg_fast.reverse(net, x, steps=8, method="rk4", reversible=True, **kw).pow(2).sum().backward()
    return x.grad


def test_reversible_reconstruction_blowup_is_an_error():
    with pytest.raises(RuntimeError, match=r"rebuilt the initial state .* relative error of .*reversible=False"):
        _reversible_grad(100.0)


def test_reversible_reconstruction_warns_with_the_figure_when_asked():
    ref = _reversible_grad(300.0, adjoint=False)
    with pytest.warns(RuntimeWarning, match=r"relative error of \d"):
        got = _reversible_grad(300.0, reversible_check="warn")
    # what the check is there for: the gradient is far from plain backprop's
    assert _rel(got, ref) > 1e-4


def test_reversible_reconstruction_within_tolerance_is_silent():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _reversible_grad(1.0)
    assert _rel(got, _reversible_grad(1.0, adjoint=False)) < 1e-5


def test_reversible_check_is_validated():
    with pytest.raises(ValueError, match="reversible_check"):
        prg_fast.reverse(TwoLayer(), torch.randn(2, 3), steps=2, reversible=True, reversible_check="loud")


# ---- item 7: odeint on a per-sample (T, B) grid honours memory_budget= and store= -------------


class CountingTwoLayer(TwoLayer):
    def __init__(self):
        super().__init__()
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
        assert _rel(g, r) < 1e-12


# ---- item 3: torch.utils.checkpoint(..., use_reentrant=True) inside the velocity --------------


class ReentrantCheckpointed(TwoLayer):
    def block(self, x, t):
        return torch.tanh(self.a(x) + t[:, None])

    def forward(self, t, x):
        from torch.utils.checkpoint import checkpoint
        return self.b(checkpoint(self.block, x, t, use_reentrant=True))


def _grads_with_existing(net, kw):
    """x's and the parameters' gradients of one solve, accumulated onto .grad already holding ones
    (the solve must add its gradient to what the user had, as backprop does)."""
    for q in net.parameters():
        q.grad = torch.ones_like(q)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    prg_fast.reverse(net, x, steps=3, method="rk4", **kw).pow(2).sum().backward()
    return [x.grad] + [q.grad.clone() for q in net.parameters()]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own use_reentrant deprecation notes
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_reentrant_checkpoint_inside_the_velocity_is_exact(name):
    torch.manual_seed(0)
    net = ReentrantCheckpointed().double()
    kw = _strategy(name, net, torch.randn(2, 3, dtype=torch.float64), steps=3, method="rk4")
    got = _grads_with_existing(net, kw)
    want = _grads_with_existing(net, _oracle_kw(kw))
    for g, r in zip(got, want):
        assert _rel(g, r) < 1e-12


# ---- item 4: with torch.nn.utils.parametrize.cached() around the solve -----------------------


def _parametrized(kind):
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    net = TwoLayer()
    wrap = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm,
            "orthogonal": lambda m: parametrizations.orthogonal(m)}[kind]
    net.a = wrap(net.a)
    net.b = wrap(net.b)
    return net.double()


def _cached_grads(net, kw, backward_inside, touch_first):
    from torch.nn.utils import parametrize
    import copy
    net = copy.deepcopy(net)  # spectral_norm's power-iteration buffers move: every run from the same
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    with parametrize.cached():
        if touch_first:
            net.a.weight  # computed (and cached) before the solve
        loss = prg_fast.reverse(net, x, steps=3, method="rk4", **kw).pow(2).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return [x.grad] + [q.grad for q in net.parameters()] + [b.clone() for b in net.buffers()]


@pytest.mark.parametrize("touch_first", [False, True])
@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("kind", ["weight_norm", pytest.param("spectral_norm", marks=pytest.mark.slow),
                                  pytest.param("orthogonal", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_parametrize_cached_around_the_solve_is_exact(name, kind, backward_inside, touch_first):
    net = _parametrized(kind)
    kw = _strategy(name, net, torch.randn(2, 3, dtype=torch.float64), steps=3, method="rk4")
    got = _cached_grads(net, kw, backward_inside, touch_first)
    want = _cached_grads(net, _oracle_kw(kw), backward_inside, touch_first)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if r is not None:
            assert _rel(g, r) < 1e-12


# ---- item 5: a lazy module before its first forward ------------------------------------------


class LazyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.LazyLinear(5, dtype=torch.float64)
        self.b = torch.nn.Linear(5, 3).double()

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t[:, None]))


def _lazy_grads(kw):
    torch.manual_seed(0)  # the lazy weights are drawn at the first evaluation: same draws each run
    net = LazyNet()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    prg_fast.reverse(net, x, steps=3, method="rk4", **kw).pow(2).sum().backward()
    return [x.grad] + [q.grad for q in net.parameters()]


@pytest.mark.parametrize("name", sorted(s for s in STRATEGIES if s != "budget_partial"))
def test_lazy_module_materialised_by_the_solve_is_exact(name):
    kw = dict(STRATEGIES[name])
    got, want = _lazy_grads(kw), _lazy_grads(_oracle_kw(kw))
    assert len(got) == len(want) == 5
    for g, r in zip(got, want):
        assert _rel(g, r) < 1e-12


# ---- item 6: nn.Embedding(max_norm=...) renormalises its weight in place inside its forward ---


class EmbeddingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = torch.nn.Embedding(4, 3, max_norm=1.0).double()
        self.b = torch.nn.Linear(3, 3).double()
        with torch.no_grad():
            self.e.weight.mul_(3.0)  # rows beyond max_norm: the first lookups renormalise them

    def forward(self, t, x):
        idx = (x[:, 0].detach().abs() * 10).long() % 4
        return self.b(torch.tanh(x + self.e(idx) + t[:, None]))


def _embedding_grads(kw):
    net = EmbeddingNet()
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    prg_fast.reverse(net, x, steps=3, method="rk4", **kw).pow(2).sum().backward()
    return [x.grad] + [q.grad for q in net.parameters()] + [net.e.weight.detach().clone()]


@pytest.mark.parametrize("name", sorted(s for s in STRATEGIES if s != "budget_partial"))
def test_embedding_max_norm_is_exact(name):
    kw = dict(STRATEGIES[name])
    got, want = _embedding_grads(kw), _embedding_grads(_oracle_kw(kw))
    for g, r in zip(got, want):
        assert _rel(g, r) < 1e-12


class ShrinkingNet(TwoLayer):
    """Writes its own parameter in place on every call, not idempotently."""

    def forward(self, t, x):
        with torch.no_grad():
            self.a.bias.mul_(0.5)
        return torch.tanh(x * self.a.bias[:3]) + self.b.bias


def test_non_idempotent_inplace_write_inside_the_model_is_named():
    net = ShrinkingNet().double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, method="euler", memory_budget=0)  # reruns
    before = net.a.bias.detach().clone()
    with pytest.raises(RuntimeError, match="writes a tensor it reads in place while it runs"):
        out.sum().backward()
    assert torch.equal(net.a.bias, before)  # put back as the forward left it
