"""Review of the plain-backprop solve (memory_budget="auto" keeping every graph runs as one autograd
graph from x: kept_graphs.EvaluationGraphs.as_backprop). Each case is solved three ways in float64 --
the default (auto, which keeps everything here), memory_budget=0 (the per-evaluation adjoint) and
adjoint=False (the oracle) -- and their gradients, errors and side effects must agree."""
import gc
import weakref

import pytest
import torch

import prg_fast
from solve_nodes import adjoint_node

WAYS = [dict(), dict(memory_budget=0), dict(adjoint=False)]
TOL = 1e-12


def _cotangent(out):
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))


def _close(got, want, tol=TOL):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert ((a - b).norm() / b.norm().clamp_min(1e-300)).item() < tol


def _three_ways(case, tol=TOL, exact=True):
    """case(**way) -> (out, inputs): grads of <out, cotangent> wrt inputs, the three ways, compared
    (`exact`: the plain path's bit for bit backprop's)."""
    grads = []
    for way in WAYS:
        torch.manual_seed(0)
        out, inputs = case(**way)
        if not way:
            assert adjoint_node(out).evals.as_backprop, "the default is meant to take the plain path here"
        grads.append(torch.autograd.grad(out, inputs, _cotangent(out), allow_unused=True))
    # the plain path is backprop op for op: bit for bit; the adjoint sums in its own order
    if exact:
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads[0], grads[2]))
    _close(grads[0], grads[2], tol)
    _close(grads[1], grads[2], tol)
    return grads


class Net(torch.nn.Module):
    def __init__(self, dim=4, hidden=8):
        super().__init__()
        self.a, self.b = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t[:, None].to(x.dtype)))


def _net():
    torch.manual_seed(0)
    return Net().double()


def test_non_leaf_x_from_an_encoder_gets_backprops_gradients():
    net, enc = _net(), torch.nn.Linear(3, 4).double()
    data = torch.randn(5, 3, dtype=torch.float64)

    def case(**kw):
        x = enc(data)
        out = prg_fast.reverse(net, x, steps=2, **kw)
        if kw == {}:  # the encoder's parameters are x's history, not the velocity's inputs
            ids = {id(p) for p in adjoint_node(out).evals.problem.reads.params}
            assert not ids & {id(p) for p in enc.parameters()}
        return out, list(enc.parameters()) + list(net.parameters())

    _three_ways(case)


@pytest.mark.parametrize("make", ["slice", "expand", "transpose"])
def test_x_a_view_of_a_bigger_tensor(make):
    net = _net()
    base = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    row = torch.randn(4, dtype=torch.float64, requires_grad=True)
    col = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    def case(**kw):
        x = {"slice": lambda: base[::2], "expand": lambda: row.expand(5, 4), "transpose": lambda: col.t()}[make]()
        return prg_fast.reverse(net, x, steps=2, method="midpoint", **kw), [base, row, col] + list(net.parameters())

    _three_ways(case)


def test_hooks_on_x_run_once_and_change_the_gradient_alike():
    net = _net()
    calls = []

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        x.register_hook(lambda g: (calls.append(1), 2 * g)[1])
        y = x * 1.5
        y.register_hook(lambda g: g + 1)
        return prg_fast.reverse(net, y, steps=2, **kw), [x] + list(net.parameters())

    _three_ways(case)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("x_grad, p_grad", [(True, False), (False, True)])
def test_frozen_parameters_or_x_without_grad(x_grad, p_grad):
    net = _net().requires_grad_(p_grad)

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_grad)
        inputs = ([x] if x_grad else []) + (list(net.parameters()) if p_grad else [])
        return prg_fast.reverse(net, x, steps=2, method="rk4", **kw), inputs

    _three_ways(case)


def test_float64_x_float32_model():
    torch.manual_seed(0)
    net = Net()
    x0 = torch.randn(5, 4, dtype=torch.float64)

    def case(**kw):
        x = x0.clone().requires_grad_(True)
        return prg_fast.reverse(net, x, steps=2, method="rk4", **kw), [x] + list(net.parameters())

    # float32 network arithmetic, summed in a different order by the adjoint's VJPs
    _three_ways(case, tol=1e-5)


@pytest.mark.parametrize("save_at", [[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]])
def test_save_at_with_t0(save_at):
    net = _net()

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(net, x, steps=4, save_at=save_at, **kw), [x] + list(net.parameters())

    _three_ways(case)


