"""Review of memory_budget="auto" (the default) and its whole-step tail: adversarial velocities,
each compared in float64 with plain backprop (adjoint=False, the oracle) and with the
per-evaluation path (memory_budget=0) -- gradients of x, the times, the parameters and what the
velocity closes over, the hooks' call counts, the buffers left behind, the random stream.
PRG_FAST_FREE_MEMORY_BYTES forces "auto" to keep everything (the tail) where the case needs it."""
import pytest
import torch
import torch.nn as nn

import prg_fast
from prg_fast.ode import free_memory

INF = float("inf")
F64 = torch.float64
STRATEGIES = {"auto": dict(), "recompute": dict(memory_budget=0), "keep_all": dict(memory_budget=INF)}


@pytest.fixture(autouse=True)
def _everything_fits(monkeypatch):
    """"auto" keeps every graph here (the tail covers the whole solve), whatever the machine has free."""
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(10**15))


def _node(out):
    node = out.grad_fn
    while node is not None and "AdjointSolve" not in type(node).__name__:
        node = node.next_functions[0][0]
    return node


def _cotangent(out):
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))


def _assert_close(got, want, what, tol=1e-12):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}: gradient {i} is {a} where backprop's is {b}"
        if a is not None:
            err = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
            assert err < tol, f"{what}: gradient {i} relative error {err:.3g}"


class Net(nn.Module):
    def __init__(self, dim=4, hidden=16):
        super().__init__()
        self.a, self.b = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x) + t[:, None]))


# -- a buffer written in place (its version moves) and saved by the graph ------------------------

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


@pytest.mark.parametrize("name", sorted(STRATEGIES))
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
    want = torch.autograd.grad(want_out, [x, *oracle.parameters()], _cotangent(want_out))
    out = prg_fast.reverse(net, x, steps=3, store=store, **STRATEGIES[name])
    assert torch.equal(out, want_out)
    _assert_close(torch.autograd.grad(out, [x, *net.parameters()], _cotangent(out)), want, name)
    assert torch.equal(net.scale, oracle.scale)  # written once per evaluation, as in backprop
    assert _node(out) is not None and _node(out).evals.kept_count == 0


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan", "lots"])
def test_free_memory_variable_that_is_no_finite_number_is_named(monkeypatch, value):
    """int(float("inf")) raised a bare OverflowError that named neither the variable nor the value."""
    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, value)
    with pytest.raises(ValueError, match="PRG_FAST_FREE_MEMORY_BYTES must be a number of bytes"):
        prg_fast.reverse(Net().double(), torch.randn(3, 4, dtype=F64, requires_grad=True), steps=2)
