"""The exact discrete adjoint equals plain backprop through the same solver, for x and for every
parameter, on every method and backend; float64 gradcheck; memory kept for backward is flat in K.
The default, the per-evaluation adjoint and backprop agree on the shapes of a solve: mixed dtypes,
save_at with t0, per-sample times, generate, odeint with tuple states, autocast."""
import copy

import pytest
import torch
import torch.utils.checkpoint  # (torch < 2.6 does not import it with torch)

import prg_fast
from prg_fast.ode import ops, reference
from prg_fast.ode.solvers import SOLVERS
from gradient_checks import THREE_WAYS, TwoLayer, assert_grads_close, cotangent, grads, rel_err, seeded_net, three_ways
from solve_nodes import adjoint_node

BACKENDS = ["reference"] + (["cpu"] if ops.HAS_OPS else [])
METHODS = sorted(SOLVERS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_adjoint_equals_backprop(mlp, method, backend, dtype, tol):
    model = mlp(dim=5).to(dtype)
    x = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=6, method=method, backend=backend)
    out_adj = prg_fast.reverse(model, x, adjoint=True, **kw)
    out_bp = prg_fast.reverse(model, x, adjoint=False, **kw)
    torch.testing.assert_close(out_adj, out_bp, rtol=0, atol=0)
    for a, b in zip(grads(out_adj, inputs), grads(out_bp, inputs)):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("method", METHODS)
def test_adjoint_equals_textbook_backprop(mlp, method):
    """Also against prg_fast.ode.reference.rk_solve, an independent plain-autograd loop."""
    model = mlp(dim=3).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(model, x, steps=5, method=method)
    ref = reference.rk_solve(model, x, [k / 5 for k in range(6)], method)[-1]
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    inputs = [x] + list(model.parameters())
    for a, b in zip(grads(out, inputs), grads(ref, inputs)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_save_at_gradients_from_every_output(mlp, method, backend):
    model = mlp(dim=4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    save_at = [0.25, 1.0, 0.0, 0.6, 0.25]  # off-grid, repeated, and both ends
    kw = dict(t=1.0, steps=4, method=method, backend=backend, save_at=save_at)
    out_adj = prg_fast.reverse(model, x, **kw)
    out_bp = prg_fast.reverse(model, x, adjoint=False, **kw)
    assert out_adj.shape == (5, 3, 4)
    torch.testing.assert_close(out_adj, out_bp, rtol=0, atol=0)
    torch.testing.assert_close(out_adj[2], x.detach())  # t0 itself is the input
    torch.testing.assert_close(out_adj[0], out_adj[4])
    inputs = [x] + list(model.parameters())
    for a, b in zip(grads(out_adj, inputs), grads(out_bp, inputs)):
        assert rel_err(a, b) < 1e-10


def test_save_at_states_are_exact_solver_states(mlp):
    """A saved time off the uniform grid is a grid point of the solve, not an interpolation."""
    model = mlp(dim=2).double()
    x = torch.randn(2, 2, dtype=torch.float64)
    out = prg_fast.reverse(model, x, steps=2, method="euler", save_at=[0.3, 1.0])
    grid = [0.0, 0.3, 0.5, 1.0]
    ref = reference.rk_solve(model, x, grid, "euler")
    torch.testing.assert_close(out[0], ref[1])
    torch.testing.assert_close(out[1], ref[3])


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_float64(method):
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def run(x, w):
        f = lambda t, y: torch.tanh(y @ w) * (1 + t[:, None])  # noqa: E731
        return prg_fast.reverse(f, x, steps=3, method=method, adjoint_params=[w])

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, w))


