"""What users and libraries hang on their networks, and the adjoints stay exact: gradient hooks (run
once, on the total; on x; as often as under backprop), torch.utils.checkpoint (reentrant or not),
parametrizations and parametrize.cached(), lazy modules, in-place renormalisation (Embedding
max_norm), torch.func.functional_call with fast weights, torch.compile, autograd.grad inside the
velocity, a layer's output kept by a forward hook. Float64; the oracle is plain backprop through
the same solver (adjoint=False; through the same reversible scheme for reversible=True)."""
import pytest
import torch
import torch.utils.checkpoint  # (torch < 2.6 does not import it with torch)

import prg_fast
from gradient_checks import THREE_WAYS, TwoLayer, assert_grads_close, cotangent, rel_err, seeded_net, three_ways
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


def _strategy(name, model, x, **kw):
    s = STRATEGIES[name]
    if s == "partial":
        out = prg_fast.reverse(model, x, memory_budget=INF, **kw)
        return dict(memory_budget=3 * adjoint_node(out).evals.graph_bytes)
    return dict(s)


def _oracle_kw(kw):
    """plain backprop through the same scheme"""
    return dict(adjoint=False, reversible=kw.get("reversible", False))


# -- gradient hooks --------------------------------------------------------------------------------


def _hooked_run(kw, time_tensor):
    torch.manual_seed(0)
    net = TwoLayer(3, 5).double()
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
    kw = _strategy(name, TwoLayer(3, 5).double(), torch.randn(2, 3, dtype=torch.float64), steps=3, method="rk4")
    counts, grads = _hooked_run(kw, time_tensor)
    ref_counts, ref_grads = _hooked_run(_oracle_kw(kw), time_tensor)
    assert counts == ref_counts
    assert ref_counts["tensor"] == 1 and ref_counts["post"] == 1 and ref_counts["extra"] == 1
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-12


def test_hooks_on_x_run_once_and_change_the_gradient_alike():
    net = seeded_net()
    calls = []

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        x.register_hook(lambda g: (calls.append(1), 2 * g)[1])
        y = x * 1.5
        y.register_hook(lambda g: g + 1)
        return prg_fast.reverse(net, y, steps=2, **kw), [x] + list(net.parameters())

    three_ways(case)
    assert calls == [1, 1, 1]


def test_hooks_run_as_often_as_under_backprop():
    """Forward hooks (one per evaluation: the first is reused, not rerun), parameter tensor hooks
    and post-accumulate-grad hooks (once per backward each): the plain path's counts are backprop's."""
    counts = []
    for way in (THREE_WAYS[0], THREE_WAYS[2]):
        net = seeded_net()
        seen = {"forward": 0, "tensor": 0, "accumulated": 0}
        net.a.register_forward_hook(lambda *a: seen.__setitem__("forward", seen["forward"] + 1))
        for p in net.parameters():
            p.register_hook(lambda g: seen.__setitem__("tensor", seen["tensor"] + 1))
            p.register_post_accumulate_grad_hook(lambda q: seen.__setitem__("accumulated", seen["accumulated"] + 1))
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        prg_fast.reverse(net, x, steps=3, method="rk4", **way).sum().backward()
        counts.append(seen)
    assert counts[0] == counts[1] and counts[1]["forward"] == 12 and counts[1]["tensor"] == 4


