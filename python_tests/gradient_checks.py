"""What the gradient tests compare with: one fixed cotangent and the gradients through it, the
relative error, the comparison of two lists of gradients, the three ways of differentiating a solve
(the default, the per-evaluation adjoint, plain backprop: the oracle), and the small velocity networks
several files solve (conftest.py's fixtures mlp and conv hand out MLPVelocity and ConvVelocity)."""
import torch
import torch.nn as nn

from solve_nodes import adjoint_node

# the default ("auto", which keeps every graph of a small solve: the plain path), the per-evaluation
# adjoint, and plain backprop (the oracle)
THREE_WAYS = [dict(), dict(memory_budget=0), dict(adjoint=False)]
# the stored adjoint's graph budgets: "auto" (the default), recompute every evaluation, keep every graph
BUDGET_STRATEGIES = {"auto": dict(), "recompute": dict(memory_budget=0), "keep_all": dict(memory_budget=float("inf"))}


def cotangent(out, seed=1):
    """A fixed random cotangent shaped like `out`: drawn on the CPU from its own generator (the
    global random stream is left alone; every device gets the same numbers), then moved to out's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, dtype=out.dtype, generator=g).to(out.device)


def grads(out, inputs, seed=1, **grad_kw):
    """The gradients of <out, cotangent(out, seed)> w.r.t. `inputs` (grad_kw: retain_graph,
    allow_unused, create_graph, as torch.autograd.grad takes them)."""
    return torch.autograd.grad(out, inputs, cotangent(out, seed), **grad_kw)


def rel_err(a, b):
    """|a - b| / |b|, computed in float64 (complex128 for complex tensors) whatever their dtype;
    |b| = 0 counts as 1e-300, so any difference from a zero gradient is a huge error."""
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a, b = a.to(wide), b.to(wide)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_grads_close(got, want, what="gradients", tol=1e-12):
    """As many gradients as `want`, None exactly where it has None, each within `tol` relative error."""
    assert len(got) == len(want), f"{what}: {len(got)} gradients where {len(want)} are expected"
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}: gradient {i} is {a} where the oracle's is {b}"
        if a is not None:
            err = rel_err(a, b)
            assert err < tol, f"{what}: gradient {i} relative error {err:.3g} (tolerance {tol:g})"


def three_ways(case, tol=1e-12, exact=True):
    """case(**way) -> (out, inputs), solved THREE_WAYS from the same seed: the gradients of
    <out, cotangent> w.r.t. inputs, the default's and the per-evaluation adjoint's compared with
    plain backprop's. The default must take the plain path here (every graph kept), which is
    backprop op for op: bit for bit when `exact` (the adjoint sums in its own order: to `tol`)."""
    found = []
    for way in THREE_WAYS:
        torch.manual_seed(0)
        out, inputs = case(**way)
        if not way:
            assert adjoint_node(out).evals.as_backprop, "the default is meant to take the plain path here"
        found.append(grads(out, inputs, allow_unused=True))
    if exact:
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(found[0], found[2]))
    assert_grads_close(found[0], found[2], "the default", tol)
    assert_grads_close(found[1], found[2], "memory_budget=0", tol)
    return found


class MLPVelocity(nn.Module):
    """v(t, x) for x of shape (B, D): an MLP on [x, t]. Small, smooth, with time dependence."""

    def __init__(self, dim: int = 6, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )

    def forward(self, t, x):
        flat = x.reshape(x.shape[0], -1)
        return self.net(torch.cat([flat, t[:, None].to(flat.dtype)], dim=1)).reshape(x.shape)


class ConvVelocity(nn.Module):
    """v(t, x) for images (B, C, H, W): two convolutions with a time shift."""

    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.temb = nn.Linear(1, hidden)

    def forward(self, t, x):
        h = self.c1(x) + self.temb(t[:, None].to(x.dtype))[:, :, None, None]
        return self.c2(torch.nn.functional.silu(h))


class BatchNormMLP(nn.Module):
    """BatchNorm in training mode (batch statistics; running statistics written every call) between
    two layers on [x, t] whose parameters all matter (so no gradient is ~0 by symmetry)."""

    def __init__(self, d=6, width=16):
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(d + 1, width), nn.BatchNorm1d(width), nn.Linear(width, d)

    def forward(self, t, x):
        return self.l2(self.bn(torch.tanh(self.l1(torch.cat([x, t[:, None].to(x.dtype)], 1)))))


class TwoLayer(nn.Module):
    """v(t, x) = b(drop(bn(tanh(a(x) + t)))) for x of shape (B, dim): small, smooth, time-dependent.
    dropout > 0 adds random draws to replay, batchnorm=True a BatchNorm1d that writes its running
    statistics on every call in training mode (both are no-ops by default)."""

    def __init__(self, dim=4, hidden=16, dropout=0.0, batchnorm=False):
        super().__init__()
        self.a, self.b = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.bn = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()

    def forward(self, t, x):
        return self.b(self.drop(self.bn(torch.tanh(self.a(x) + t[:, None].to(x.dtype)))))


def seeded_net():
    """TwoLayer(hidden=8) in float64, drawn from seed 0: the same network wherever a test makes one."""
    torch.manual_seed(0)
    return TwoLayer(hidden=8).double()


class Hooked(TwoLayer):
    """TwoLayer with dropout and BatchNorm that counts what plain backprop runs once per evaluation
    (module backward hooks, a tensor hook inside the forward) or once per backward (parameter tensor
    hooks, post-accumulate hooks); a.weight's hook also clamps its gradient."""

    def __init__(self):
        super().__init__(dropout=0.3, batchnorm=True)
        self.calls = dict(module_backward=0, module_backward_pre=0, inner=0, param=0, post_accumulate=0)
        self.a.register_full_backward_hook(lambda *a: self._count("module_backward"))
        self.b.register_full_backward_pre_hook(lambda *a: self._count("module_backward_pre"))
        self.a.weight.register_hook(lambda g: (self._count("param"), g.clamp(-0.05, 0.05))[1])
        self.b.weight.register_post_accumulate_grad_hook(lambda p: self._count("post_accumulate"))

    def _count(self, name):
        self.calls[name] += 1

    def forward(self, t, x):
        h = torch.tanh(self.a(x) + t[:, None])
        if h.requires_grad:
            h.register_hook(lambda g: (self._count("inner"), 2 * g)[1])
        return self.b(self.drop(self.bn(h)))


class FailsOnce(nn.Module):
    """Wraps a velocity and raises `error` (an allocation failure by default) on its `at`-th call
    with grad mode on (call 1 is the solve's first evaluation; later ones run with grad only while
    the forward keeps their graphs)."""

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
