"""The public surface: reverse / generate / odeint / time_reversed, torchdiffeq compatibility,
mixed precision, backends, and clear errors for bad input."""
import copy
import math

import pytest
import torch

import prg_fast
from prg_fast.ode import backends, ops, reference
from gradient_checks import THREE_WAYS, assert_grads_close, rel_err, seeded_net
from solve_nodes import adjoint_node


def test_reverse_matches_reference_on_every_backend(conv):
    model = conv(channels=3)
    x = torch.randn(2, 3, 5, 7)  # odd spatial sizes
    ref = reference.rk_solve(model, x, [k / 4 for k in range(5)], "rk4")[-1]
    for backend in ["reference"] + (["cpu"] if ops.HAS_OPS else []):
        out = prg_fast.reverse(model, x, steps=4, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input(mlp):
    model = mlp(dim=4).double()
    x = torch.randn(4, 6, dtype=torch.float64)[:, 1:5]  # a strided view
    assert not x.is_contiguous()
    out = prg_fast.reverse(model, x, steps=3)
    ref = prg_fast.reverse(model, x.contiguous(), steps=3, backend="reference")
    torch.testing.assert_close(out, ref)


def test_t0_and_segment(mlp):
    model = mlp(dim=3).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    seg = prg_fast.reverse(model, x, t=0.75, t0=0.25, steps=5, method="heun")
    ref = reference.rk_solve(model, x, [0.25 + 0.1 * k for k in range(6)], "heun")[-1]
    torch.testing.assert_close(seg, ref)


def test_generate_inverts_reverse():
    """On a linear ODE the fine-step RK4 round trip returns to the start."""
    a = torch.tensor([[0.0, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    f = lambda t, x: x @ a.T  # noqa: E731
    x = torch.randn(3, 2, dtype=torch.float64)
    z = prg_fast.reverse(f, x, steps=50)
    back = prg_fast.generate(f, z, steps=50)
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)


def test_time_reversed():
    v = lambda t, x: x * t[:, None]  # noqa: E731
    w = prg_fast.time_reversed(v)
    t = torch.tensor([0.2, 0.9])
    x = torch.randn(2, 3)
    torch.testing.assert_close(w(t, x), -v(1 - t, x))
    lin = torch.nn.Linear(3, 3)
    assert list(prg_fast.time_reversed(lambda t, x: lin(x)).parameters()) == []
    mod = prg_fast.time_reversed(torch.nn.Sequential(lin))
    assert len(list(mod.parameters())) == 2  # a Module's parameters stay visible to the adjoint
    with pytest.raises(TypeError, match="model must be callable"):
        prg_fast.time_reversed(3)


@pytest.mark.parametrize("ours,theirs", [("euler", "euler"), ("midpoint", "midpoint"), ("rk4_38", "rk4")])
def test_odeint_matches_torchdiffeq_fixed_grid(ours, theirs):
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq not installed (pip install torchdiffeq)")
    a = torch.randn(3, 3, dtype=torch.float64)
    f = lambda t, y: torch.tanh(y @ a) + torch.sin(t)  # noqa: E731
    y0 = torch.randn(4, 3, dtype=torch.float64)
    grid = torch.tensor([0.0, 0.3, 0.4, 1.0, 1.7], dtype=torch.float64)
    ys = prg_fast.odeint(f, y0, grid, method=ours)
    ref = torchdiffeq.odeint(f, y0, grid, method=theirs)
    assert ys.shape == ref.shape == (5, 4, 3)
    torch.testing.assert_close(ys, ref, rtol=1e-12, atol=1e-12)


def test_odeint_decreasing_grid_and_unbatched_state():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)  # no batch dimension: odeint allows it
    ys = prg_fast.odeint(f, y0, torch.linspace(1.0, 0.0, 101, dtype=torch.float64), method="rk4")
    torch.testing.assert_close(ys[-1], y0 * math.e, rtol=1e-8, atol=1e-8)


def test_mixed_precision_bf16_network_keeps_float32_state(mlp):
    """bf16 network, float32 state: error against the float32 solve within twice the error of
    the same solve done by PyTorch entirely in bf16 (flash-attention rule)."""
    model32 = mlp(dim=8, hidden=64)
    model16 = mlp(dim=8, hidden=64).to(torch.bfloat16)
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    x = torch.randn(16, 8)
    truth = prg_fast.reverse(model32.double(), x.double(), steps=8)
    ours = prg_fast.reverse(model16, x, steps=8)  # float32 state, bf16 network
    assert ours.dtype == torch.float32
    naive = reference.rk_solve(model16, x.to(torch.bfloat16), [k / 8 for k in range(9)], "rk4")[-1]
    err_ours = (ours.double() - truth).abs().max().item()
    err_naive = (naive.double() - truth).abs().max().item()
    assert err_ours <= 2 * err_naive, (err_ours, err_naive)

    xg = x.clone().requires_grad_(True)
    out = prg_fast.reverse(model16, xg, steps=4)
    out.square().sum().backward()
    assert xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()
    assert all(p.grad.dtype == torch.bfloat16 for p in model16.parameters())
    # the adjoint's float32 accumulation tracks the float64 gradient
    xd = x.double().requires_grad_(True)
    prg_fast.reverse(model32, xd, steps=4).square().sum().backward()
    rel = ((xg.grad.double() - xd.grad).norm() / xd.grad.norm()).item()
    assert rel < 5e-2


def test_bf16_input_returns_bf16(mlp):
    model = mlp(dim=4)
    x = torch.randn(3, 4).to(torch.bfloat16)
    out = prg_fast.reverse(lambda t, y: model(t, y.float()).to(y.dtype), x, steps=2)
    assert out.dtype == torch.bfloat16


def test_backend_auto_and_reasons():
    name, _ = backends.resolve("auto", torch.device("cpu"))
    assert name == ("cpu" if ops.HAS_OPS else "reference")
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: .*(CUDA|cuda)"):
        backends.resolve("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("fast", torch.device("cpu"))
    text = prg_fast.info(print_out=False)
    assert "cpu ops" in text and "cuda ops" in text and "triton" in text


def test_check_finite_names_step_and_time():
    f = lambda t, x: torch.where(t[:, None] > 0.45, torch.full_like(x, float("nan")), x)  # noqa: E731
    x = torch.randn(2, 3)
    out = prg_fast.reverse(f, x, steps=10, method="euler")  # off by default: NaN propagates
    assert torch.isnan(out).all()
    with pytest.raises(FloatingPointError, match=r"step 6 of 10, from t=0\.5 to t=0\.6"):
        prg_fast.reverse(f, x, steps=10, method="euler", check_finite=True)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(steps=0), ValueError, "steps must be an integer >= 1"),
        (dict(steps=2.5), ValueError, "steps must be an integer >= 1"),
        (dict(method="dopri5"), ValueError, "is adaptive: reverse and generate step a fixed grid"),
        (dict(method="dopri7"), ValueError, "method must be one of"),
        (dict(t=0.0), ValueError, "t must be > t0"),
        (dict(t=float("nan")), ValueError, "t must be a finite number"),
        (dict(t=0.5, save_at=[0.75]), ValueError, r"save_at times must lie in \[t0, t\]"),
        (dict(save_at=[]), ValueError, "save_at must hold at least one time"),
        (dict(save_at=0.5), TypeError, "save_at must be a sequence"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
        (dict(adjoint="yes"), TypeError, "adjoint must be True or False"),
    ],
)
def test_bad_arguments(mlp, kwargs, exc, match):
    model = mlp(dim=3)
    with pytest.raises(exc, match=match):
        prg_fast.reverse(model, torch.randn(2, 3), **kwargs)


UNIT = r"expected a time in \[0, 1\] \(0 = data, 1 = noise\)"


@pytest.mark.parametrize(
    "call,kwargs,named,got",
    [
        ("reverse", dict(t=1.5), "t", "1.5"),
        ("reverse", dict(t0=-0.25), "t0", "-0.25"),
        ("reverse", dict(save_at=[0.5, 1.25]), "save_at", "1.25"),
        ("reverse", dict(save_at=torch.tensor([-0.5, 0.5])), "save_at", "-0.5"),
        ("reverse", dict(t=torch.tensor(1.5, requires_grad=True)), "t", "1.5"),
        ("reverse", dict(t=torch.tensor([0.5, 2.0])), "t", "2"),  # per sample: the sample outside
        ("generate", dict(t=1.5), "t", "1.5"),
        ("generate", dict(t_end=-0.5), "t_end", "-0.5"),
        ("generate", dict(t_end=torch.tensor([0.0, -1.0])), "t_end", "-1"),
    ],
)
def test_reverse_and_generate_read_the_unit_interval_only(call, kwargs, named, got):
    """t = 0 is data and t = 1 noise: a time past either end was integrated silently before."""
    f = lambda t, x: -x  # noqa: E731
    with pytest.raises(ValueError, match=f"^{named}: {UNIT}, got {got}$"):
        getattr(prg_fast, call)(f, torch.randn(2, 3), steps=2, **kwargs)


def test_unit_interval_message_is_the_command_lines():
    import argparse

    from prg_fast.cli.args import unit_time

    with pytest.raises(argparse.ArgumentTypeError) as cli:
        unit_time("1.5")
    with pytest.raises(ValueError) as api:
        prg_fast.reverse(lambda t, x: -x, torch.randn(2, 3), t=1.5, steps=2)
    assert str(api.value) == "t: " + str(cli.value)


def test_odeint_takes_any_grid():
    """odeint is not held to reverse's unit interval: on [0, 1.5, 3] euler takes one step per
    interval, with the interval's width and its start time (the recurrence written out), and rk4 on
    a grid over [-2, 3], increasing or decreasing, follows the analytic solution of y' = t - y to
    its order (global error below h^4: this problem's constant is below 1)."""
    f = lambda t, y: t - y  # noqa: E731
    out = prg_fast.odeint(f, torch.ones(2, 3, dtype=torch.float64), torch.tensor([0.0, 1.5, 3.0], dtype=torch.float64),
                          method="euler")
    # y1 = 1 + 1.5 (0 - 1) = -0.5; y2 = -0.5 + 1.5 (1.5 + 0.5) = 2.5
    want = torch.tensor([1.0, -0.5, 2.5], dtype=torch.float64)[:, None, None].expand(3, 2, 3)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-15)
    t = torch.linspace(-2, 3, 101, dtype=torch.float64)
    y0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    exact = t[:, None, None] - 1 + (y0 + 3) * torch.exp(-(t[:, None, None] + 2))  # y(-2) = y0
    h = 5 / 100
    assert (prg_fast.odeint(f, y0, t, method="rk4") - exact).abs().max() < h**4
    assert (prg_fast.odeint(f, exact[-1], t.flip(0), method="rk4") - exact.flip(0)).abs().max() < h**4