def test_a_layers_output_kept_by_a_forward_hook_for_a_loss():
    """Features handed out with their graph (a forward hook keeping a layer's output for a loss):
    the adjoints cannot differentiate them (docs/engine.md); the plain path is backprop, exact."""
    res = []
    for way in (THREE_WAYS[0], THREE_WAYS[2]):
        net, acts = seeded_net(), []
        net.a.register_forward_hook(lambda m, i, o: acts.append(o))
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(net, x, steps=2, method="rk4", **way)
        loss = (out * cotangent(out)).sum() + sum(a.square().sum() for a in acts)
        res.append(torch.autograd.grad(loss, [x] + list(net.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*res))


# -- torch.utils.checkpoint inside the velocity ------------------------------------------------------


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
    net = ReentrantCheckpointed(3, 5).double()
    kw = _strategy(name, net, torch.randn(2, 3, dtype=torch.float64), steps=3, method="rk4")
    got = _grads_with_existing(net, kw)
    want = _grads_with_existing(net, _oracle_kw(kw))
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_inside_the_model(reentrant):
    net = seeded_net()

    def f(t, x):
        return torch.utils.checkpoint.checkpoint(net, t, x, use_reentrant=reentrant)

    grads = []
    for way in THREE_WAYS:
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(f, x, steps=2, **way)
        (out * cotangent(out)).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in net.parameters()])
        net.zero_grad()
    assert_grads_close(grads[0], grads[2])
    assert_grads_close(grads[1], grads[2])


def test_reentrant_checkpoint_under_autograd_grad_is_torchs_error_every_way():
    """torch.autograd.grad refuses a reentrant checkpoint in plain backprop, and inside the
    adjoint's backward too (its VJP's nested backward is under the outer .grad()): the same error
    whichever way the solve is differentiated (with .backward() all three agree, above)."""
    net = seeded_net()

    def f(t, x):
        return torch.utils.checkpoint.checkpoint(net, t, x, use_reentrant=True)

    for way in THREE_WAYS:
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(f, x, steps=2, **way)
        with pytest.raises(RuntimeError, match="use_reentrant=True, torch.utils.checkpoint is incompatible"):
            torch.autograd.grad(out.sum(), [x] + list(net.parameters()))


# -- parametrizations, with torch.nn.utils.parametrize.cached() around the solve ----------------------


def _parametrized(kind):
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    net = TwoLayer(3, 5)
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
            assert rel_err(g, r) < 1e-12


def test_parametrizations_cached_and_weight_norm():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    grads = []
    for way in THREE_WAYS:
        net = seeded_net()
        weight_norm(net.a)
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with parametrize.cached():
            out = prg_fast.reverse(net, x, steps=2, method="midpoint", **way)
        grads.append(torch.autograd.grad(out, [x] + list(net.parameters()), cotangent(out)))
    assert_grads_close(grads[0], grads[2])
    assert_grads_close(grads[1], grads[2])


# -- a lazy module before its first forward -------------------------------------------------------


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
        assert rel_err(g, r) < 1e-12


# -- nn.Embedding(max_norm=...) renormalises its weight in place inside its forward ---------------


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
        assert rel_err(g, r) < 1e-12


# -- functional_call, torch.compile, autograd.grad inside the velocity --------------------------------


def test_functional_call_with_fast_weights():
    net = seeded_net()
    base = dict(net.named_parameters())

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        inner = prg_fast.reverse(net, x, steps=1, adjoint=False).square().sum()
        g = torch.autograd.grad(inner, list(base.values()), create_graph=True)
        fast = {k: v - 0.1 * gk for (k, v), gk in zip(base.items(), g)}
        f = lambda t, y: torch.func.functional_call(net, fast, (t, y))  # noqa: E731
        return prg_fast.reverse(f, x, steps=2, adjoint_params=list(fast.values()), **kw), [x] + list(base.values())

    three_ways(case)


def test_torch_compiled_velocity():
    net = seeded_net()
    compiled = torch.compile(net, backend="eager")

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(compiled if kw.get("adjoint", True) else net, x, steps=2, **kw), \
            [x] + list(net.parameters())

    three_ways(case)


def test_energy_model_with_an_x_without_grad():
    """v = -dE/dx by autograd inside the model, which makes its own input require grad when it does
    not (the first evaluation's input has no grad for an x without grad): the three ways agree."""
    torch.manual_seed(0)
    energy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

    def velocity(t, x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            e = energy(x).sum()
            return -torch.autograd.grad(e, x, create_graph=True)[0]

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64)
        return prg_fast.reverse(velocity, x, steps=2, method="midpoint", **kw), list(energy.parameters())

    three_ways(case)