def test_generate_and_odeint_adjoint(mlp):
    model = mlp(dim=3).double()
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    inputs = [z] + list(model.parameters())
    a = prg_fast.generate(model, z, steps=4)
    b = prg_fast.generate(model, z, steps=4, adjoint=False)
    for ga, gb in zip(grads(a, inputs), grads(b, inputs)):
        assert rel_err(ga, gb) < 1e-10
    grid = torch.tensor([0.0, 0.1, 0.5, 0.55, 1.2], dtype=torch.float64)
    f = lambda t, y: model(t.expand(y.shape[0]), y)  # noqa: E731  (odeint passes a 0-dim t)
    a = prg_fast.odeint(f, z, grid, method="rk4", adjoint_params=list(model.parameters()))
    b = prg_fast.odeint(f, z, grid, method="rk4", adjoint=False)
    assert a.shape == (5, 2, 3)
    for ga, gb in zip(grads(a, inputs), grads(b, inputs)):
        assert rel_err(ga, gb) < 1e-10


def test_dropout_is_replayed_exactly(mlp):
    """In train mode the backward recomputes each evaluation with the random state it had."""
    model = mlp(dim=4, hidden=64, dropout=0.5).double().train()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    torch.manual_seed(5)
    a = prg_fast.reverse(model, x, steps=3)
    ga = grads(a, inputs)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = prg_fast.reverse(model, x, steps=3, adjoint=False)
    gb = grads(b, inputs)
    after_b = torch.rand(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(after_a, after_b)  # the backward does not disturb the caller's RNG
    for u, v in zip(ga, gb):
        assert rel_err(u, v) < 1e-12


def test_closed_over_leaves_get_their_gradient():
    # Issue 9 changed this from an error to automatic discovery: with or without adjoint_params.
    w = torch.randn(3, 3, requires_grad=True)
    f = lambda t, y: y @ w  # noqa: E731
    x = torch.randn(2, 3, requires_grad=True)
    (gw_ref,) = torch.autograd.grad(prg_fast.reverse(f, x, steps=2, adjoint=False).sum(), [w])
    for kw in ({}, {"adjoint_params": [w]}):
        (gw,) = torch.autograd.grad(prg_fast.reverse(f, x, steps=2, **kw).sum(), [w])
        torch.testing.assert_close(gw, gw_ref)


def test_no_grad_and_frozen_inputs(mlp):
    model = mlp(dim=3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        out = prg_fast.reverse(model, x, steps=2)
    assert not out.requires_grad
    for p in model.parameters():
        p.requires_grad_(False)
    assert not prg_fast.reverse(model, x, steps=2).requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_bytes_kept_for_backward_are_k_times_s_states(mlp, method):
    model = mlp(dim=6)
    x = torch.randn(8, 6, requires_grad=True)
    stages = SOLVERS[method].stages
    for steps in (1, 4, 16):
        # recompute everything ("auto" keeps every graph here: then nothing is stored, see
        # test_auto_budget.py::test_a_tail_stores_no_stage_inputs)
        out = prg_fast.reverse(model, x, steps=steps, method=method, memory_budget=0)
        kept = adjoint_node(out).saved_tensors
        assert len(kept) == steps * stages
        assert sum(t.numel() * t.element_size() for t in kept) == steps * stages * x.numel() * 4
        assert all(t.grad_fn is None for t in kept)  # no graph is kept alive through them
        out.sum().backward()
        with pytest.raises(RuntimeError, match="freed"):
            adjoint_node(out).saved_tensors  # freed by the backward


@pytest.mark.slow
def test_peak_memory_flat_in_steps_subprocess():
    """Peak RSS of a forward+backward in a fresh process: the adjoint grows only by its K*s
    stored states, plain backprop by K*s network activations. glibc is told to return freed
    memory at once (mmap for large blocks, no trim threshold, one arena), so RSS follows live
    memory; K starts at 8 because the first few evaluations allocate one-off library scratch.
    memory_budget="auto" under a forced free memory of 16 activations keeps 7 graphs whatever K."""
    import os
    import json
    import subprocess
    import sys

    code = r"""
import json, sys, torch, prg_fast
def status(field):  # kB
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
torch.set_num_threads(1)
kw, steps = json.loads(sys.argv[1]), int(sys.argv[2])
class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 8192); self.b = torch.nn.Linear(8192, 256)
    def forward(self, t, x):
        return self.b(torch.tanh(self.a(x)))
m = Wide(); x = torch.randn(64, 256, requires_grad=True)
# reset the high-water mark to the current RSS (ru_maxrss would start at the parent's peak)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
prg_fast.reverse(m, x, steps=steps, method="euler", **kw).sum().backward()
print(json.dumps((status("VmHWM") - base) * 1024))
"""

    state = 64 * 256 * 4
    act = 64 * 8192 * 4

    def peak(kw, steps, free=None):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
        if free is not None:
            env["PRG_FAST_FREE_MEMORY_BYTES"] = str(free)
        res = subprocess.run([sys.executable, "-c", code, json.dumps(kw), str(steps)],
                             capture_output=True, text=True, check=True, env=env)
        return json.loads(res.stdout.strip().splitlines()[-1])

    adj_growth = peak(dict(memory_budget=0), 32) - peak(dict(memory_budget=0), 8)
    bp_growth = peak(dict(adjoint=False), 32) - peak(dict(adjoint=False), 8)
    assert bp_growth > 20 * act  # the measurement sees plain backprop's activations
    assert adj_growth < 1.5 * 24 * state + act  # the adjoint keeps only the stage inputs
    # "auto" under 16 activations free: a budget of 8, so 7 graphs kept (one graph: tanh's output and
    # the output) at K = 8 and at K = 32 alike -- growth only by the stored states again
    auto_growth = peak({}, 32, free=16 * act) - peak({}, 8, free=16 * act)
    assert auto_growth < 1.5 * 24 * state + act


def test_backward_recomputes_under_the_forwards_autocast(mlp):
    """Like torch.utils.checkpoint: an evaluation recomputed in the backward sees the autocast
    state it had in the forward, so a bf16-autocast network is differentiated as it ran."""
    seen = []
    inner = mlp(dim=4)

    def f(t, x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return inner(t, x).to(x.dtype)

    x = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prg_fast.reverse(f, x, steps=2, method="heun", adjoint_params=list(inner.parameters()),
                               memory_budget=0)  # every evaluation recomputed
    n_forward = len(seen)
    out.sum().backward()  # outside the autocast block, as in a usual training loop
    assert n_forward >= 4 and len(seen) > n_forward
    assert all(seen), seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = prg_fast.reverse(f, x, steps=2, method="heun", adjoint=False)
    (g_ref,) = torch.autograd.grad(ref.sum(), [x])
    assert rel_err(x.grad, g_ref) < 2e-2  # same bf16 evaluations, float32 vs bf16 cotangent sums


# ---------------------------------------------------------------------------------------------
# Issue 9: models that used to break the adjoint (aliased gradients, outputs without a graph,
# autocast). Each is compared with plain backprop through the same solver in float64.


class _AliasingVelocity(torch.nn.Module):
    """Velocities whose parameters receive the very tensor autograd returns for x (an x-shaped
    additive parameter) or for each other (two summed output offsets), or that have no graph."""

    def __init__(self, kind: str, dim: int = 5, batch: int = 3):
        super().__init__()
        self.kind = kind
        self.lin = torch.nn.Linear(dim, dim).double()
        self.pos = torch.nn.Parameter(torch.randn(batch, dim, dtype=torch.float64))
        self.w1 = torch.nn.Parameter(torch.randn(batch, dim, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(torch.randn(batch, dim, dtype=torch.float64))

    def forward(self, t, x):
        if self.kind == "positional":
            return torch.tanh(self.lin(x + self.pos))
        if self.kind == "offsets":
            return torch.tanh(x) + self.w1 + self.w2
        if self.kind == "zero":
            return torch.zeros_like(x)
        return torch.sin(t)[:, None].expand_as(x).clone()  # a function of t only


def _grads_through(model, x, adjoint, method, **kw):
    z = prg_fast.reverse(model, x, steps=3, method=method, adjoint=adjoint, **kw)
    weights = torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)
    inputs = [x] + list(model.parameters())
    grads = torch.autograd.grad((z * weights).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs)]


@pytest.mark.parametrize("kind", ["positional", "offsets", "zero", "t_only"])
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_adjoint_exact_for_aliasing_and_graphless_velocities(kind, method):
    model = _AliasingVelocity(kind)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    adj = _grads_through(model, x, True, method)
    ref = _grads_through(model, x, False, method)
    for a, r in zip(adj, ref):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-12), (kind, method, (a - r).abs().max().item())


@pytest.mark.parametrize("adjoint", [True, False])
def test_autocast_around_reverse(adjoint):
    """Users write torch.autocast, not model_dtype=: the network runs in bf16, the state stays
    float32, the output has x's dtype, and the adjoint's gradients are within twice PyTorch's own
    bf16 error of plain backprop (the flash-attention rule)."""
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(7, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6))

        def forward(self, t, x):
            return self.body(torch.cat([x, t[:, None].to(x.dtype)], dim=1))

    net = Net()
    x = torch.randn(4, 6)

    def solve_grads(model, xx, adj, autocast):
        xx = xx.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = prg_fast.reverse(model, xx, steps=4, method="rk4", adjoint=adj)
        assert z.dtype == xx.dtype
        inputs = [xx] + list(model.parameters())
        return torch.autograd.grad(z.square().sum(), inputs)

    ref = solve_grads(copy.deepcopy(net).double(), x.double(), False, False)
    plain_bf16 = solve_grads(net, x, False, True)
    ours = solve_grads(net, x, adjoint, True)
    for o, p, r in zip(ours, plain_bf16, ref):
        torch_err = (p.double() - r).abs().max().item()
        our_err = (o.double() - r).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


def _closure_cases():
    """(name, velocity, leaves it reads) for velocities whose differentiable tensors are not all
    parameters of the callable handed to the solver."""
    torch.manual_seed(2)
    A = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    return [
        ("plain closure", lambda t, x: torch.tanh(x @ A + b), [A, b], None),
        ("partial adjoint_params", lambda t, x: torch.tanh(x @ A + b), [A, b], [A]),
        ("time_reversed(lambda)", prg_fast.time_reversed(lambda t, x: net(x) * t[:, None]), list(net.parameters()), None),
        ("closure over a module", lambda t, x: net(x), list(net.parameters()), None),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_adjoint_discovers_what_the_velocity_reads(case, method):
    name, func, leaves, adjoint_params = _closure_cases()[case]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def solve_grads(adjoint):
        z = prg_fast.reverse(func, x, steps=3, method=method, adjoint=adjoint, adjoint_params=adjoint_params)
        return torch.autograd.grad(z.sin().sum(), [x] + leaves)

    for a, r in zip(solve_grads(True), solve_grads(False)):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-12), name


def test_odeint_closure_over_module_with_default_adjoint():
    net = torch.nn.Linear(3, 3).double()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ys = prg_fast.odeint(lambda t, y: torch.tanh(net(y)), y0, t, method="rk4")
    g_adj = torch.autograd.grad(ys.square().sum(), list(net.parameters()))
    ys = prg_fast.odeint(lambda t, y: torch.tanh(net(y)), y0, t, method="rk4", adjoint=False)
    g_ref = torch.autograd.grad(ys.square().sum(), list(net.parameters()))
    for a, r in zip(g_adj, g_ref):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-12)