def test_meta_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="x is on the meta device"):
        prg_fast.reverse(lambda t, x: -x, torch.empty(2, 3, device="meta"), steps=2)
    with pytest.raises(ValueError, match="z is on the meta device"):
        prg_fast.generate(lambda t, x: -x, torch.empty(2, 3, device="meta"), steps=2)


def test_info_prints_or_returns(capsys):
    assert prg_fast.info() is None
    printed = capsys.readouterr().out
    assert "cpu ops" in printed and printed.count("cpu ops") == 1
    text = prg_fast.info(print_out=False)
    assert capsys.readouterr().out == "" and text.strip() == printed.strip()


def test_bad_x_and_model():
    f = lambda t, x: x  # noqa: E731
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        prg_fast.reverse(f, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="x must be non-empty"):
        prg_fast.reverse(f, torch.empty(0, 3))
    with pytest.raises(TypeError, match="x must be float32"):
        prg_fast.reverse(f, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="model must be callable"):
        prg_fast.reverse("model", torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"model output must be a tensor shaped and typed like its input x \(\(2, 3\)"):
        prg_fast.reverse(lambda t, x: x[:, :2], torch.randn(2, 3))
    with pytest.raises(ValueError, match="model output must be a tensor shaped and typed"):
        prg_fast.reverse(lambda t, x: x.double(), torch.randn(2, 3))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        prg_fast.generate(f, None)