def test_per_sample_times_and_generate_and_odeint():
    net = _net()

    def per_sample(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        t = torch.linspace(0.5, 1.0, 5, dtype=torch.float64)
        return prg_fast.reverse(net, x, t, steps=3, save_at=torch.stack([t / 2, t]), **kw), [x] + list(net.parameters())

    def gen(**kw):
        z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.generate(net, z, steps=3, method="rk4", **kw), [z] + list(net.parameters())

    def ode(**kw):
        y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
        return prg_fast.odeint(lambda s, v: net(s.expand(5), v), y, t, **kw), [y] + list(net.parameters())

    for case in (per_sample, gen, ode):
        _three_ways(case)


def test_tuple_state_in_odeint():
    net = _net()

    def case(**kw):
        a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

        def f(s, y):
            return net(s.expand(5), y[0]), (y[0] ** 2).sum(1) * y[1]

        ya, yb = prg_fast.odeint(f, (a, b), t, **kw)
        return torch.cat([ya.flatten(), yb.flatten()]), [a, b] + list(net.parameters())

    grads = []
    for way in WAYS:
        torch.manual_seed(0)
        out, inputs = case(**way)
        grads.append(torch.autograd.grad(out, inputs, _cotangent(out)))
    _close(grads[0], grads[2])
    _close(grads[1], grads[2])


@pytest.mark.parametrize("kind", ["itself", "view"])
def test_model_returning_its_input(kind):
    lin = torch.nn.Linear(4, 4).double()

    def f(t, x):
        y = x if kind == "itself" else x.view(x.shape)
        return y * 0 + lin(y) if kind == "view" else x

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(f, x, steps=2, method="rk4", **kw), [x]

    # backprop's k_0 is x itself, the plain path's a copy of it: x's gradient sums its uses in
    # another order (rounding)
    _three_ways(case, exact=False)


def test_model_writing_into_its_input_is_the_solvers_error():
    net = _net()

    def bad(t, x):
        x.mul_(1.0)
        return net(t, x)

    for way in WAYS[:2]:
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match="modified its input x in place"):
            prg_fast.reverse(bad, x * 1, steps=2, **way)


def test_batchnorm_and_dropout_leave_backprops_buffers_and_random_stream():
    class BN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.drop, self.b = (torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                                  torch.nn.Dropout(0.3), torch.nn.Linear(8, 4))

        def forward(self, t, x):
            return self.b(self.drop(self.bn(torch.tanh(self.a(x) + t[:, None]))))

    results = []
    for way in WAYS:
        torch.manual_seed(0)
        net = BN().double()
        x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(net, x, steps=2, method="midpoint", **way)
        grads = torch.autograd.grad(out, [x] + list(net.parameters()), _cotangent(out))
        results.append((grads, [b.clone() for b in net.buffers()], torch.rand(3)))
    for got in results[:2]:
        _close(got[0], results[2][0])
        _close(got[1][:2], results[2][1][:2])
        assert torch.equal(got[2], results[2][2])


def test_autocast_cpu_bfloat16():
    net = _net().float()

    grads = []
    for way in WAYS:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prg_fast.reverse(net, x, steps=2, **way)
        grads.append(torch.autograd.grad(out, [x] + list(net.parameters()), _cotangent(out)))
    # the plain path is backprop's bf16 arithmetic, op for op: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[2]))
    _close(grads[1], grads[2], 1e-2)  # the adjoint rounds its cotangents its own way, within bf16's error


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_inside_the_model(reentrant):
    net = _net()

    def f(t, x):
        return torch.utils.checkpoint.checkpoint(net, t, x, use_reentrant=reentrant)

    grads = []
    for way in WAYS:
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(f, x, steps=2, **way)
        (out * _cotangent(out)).sum().backward()
        grads.append([x.grad] + [p.grad.clone() for p in net.parameters()])
        net.zero_grad()
    _close(grads[0], grads[2])
    _close(grads[1], grads[2])


def test_reentrant_checkpoint_under_autograd_grad_is_torchs_error_every_way():
    """torch.autograd.grad refuses a reentrant checkpoint in plain backprop, and inside the
    adjoint's backward too (its VJP's nested backward is under the outer .grad()): the same error
    whichever way the solve is differentiated (with .backward() all three agree, above)."""
    net = _net()

    def f(t, x):
        return torch.utils.checkpoint.checkpoint(net, t, x, use_reentrant=True)

    for way in WAYS:
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(f, x, steps=2, **way)
        with pytest.raises(RuntimeError, match="use_reentrant=True, torch.utils.checkpoint is incompatible"):
            torch.autograd.grad(out.sum(), [x] + list(net.parameters()))