def test_non_leaf_closure_is_a_clear_error():
    A = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    W = A * 2  # made outside the velocity: its graph cannot be re-entered once per evaluation
    with pytest.raises(ValueError, match="adjoint_params"):
        prg_fast.reverse(lambda t, x: torch.tanh(x @ W), x, steps=2)

    def grad_wrt_A(adjoint):  # passing W as adjoint_params makes the adjoint exact
        W = A * 2
        z = prg_fast.reverse(lambda t, x: torch.tanh(x @ W), x, steps=2, adjoint=adjoint,
                             adjoint_params=[W] if adjoint else None)
        return torch.autograd.grad(z.sum(), A)[0]

    assert torch.allclose(grad_wrt_A(True), grad_wrt_A(False), rtol=1e-9)


class _ComputedWeights(torch.nn.Module):
    """Reads W, a tensor computed outside the velocity from the module's own parameters (A.t(), or
    a context from its own encoder), and optionally A itself."""

    def __init__(self, make, direct):
        super().__init__()
        torch.manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
        self.enc = torch.nn.Linear(4, 4).double()
        self.make, self.direct = make, direct

    def refresh(self):
        self.W = self.A.t() if self.make == "transpose" else self.enc(self.A)

    def forward(self, t, x):
        out = torch.tanh(x @ self.W)
        return out + 0.1 * torch.tanh(x @ self.A) if self.direct else out