def test_bad_odeint_grid():
    f = lambda t, y: y  # noqa: E731
    y0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="t must be a 1-D tensor"):
        prg_fast.odeint(f, y0, torch.zeros(2, 2, 2), method="rk4")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        prg_fast.odeint(f, y0, torch.tensor([0.0, 0.5, 0.2]), method="rk4")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        prg_fast.odeint(f, y0, torch.tensor([0.0, 0.0, 1.0]), method="rk4")
    with pytest.raises(TypeError, match="t must be a floating-point tensor"):
        prg_fast.odeint(f, y0, torch.tensor([0, 1]), method="rk4")
    with pytest.raises(TypeError, match="t must be a 1-D tensor of times"):
        prg_fast.odeint(f, y0, 1.0, method="rk4")


def test_plain_backprop_through_bf16_network(mlp):
    """A bfloat16 network on a float32 x: the state stays float32 (the output carries bits that no
    bfloat16 has), and x's gradient, by plain backprop and by the adjoint, is float32 and the float64
    network's (the same rounded weights) to within one bfloat16 rounding, 2^-8 relative."""
    model = mlp(dim=4).to(torch.bfloat16)
    x = torch.randn(3, 4, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(prg_fast.reverse(copy.deepcopy(model).double(), x64, steps=3, adjoint=False).sum(),
                                  [x64])
    for adjoint in (False, True):
        out = prg_fast.reverse(model, x, steps=3, adjoint=adjoint)
        assert out.dtype == torch.float32 and not torch.equal(out, out.bfloat16().float()), adjoint
        (g,) = torch.autograd.grad(out.sum(), [x])
        assert g.dtype == torch.float32
        assert rel_err(g, want) < 2.0**-8, (adjoint, rel_err(g, want))


@pytest.mark.slow
def test_imports_and_works_without_the_compiled_part():
    """xformers-style: with prg_fast._C unimportable the package still imports, says why, and
    falls back to the reference backend."""
    import subprocess
    import sys

    code = r"""
import sys, torch
sys.modules["prg_fast._C"] = None  # makes `from . import _C` raise ImportError
import prg_fast
from prg_fast.ode import backends
text = prg_fast.info(print_out=False)
assert "cpu ops    no: compiled extension prg_fast._C not importable" in text, text
assert backends.resolve("auto", torch.device("cpu"))[0] == "reference"
try:
    prg_fast.reverse(lambda t, x: -x, torch.ones(2, 3), steps=2, backend="cpu")
except RuntimeError as e:
    assert "backend='cpu' is unavailable: compiled extension" in str(e), e
else:
    raise AssertionError("backend='cpu' should be refused")
out = prg_fast.reverse(lambda t, x: -x, torch.ones(2, 3), steps=50)
assert abs(out[0, 0].item() - 0.36787944) < 1e-6
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inference_mode(mlp, backend):
    """Feature extraction under torch.inference_mode (whose tensors have no version counter)
    gives what no_grad gives: reverse, generate, odeint, save_at, per-sample times."""
    if backend == "cpu" and not ops.HAS_OPS:
        pytest.skip("the compiled CPU backend is not built here")
    model = mlp(dim=8)
    x = torch.randn(4, 8)
    calls = [
        lambda: prg_fast.reverse(model, x, steps=3, backend=backend),
        lambda: prg_fast.reverse(model, x, steps=3, backend=backend, save_at=[0.5, 1.0]),
        lambda: prg_fast.reverse(model, x, t=torch.linspace(0.5, 1.0, 4), steps=3, backend=backend),
        lambda: prg_fast.generate(model, x, steps=3, backend=backend),
        lambda: prg_fast.odeint(lambda t, y: -y, x, torch.linspace(0, 1, 4), method="rk4", backend=backend),
    ]
    for call in calls:
        with torch.no_grad():
            want = call()
        with torch.inference_mode():
            got = call()
        assert got.is_inference()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vmap_over_a_solve_and_over_an_ensemble():
    """torch.func.vmap over reverse without the adjoint (inputs, per-sample times) and over a
    stacked ensemble of velocities (torch.func.stack_module_state + functional_call) equals a loop."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double() for _ in range(3)]
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    t = torch.linspace(0.5, 1.0, 5, dtype=torch.float64)

    def solve(net, xx, **kw):
        return prg_fast.reverse(lambda s, y: net(y) * s[:, None], xx, steps=3, adjoint=False, **kw)

    with torch.no_grad():
        for kw in ({}, {"t": t}):
            got = torch.func.vmap(lambda xx: solve(nets[0], xx, **kw))(x)
            want = torch.stack([solve(nets[0], xx, **kw) for xx in x])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        params, buffers = torch.func.stack_module_state(nets)
        base = copy.deepcopy(nets[0]).to("meta")

        def member(p, b, xx):
            return solve(lambda y: torch.func.functional_call(base, (p, b), (y,)), xx)

        got = torch.func.vmap(member, in_dims=(0, 0, None))(params, buffers, x[0])
        want = torch.stack([solve(net, x[0]) for net in nets])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_forward_mode_and_functorch_derivatives_are_right(backend):
    """torch.func.jvp / jacfwd / jacrev and torch.autograd.forward_ad through a solve without the
    adjoint. PyTorch gives the compiled operator no forward-mode rule (its tangent came out zero:
    jacfwd off by O(1)), so under a transform the reference arithmetic runs; the oracle is
    torch.autograd.functional.jacobian through plain backprop."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()

    def solve(x):
        return prg_fast.reverse(lambda t, y: net(y) * (1 + t[:, None]), x, steps=3, method="rk4", adjoint=False,
                                backend=backend)

    x = torch.randn(2, 4, dtype=torch.float64)
    v = torch.randn(2, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(solve, x)  # (2, 4, 2, 4), reverse mode
    want = torch.einsum("ijkl,kl->ij", J, v)
    with torch.no_grad():
        _, tangent = torch.func.jvp(solve, (x,), (v,))
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(solve)(x), J, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(solve)(x), J, rtol=1e-10, atol=1e-12)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = solve(fwAD.make_dual(x, v))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("call, name", [
    (lambda f, x: prg_fast.reverse(f, x, steps=2, memory_buget=0), "reverse() got unexpected keyword arguments \\['memory_buget'\\]"),
    (lambda f, x: prg_fast.generate(f, x, steps=2, batch_time=False), "generate() got unexpected keyword arguments \\['batch_time'\\]"),
    (lambda f, x: prg_fast.odeint(f, x, torch.linspace(0, 1, 3), method="rk4", perturb=True), "odeint() got unexpected keyword arguments \\['perturb'\\]"),
])
def test_solve_options_are_checked_by_name(call, name):
    """The solve options travel as **options to describe(), which holds their names and defaults;
    a misspelt or engine-internal one is refused naming the entry point, as Python would."""
    with pytest.raises(TypeError, match=name.replace("(", "\\(").replace(")", "\\)")):
        call(lambda t, x: -x, torch.randn(2, 3))


def test_solve_options_reach_the_description():
    from prg_fast.ode.description import describe

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = prg_fast.reverse(lambda t, x: -x, x, steps=2, memory_budget=0, store="steps", check_finite=True)
    node = adjoint_node(out)
    assert node.evals.store == "steps" and node.evals.kept_count == 0
    assert describe().strategy.memory_budget == "auto"  # the default of every entry point's memory_budget


def test_inference_mode_x_three_ways():
    """An x made under inference mode: the per-evaluation adjoint and backprop save it, torch's
    error; the plain path reads a copy of it, and its gradients are backprop's from a normal copy."""
    net = seeded_net()
    with torch.inference_mode():
        x0 = torch.randn(5, 4, dtype=torch.float64)
    for way in THREE_WAYS[1:]:
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            prg_fast.reverse(net, x0, steps=2, method="rk4", **way).sum().backward()
    got, want = [torch.autograd.grad(prg_fast.reverse(net, x, steps=2, method="rk4", **way).sum(), list(net.parameters()))
                 for x, way in ((x0, THREE_WAYS[0]), (x0.clone(), THREE_WAYS[2]))]
    assert_grads_close(got, want)


@pytest.mark.parametrize("mode", ["torch.no_grad()", "torch.inference_mode()"])
def test_imports_under_any_grad_mode(mode):
    """A user's lazy import inside a no-grad function: the package reads what it needs from autograd
    at import (graph_walk's node type) whatever grad mode it runs under, and works after it."""
    import subprocess
    import sys

    code = f"""
import torch
with {mode}:
    import prg_fast
x = torch.ones(2, 3, requires_grad=True)
prg_fast.reverse(lambda t, x: -x, x, steps=2, memory_budget=0).sum().backward()
assert x.grad is not None
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