def test_parametrizations_cached_and_weight_norm():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    grads = []
    for way in WAYS:
        net = _net()
        weight_norm(net.a)
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with parametrize.cached():
            out = prg_fast.reverse(net, x, steps=2, method="midpoint", **way)
        grads.append(torch.autograd.grad(out, [x] + list(net.parameters()), _cotangent(out)))
    _close(grads[0], grads[2])
    _close(grads[1], grads[2])


def test_functional_call_with_fast_weights():
    net = _net()
    base = dict(net.named_parameters())

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        inner = prg_fast.reverse(net, x, steps=1, adjoint=False).square().sum()
        g = torch.autograd.grad(inner, list(base.values()), create_graph=True)
        fast = {k: v - 0.1 * gk for (k, v), gk in zip(base.items(), g)}
        f = lambda t, y: torch.func.functional_call(net, fast, (t, y))  # noqa: E731
        return prg_fast.reverse(f, x, steps=2, adjoint_params=list(fast.values()), **kw), [x] + list(base.values())

    _three_ways(case)


def test_retain_graph_second_backward_is_the_first():
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2)
    g = _cotangent(out)
    first = torch.autograd.grad(out, [x] + list(net.parameters()), g, retain_graph=True)
    for a, b in zip(torch.autograd.grad(out, [x] + list(net.parameters()), g), first):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", ["linear", "square"])
def test_second_derivative_of_the_plain_path_is_backprops(loss):
    """create_graph=True through the plain path, then torch.autograd.grad of that gradient: the
    second derivative is backprop's (it was once_differentiable, whose DelayedError node
    torch.autograd.grad(..., inputs) prunes: the term through the cotangent went missing silently)."""
    net = _net()
    second = []
    for way in (WAYS[0], WAYS[2]):
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(net, x, steps=2, method="midpoint", **way)
        first = (out * _cotangent(out)).sum() if loss == "linear" else out.square().sum()
        gx, = torch.autograd.grad(first, [x], create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), [x] + list(net.parameters())))
    _close(second[0], second[1])


def test_gradcheck_tiny():
    net = Net(2, 3).double()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: prg_fast.reverse(net, x, steps=2, method="rk4"),
                                    (x, *net.parameters()))


def test_closed_over_computed_tensor_is_the_clear_error():
    net = _net()
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = a * 2

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint_params"):
        prg_fast.reverse(lambda t, y: net(t, y) * w, x, steps=2)


def test_x_itself_closed_over_is_an_input_once():
    net = _net()

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(lambda t, y: net(t, y) + 0.1 * x, x, steps=2, method="rk4", **kw), [x]

    _three_ways(case)


def test_in_place_write_after_the_solve_to_a_tensor_its_first_evaluation_saved():
    """A closed-over tensor the graph saves, written in place between the solve and its backward:
    backprop refuses (version counter); the first evaluation's graph is saved through the budget's
    measuring hooks, and must refuse the same way rather than use the new values."""
    net = _net()
    # (memory_budget=0 recomputes from the new values: the adjoint checks only its inputs' versions)
    for way in (WAYS[0], WAYS[2]):
        c = torch.randn(5, 4, dtype=torch.float64)
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(lambda t, y: net(t, y) * c, x, steps=1, method="euler", **way)
        c.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_parameter_written_in_place_before_backward():
    for way in WAYS:
        net = _net()
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(net, x, steps=1, method="euler", **way)
        with torch.no_grad():
            net.b.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
            out.sum().backward()


def test_out_of_memory_in_the_plain_path_falls_back_exactly():
    from test_auto_budget import FailsOnce, Net as BNNet

    for at in (2, 3, 5):
        torch.manual_seed(0)
        inner = BNNet(dropout=0.2, batchnorm=True).double()
        model = FailsOnce(inner, at=at)
        calls = []
        inner.a.register_forward_hook(lambda *a: calls.append(1))
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(model, x, steps=3, method="midpoint")
        evals = adjoint_node(out).evals
        assert evals.fell_back and not evals.as_backprop
        got = torch.autograd.grad(out, [x] + list(inner.parameters()), _cotangent(out))
        after = ([b.clone() for b in inner.buffers()], torch.rand(2))
        torch.manual_seed(0)
        ref_net = BNNet(dropout=0.2, batchnorm=True).double()
        xr = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        ref = prg_fast.reverse(ref_net, xr, steps=3, method="midpoint", adjoint=False)
        want = torch.autograd.grad(ref, [xr] + list(ref_net.parameters()), _cotangent(ref))
        _close(got, want)
        _close(after[0][:2], [b for b in ref_net.buffers()][:2])
        assert torch.equal(after[1], torch.rand(2))
        # the failed attempt's at - 1 evaluations (the at-th fails before the network), then the
        # adjoint's forward (6, the first evaluation rerun) and its backward's 6 recomputations
        assert len(calls) == at - 1 + 6 + 6