@pytest.mark.parametrize("make", ["transpose", "linear_context"])
def test_computed_input_from_the_models_own_parameters(make):
    """adjoint_params=[W] with W computed from the model's parameters: the parameters W is made of
    get their gradient through W's graph once (as in plain backprop), not also through the solve's
    VJP (which would double it); if the velocity also reads them directly, it is refused."""
    x = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        net = _ComputedWeights(make, direct=False)
        net.refresh()
        z = prg_fast.reverse(net, x, steps=2, adjoint=adjoint, adjoint_params=[net.W] if adjoint else None)
        grads.append(torch.autograd.grad(z.sum(), list(net.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    net = _ComputedWeights(make, direct=True)
    net.refresh()
    with pytest.raises(ValueError, match="counted twice"):
        prg_fast.reverse(net, x, steps=2, adjoint_params=[net.W])
    net = _ComputedWeights(make, direct=False)
    net.refresh()
    with pytest.raises(ValueError, match="counted twice"):  # both passed explicitly
        prg_fast.reverse(lambda t, y: net(t, y), x, steps=2, adjoint_params=[net.W, net.A])


def test_maml_fast_weights_through_functional_call():
    """fast = p - lr * grad (create_graph) read through torch.func.functional_call: the model's own
    parameters are reached by the search but read only through the fast weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        params = dict(net.named_parameters())
        inner = sum((p ** 2).sum() for p in params.values())
        g = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {k: p - 0.1 * gi for (k, p), gi in zip(params.items(), g)}
        z = prg_fast.reverse(lambda t, y: torch.func.functional_call(net, fast, (y,)), x, steps=3, adjoint=adjoint,
                             adjoint_params=list(fast.values()) if adjoint else None)
        grads.append(torch.autograd.grad(z.sum(), list(net.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adjoint", [True, False])
def test_in_place_input_modification_is_an_error(adjoint):
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, t, x):
            x.mul_(0.5)
            return self.lin(x)

    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="in place"):
        prg_fast.reverse(InPlace(), x * 1, steps=2, adjoint=adjoint).sum().backward()


@pytest.mark.parametrize("kw", [dict(adjoint=False), dict(), dict(memory_budget=float("inf")), dict(store="steps"),
                                dict(reversible=True)], ids=["backprop", "recompute", "keep_all", "steps", "reversible"])
def test_parameters_changed_between_forward_and_backward_are_an_error(kw):
    """optimizer.step() before backward: plain backprop raises (its saved tensors' versions moved);
    the adjoints, which rerun the network from its current parameters, would otherwise return the
    gradient of a different network without a word."""
    net = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    out = prg_fast.reverse(lambda t, x: torch.tanh(net(x)), x, steps=2, **kw)
    with torch.no_grad():
        net.weight.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _late_reader(W):
    """Reads W (computed outside, requiring grad) only after t = 0.4: the first evaluation does not."""
    def velocity(t, y):
        return torch.tanh(y) * (W if float(t.reshape(-1)[0]) > 0.4 else 1.0)
    return velocity


@pytest.mark.parametrize("kw", [dict(memory_budget=0), dict(memory_budget=0, store="steps"), dict(reversible=True)])
def test_a_computed_tensor_read_only_after_the_first_evaluation_is_an_error_not_a_missing_gradient(kw):
    """Discovery sees what the first evaluation reads; a computed tensor the velocity reads later was
    not an input of the solve, and its gradient was silently None under the rerunning adjoints.
    Their VJPs watch what the velocity holds: a clear error naming the fix."""
    A = torch.randn(4, dtype=torch.float64, requires_grad=True)
    W = 2 * A
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(_late_reader(W), x, steps=4, method="rk4", **kw)
    with pytest.raises(RuntimeError, match="computed outside it .* in an evaluation after its first"):
        out.sum().backward()


@pytest.mark.parametrize("kw", [dict(memory_budget=0, adjoint_params=None), dict()])
def test_a_computed_tensor_read_later_is_exact_as_adjoint_params_or_when_every_graph_is_kept(kw):
    grads = []
    for adjoint in (True, False):
        A = torch.ones(4, dtype=torch.float64, requires_grad=True)
        W = 2 * A
        x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
        extra = dict(kw, adjoint_params=[W]) if "adjoint_params" in kw else dict(kw)
        out = prg_fast.reverse(_late_reader(W), x, steps=4, method="rk4", **(extra if adjoint else dict(adjoint=False)))
        grads.append(torch.autograd.grad(out.sum(), A)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_a_stale_computed_tensor_the_velocity_holds_but_never_reads_is_fine():
    """A module keeping a tensor with a freed graph (last step's loss, say) that it does not read:
    the watch finds no gradient for it, nothing is refused."""
    class Keeps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4).double()
            self.last_loss = None

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    net = Keeps()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = prg_fast.reverse(net, x, steps=2).square().sum()
    loss.backward()  # frees its graph
    net.last_loss = loss
    grads = [torch.autograd.grad(prg_fast.reverse(net, x, steps=3, **kw).sum(), [x, net.lin.weight])
             for kw in (dict(memory_budget=0), dict(adjoint=False))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- the default (the plain path here), the per-evaluation adjoint and backprop agree: dtypes, save_at,
# per-sample times, generate, odeint, tuple states, a model returning its input, autocast --------


def test_float64_x_float32_model():
    torch.manual_seed(0)
    net = TwoLayer(hidden=8)
    x0 = torch.randn(5, 4, dtype=torch.float64)

    def case(**kw):
        x = x0.clone().requires_grad_(True)
        return prg_fast.reverse(net, x, steps=2, method="rk4", **kw), [x] + list(net.parameters())

    # float32 network arithmetic, summed in a different order by the adjoint's VJPs
    three_ways(case, tol=1e-5)


@pytest.mark.parametrize("save_at", [[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]])
def test_save_at_with_t0(save_at):
    net = seeded_net()

    def case(**kw):
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        return prg_fast.reverse(net, x, steps=4, save_at=save_at, **kw), [x] + list(net.parameters())

    three_ways(case)


def test_per_sample_times_and_generate_and_odeint():
    net = seeded_net()

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
        return prg_fast.odeint(lambda s, v: net(s.expand(5), v), y, t, method="rk4", **kw), [y] + list(net.parameters())

    for case in (per_sample, gen, ode):
        three_ways(case)


def test_tuple_state_in_odeint():
    net = seeded_net()

    def case(**kw):
        a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

        def f(s, y):
            return net(s.expand(5), y[0]), (y[0] ** 2).sum(1) * y[1]

        ya, yb = prg_fast.odeint(f, (a, b), t, method="rk4", **kw)
        return torch.cat([ya.flatten(), yb.flatten()]), [a, b] + list(net.parameters())

    grads = []
    for way in THREE_WAYS:
        torch.manual_seed(0)
        out, inputs = case(**way)
        grads.append(torch.autograd.grad(out, inputs, cotangent(out)))
    assert_grads_close(grads[0], grads[2])
    assert_grads_close(grads[1], grads[2])


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
    three_ways(case, exact=False)


def test_autocast_cpu_bfloat16():
    net = seeded_net().float()

    grads = []
    for way in THREE_WAYS:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prg_fast.reverse(net, x, steps=2, **way)
        grads.append(torch.autograd.grad(out, [x] + list(net.parameters()), cotangent(out)))
    # the plain path is backprop's bf16 arithmetic, op for op: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[2]))
    assert_grads_close(grads[1], grads[2], tol=1e-2)  # the adjoint rounds its cotangents its own way, within bf16's error


def test_gradcheck_tiny_default_solve():
    net = TwoLayer(2, 3).double()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: prg_fast.reverse(net, x, steps=2, method="rk4"),
                                    (x, *net.parameters()))
