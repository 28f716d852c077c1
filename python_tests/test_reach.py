"""What a velocity reaches (prg_fast/ode/discovery.py: reachable), and why it matters: a velocity may read tensors
requiring grad only after its first evaluation (an expert chosen by time, a tensor used for t >= 1/2),
which graph discovery on the first evaluation cannot see. Without the search their gradients were
silently missing (None) under the adjoint; plain backprop is the oracle."""
import functools

import pytest
import torch
import torch.nn as nn

import prg_fast
from prg_fast.ode import discovery as reach

D = torch.float64
# the default ("auto": every graph kept at these sizes), recompute all, keep all, steps, reversible
STRATEGIES = [dict(), dict(memory_budget=0), dict(memory_budget=float("inf")), dict(store="steps", memory_budget=0),
              dict(reversible=True)]


def _experts():
    torch.manual_seed(0)
    early, late = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()

    def velocity(t, x):  # a closure: neither module is a parameter of anything passed
        return torch.tanh(early(x)) if float(t[0]) < 0.5 else torch.tanh(late(x))

    return velocity, list(early.parameters()) + list(late.parameters())


def _late_tensor():
    torch.manual_seed(0)
    w = torch.randn(4, dtype=D, requires_grad=True)

    def velocity(t, x):
        return torch.tanh(x) * (w if float(t[0]) >= 0.5 else 1.0)

    return velocity, [w]


_GLOBAL_LATE = None


class _GlobalUser(nn.Module):
    """A module whose forward reads a network held in a global, only late in the solve."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, t, x):
        out = torch.tanh(self.lin(x))
        return out + _GLOBAL_LATE(x) if float(t[0]) >= 0.5 else out


def _module_reading_a_global():
    global _GLOBAL_LATE
    torch.manual_seed(0)
    _GLOBAL_LATE = nn.Linear(4, 4).double()
    net = _GlobalUser().double()
    return net, list(net.parameters()) + list(_GLOBAL_LATE.parameters())


def _wrapped_lambda():
    velocity, params = _experts()
    return prg_fast.time_reversed(functools.partial(lambda f, t, x: f(t, x), velocity)), params


CASES = {"experts_by_time": _experts, "late_closure_tensor": _late_tensor,
         "module_reading_a_global": _module_reading_a_global, "wrapped_partial_lambda": _wrapped_lambda}


def _grads(fn, params, adjoint, method, **kw):
    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = prg_fast.reverse(fn, x, steps=4, method=method, adjoint=adjoint, **kw)
    return torch.autograd.grad(out.sum(), [x] + params, allow_unused=True)


@pytest.mark.parametrize("strategy", range(len(STRATEGIES)))
@pytest.mark.parametrize("method", ["euler", "rk4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tensors_read_only_after_the_first_evaluation_get_their_gradient(case, method, strategy):
    kw = STRATEGIES[strategy]
    fn, params = CASES[case]()
    want = _grads(fn, params, False, method, reversible=kw.get("reversible", False))
    assert all(g is not None for g in want), "the oracle lost a gradient: the case is wrong"
    got = _grads(fn, params, True, method, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"gradient {i} missing under the adjoint"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_what_is_found_through_each_kind_of_holder():
    lin = nn.Linear(2, 2)
    w = torch.zeros(2, requires_grad=True)
    plain = torch.zeros(2)

    class Holder:
        def __init__(self):
            self.parts = {"lin": lin, "w": w, "plain": plain}

        def __call__(self, t, x):
            return x

        def velocity(self, t, x):
            return x

    for obj in (lambda t, x: lin(x) + w, functools.partial(lambda a, b, t, x: x, lin, w), Holder(),
                Holder().velocity, [lin, w], prg_fast.time_reversed(lambda t, x: lin(x) * w)):
        found = reach.reachable(obj)
        assert any(m is lin for m in found.modules), obj
        assert any(t is w for t in found.tensors), obj
        assert not any(t is plain for t in found.tensors)  # not requiring grad: nothing to differentiate


def test_the_search_is_bounded():
    many = [torch.zeros(1, requires_grad=True) for _ in range(reach.MAX_ITEMS + 1)]
    assert reach.reachable(lambda t, x: x + many[0]).tensors == []  # a large container is not searched
    deep = torch.zeros(1, requires_grad=True)
    nested = deep
    for _ in range(reach.MAX_DEPTH + 2):
        nested = [nested]
    assert reach.reachable(lambda t, x: x + nested).tensors == []
    assert reach.reachable(lambda t, x: x + [[deep]]).tensors == [deep]