@pytest.mark.parametrize("way", [dict(), dict(memory_budget=0), dict(reversible=True)])
def test_sequential_solves_free_their_graphs_without_gc(way):
    """No reference cycle keeps x or the solve's record alive through its backward node (ctx.evals,
    ctx.differentiated): refcounting alone frees them once the output is gone."""
    net = _net()
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


def test_torch_compiled_velocity():
    net = _net()
    compiled = torch.compile(net, backend="eager")

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(compiled if kw.get("adjoint", True) else net, x, steps=2, **kw), \
            [x] + list(net.parameters())

    _three_ways(case)


@pytest.mark.parametrize("way", [dict(memory_budget=0), dict(reversible=True), dict(memory_budget=0, store="steps")])
def test_second_derivative_through_the_adjoints_is_the_error_under_autograd_grad(way):
    """The adjoints' backward is once differentiable. torch's error node sat only on the path
    through the cotangent, which torch.autograd.grad(..., inputs) prunes when another path reaches
    the inputs: the second-order term went missing silently. Now the error, every adjoint; a
    first derivative taken with create_graph=True is unchanged."""
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = prg_fast.reverse(net, x, steps=2, **way)
    gx, = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
    want, = torch.autograd.grad(prg_fast.reverse(net, x, steps=2, **way).square().sum(), [x])
    assert torch.equal(gx.detach(), want)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(gx.square().sum() + x.square().sum(), [x])
    out = prg_fast.reverse(net, x, steps=2, **way)
    gp = torch.autograd.grad((out * _cotangent(out)).sum(), list(net.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(sum(g.square().sum() for g in gp) + x.sum(), [x])


@pytest.mark.parametrize("x_grad", [True, False])
def test_x_written_in_place_before_backward_is_backprops_error(x_grad):
    """The first evaluation reads a copy of x's stage input (so a model writing into its input meets
    the solver's check); backprop's graph saves x itself where the model saves its input, so
    writing x in place between the solve and the backward is backprop's error: the copy's saved
    version is x's. A velocity that saves no input is no error in either."""
    net = _net()
    lin = torch.nn.Linear(4, 4).double()
    for model, saves_input in ((net, True), (lambda t, v: lin(t[:, None] * torch.ones_like(v)) - v, False)):
        for way in (WAYS[0], WAYS[2]):
            x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_grad)
            y = x * 1 if x_grad else x
            out = prg_fast.reverse(model, y, steps=2, method="midpoint", **way)
            with torch.no_grad():
                y.mul_(2)
            if saves_input:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    out.sum().backward()
            else:
                out.sum().backward()


@pytest.mark.parametrize("kw", [dict(save_at=[0.0, 0.5, 1.0]), dict(learn_t=True)])
def test_prg_classifier(kw):
    """PRGClassifier (an image-shaped flow, a head, x from an upstream layer): the three ways agree,
    learned time included (a time gradient keeps the adjoint's Function)."""
    from prg_fast.classifier import PRGClassifier

    class Flow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, t, x):
            return torch.tanh(self.conv(x)) * t[:, None, None, None].to(x.dtype)

    torch.manual_seed(0)
    flow, stem = Flow().double(), torch.nn.Conv2d(1, 2, 1).double()
    chans = 2 * (len(kw["save_at"]) if "save_at" in kw else 1)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(chans * 16, 3)).double()
    data = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    grads = []
    for way in WAYS:
        clf = PRGClassifier(flow, head, steps=2, method="midpoint", adjoint=way.get("adjoint", True),
                            **{k: v for k, v in way.items() if k != "adjoint"}, **kw).double()
        logits = clf(stem(data))
        params = [p for p in list(clf.parameters()) + list(stem.parameters())]
        grads.append(torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])), params))
    _close(grads[0], grads[2])
    _close(grads[1], grads[2])


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

    _three_ways(case)


def test_inference_mode_x():
    """An x made under inference mode: the per-evaluation adjoint and backprop save it, torch's
    error; the plain path reads a copy of it, and its gradients are backprop's from a normal copy."""
    net = _net()
    with torch.inference_mode():
        x0 = torch.randn(5, 4, dtype=torch.float64)
    for way in WAYS[1:]:
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            prg_fast.reverse(net, x0, steps=2, method="rk4", **way).sum().backward()
    got, want = [torch.autograd.grad(prg_fast.reverse(net, x, steps=2, method="rk4", **way).sum(), list(net.parameters()))
                 for x, way in ((x0, WAYS[0]), (x0.clone(), WAYS[2]))]
    _close(got, want)


