"""The adjoint's inputs, each solved three ways in float64 -- the default ("auto", which keeps every
graph of these small solves: the plain path), memory_budget=0 (the per-evaluation adjoint) and
adjoint=False (the oracle): x from an encoder, a view, a parameter the velocity reads too, with or
without grad; tensors the velocity closes over (x itself, one computed from x and passed as
adjoint_params, one computed and not passed: the clear error); and writes in place between the solve
and its backward (x, a parameter, a saved closed-over tensor), which are backprop's errors."""
import pytest
import torch

import prg_fast
from gradient_checks import THREE_WAYS, seeded_net, three_ways
from solve_nodes import adjoint_node


def test_non_leaf_x_from_an_encoder_gets_backprops_gradients():
    net, enc = seeded_net(), torch.nn.Linear(3, 4).double()
    data = torch.randn(5, 3, dtype=torch.float64)

    def case(**kw):
        x = enc(data)
        out = prg_fast.reverse(net, x, steps=2, **kw)
        if kw == {}:  # the encoder's parameters are x's history, not the velocity's inputs
            ids = {id(p) for p in adjoint_node(out).evals.problem.reads.params}
            assert not ids & {id(p) for p in enc.parameters()}
        return out, list(enc.parameters()) + list(net.parameters())

    three_ways(case)


@pytest.mark.parametrize("make", ["slice", "expand", "transpose"])
def test_x_a_view_of_a_bigger_tensor(make):
    net = seeded_net()
    base = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    row = torch.randn(4, dtype=torch.float64, requires_grad=True)
    col = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    def case(**kw):
        x = {"slice": lambda: base[::2], "expand": lambda: row.expand(5, 4), "transpose": lambda: col.t()}[make]()
        return prg_fast.reverse(net, x, steps=2, method="midpoint", **kw), [base, row, col] + list(net.parameters())

    three_ways(case)


@pytest.mark.parametrize("x_grad, p_grad", [(True, False), (False, True)])
def test_frozen_parameters_or_x_without_grad(x_grad, p_grad):
    net = seeded_net().requires_grad_(p_grad)

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=x_grad)
        inputs = ([x] if x_grad else []) + (list(net.parameters()) if p_grad else [])
        return prg_fast.reverse(net, x, steps=2, method="rk4", **kw), inputs

    three_ways(case)


def test_x_a_parameter_the_velocity_reads_too():
    """A learned initial state that the velocity also reads (a module parameter): one input of the
    solve's velocity and its state at once."""
    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.x0 = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
            self.net = seeded_net()

        def forward(self, t, y):
            return self.net(t, y) + 0.1 * self.x0

    torch.manual_seed(0)
    m = Learned()
    three_ways(lambda **kw: (prg_fast.reverse(m, m.x0, steps=2, method="rk4", **kw), list(m.parameters())))


def test_x_itself_closed_over_is_an_input_once():
    net = seeded_net()

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(lambda t, y: net(t, y) + 0.1 * x, x, steps=2, method="rk4", **kw), [x]

    three_ways(case)


def test_closed_over_tensor_computed_from_x_passed_as_adjoint_params():
    """c = 2 x read by the velocity and passed as adjoint_params: x's gradient comes from the state
    and from c, through c's graph, once each."""
    net = seeded_net()

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        c = 2 * x
        return prg_fast.reverse(lambda t, y: net(t, y) * c, x, steps=2, adjoint_params=[c], **kw), \
            [x] + list(net.parameters())

    three_ways(case)


def test_closed_over_computed_tensor_is_the_clear_error():
    net = seeded_net()
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = a * 2

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="adjoint_params"):
        prg_fast.reverse(lambda t, y: net(t, y) * w, x, steps=2)


def test_model_writing_into_its_input_is_the_solvers_error():
    net = seeded_net()

    def bad(t, x):
        x.mul_(1.0)
        return net(t, x)

    for way in THREE_WAYS[:2]:
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match="modified its input x in place"):
            prg_fast.reverse(bad, x * 1, steps=2, **way)


@pytest.mark.parametrize("x_grad", [True, False])
def test_x_written_in_place_before_backward_is_backprops_error(x_grad):
    """The first evaluation reads a copy of x's stage input (so a model writing into its input meets
    the solver's check); backprop's graph saves x itself where the model saves its input, so
    writing x in place between the solve and the backward is backprop's error: the copy's saved
    version is x's. A velocity that saves no input is no error in either."""
    net = seeded_net()
    lin = torch.nn.Linear(4, 4).double()
    for model, saves_input in ((net, True), (lambda t, v: lin(t[:, None] * torch.ones_like(v)) - v, False)):
        for way in (THREE_WAYS[0], THREE_WAYS[2]):
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


def test_parameter_written_in_place_before_backward():
    for way in THREE_WAYS:
        net = seeded_net()
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(net, x, steps=1, method="euler", **way)
        with torch.no_grad():
            net.b.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
            out.sum().backward()


def test_in_place_write_after_the_solve_to_a_tensor_its_first_evaluation_saved():
    """A closed-over tensor the graph saves, written in place between the solve and its backward:
    backprop refuses (version counter); the first evaluation's graph is saved through the budget's
    measuring hooks, and must refuse the same way rather than use the new values."""
    net = seeded_net()
    # (memory_budget=0 recomputes from the new values: the adjoint checks only its inputs' versions)
    for way in (THREE_WAYS[0], THREE_WAYS[2]):
        c = torch.randn(5, 4, dtype=torch.float64)
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(lambda t, y: net(t, y) * c, x, steps=1, method="euler", **way)
        c.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