def test_hooks_run_as_often_as_under_backprop():
    """Forward hooks (one per evaluation: the first is reused, not rerun), parameter tensor hooks
    and post-accumulate-grad hooks (once per backward each): the plain path's counts are backprop's."""
    counts = []
    for way in (WAYS[0], WAYS[2]):
        net = _net()
        seen = {"forward": 0, "tensor": 0, "accumulated": 0}
        net.a.register_forward_hook(lambda *a: seen.__setitem__("forward", seen["forward"] + 1))
        for p in net.parameters():
            p.register_hook(lambda g: seen.__setitem__("tensor", seen["tensor"] + 1))
            p.register_post_accumulate_grad_hook(lambda q: seen.__setitem__("accumulated", seen["accumulated"] + 1))
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        prg_fast.reverse(net, x, steps=3, method="rk4", **way).sum().backward()
        counts.append(seen)
    assert counts[0] == counts[1] and counts[1]["forward"] == 12 and counts[1]["tensor"] == 4


def test_closed_over_tensor_computed_from_x_passed_as_adjoint_params():
    """c = 2 x read by the velocity and passed as adjoint_params: x's gradient comes from the state
    and from c, through c's graph, once each."""
    net = _net()

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        c = 2 * x
        return prg_fast.reverse(lambda t, y: net(t, y) * c, x, steps=2, adjoint_params=[c], **kw), \
            [x] + list(net.parameters())

    _three_ways(case)


def test_x_a_parameter_the_velocity_reads_too():
    """A learned initial state that the velocity also reads (a module parameter): one input of the
    solve's velocity and its state at once."""
    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x0 = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
            self.net = _net()

        def forward(self, t, y):
            return self.net(t, y) + 0.1 * self.x0

    torch.manual_seed(0)
    m = Learned()
    _three_ways(lambda **kw: (prg_fast.reverse(m, m.x0, steps=2, method="rk4", **kw), list(m.parameters())))


def test_a_large_written_buffer_runs_when_nothing_is_rerun():
    """A buffer too large to copy that the velocity writes (a counter table): refused where the
    adjoint reruns or undoes evaluations, but the plain path reruns nothing -- backprop's result,
    as the refusal's own advice (memory_budget=float('inf')) says."""
    from prg_fast.ode.module_state import COPY_LIMIT

    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("hits", torch.zeros(COPY_LIMIT + 1, dtype=torch.float64))
            self.net = _net()

        def forward(self, t, x):
            self.hits[:4].add_(1)
            return self.net(t, x)

    got = []
    for way in (dict(memory_budget=float("inf")), dict(), dict(adjoint=False)):
        m = Counts()
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(m, x, steps=2, method="midpoint", **way)
        got.append(torch.autograd.grad(out, [x] + list(m.parameters()), _cotangent(out)) + (m.hits[:4].clone(),))
    _close(got[0], got[2])
    _close(got[1], got[2])
    for way in (dict(memory_budget=0), dict(reversible=True)):
        with pytest.raises(RuntimeError, match="writes its buffer 'Counts.hits'"):
            prg_fast.reverse(Counts(), torch.randn(5, 4, dtype=torch.float64, requires_grad=True), steps=2, **way)


def test_gradgradcheck_tiny_plain_path():
    """The plain path's second derivative, against finite differences of its first (float64)."""
    torch.manual_seed(0)
    net = Net(2, 3).double()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def solve(x, *p):
        out = prg_fast.reverse(net, x, steps=2, method="midpoint")
        assert adjoint_node(out).evals.as_backprop
        return out

    assert torch.autograd.gradgradcheck(solve, (x, *net.parameters()))


def test_a_layers_output_kept_by_a_forward_hook_for_a_loss():
    """Features handed out with their graph (a forward hook keeping a layer's output for a loss):
    the adjoints cannot differentiate them (docs/engine.md); the plain path is backprop, exact."""
    res = []
    for way in (WAYS[0], WAYS[2]):
        net, acts = _net(), []
        net.a.register_forward_hook(lambda m, i, o: acts.append(o))
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = prg_fast.reverse(net, x, steps=2, method="rk4", **way)
        loss = (out * _cotangent(out)).sum() + sum(a.square().sum() for a in acts)
        res.append(torch.autograd.grad(loss, [x] + list(net.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*res))
