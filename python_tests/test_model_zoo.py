"""The adjoint is exact for real model shapes, not just for the UNet it was written against.

Every case is a velocity a user could bring (UNet presets, a DiT-style transformer, GroupNorm,
BatchNorm and spectral_norm in train mode (they write buffers as they run), a Fourier layer with
complex weights, dropout, channels_last, closures, wrappers, functions of t only, aliased additive parameters), and
each is run through every solver twice in float64: plain autograd through the solver
(adjoint=False) is the oracle, and the adjoint's gradients for x and for every tensor the velocity
reads that requires grad must equal it to 1e-9 relative error. Nothing passes adjoint_params unless
the case is about a partial adjoint_params list.
"""
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prg_fast
from prg_fast.models import UNet
from gradient_checks import BatchNormMLP, MLPVelocity

METHODS = sorted(prg_fast.SOLVERS)
RTOL = 1e-9


def _randomize(module: nn.Module, scale: float = 0.2) -> nn.Module:
    """Zero-initialised output layers (UNet, adaLN-Zero) would make most gradients exactly zero and
    the comparison vacuous; perturb every parameter so each one matters."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def worst_relative_error(got: dict, want: dict):
    """(name, error) of the worst gradient: ||got - want|| / ||want||; a gradient missing on one side
    (None or absent) while present on the other counts as infinite."""
    worst = ("", 0.0)
    for name in sorted(set(got) | set(want)):
        a, b = got.get(name), want.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return (name, math.inf)
        denom = b.norm().item()
        diff = (a - b).norm().item()
        err = diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
        if not err <= worst[1]:  # NaN also becomes the worst
            worst = (name, err)
    return worst


def assert_grads_close(got: dict, want: dict, rtol: float = RTOL, what: str = ""):
    name, err = worst_relative_error(got, want)
    assert err < rtol, f"{what}: worst gradient {name!r} has relative error {err:.3g} (limit {rtol:g})"


def adjoint_and_backprop_gradients(fn, x, tensors: dict, *, adjoint: bool, method: str, steps: int, seed: int = 0, **kw):
    """Output and gradients of a fixed random projection of reverse(fn, x) w.r.t. x and `tensors`."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = prg_fast.reverse(fn, x, steps=steps, method=method, adjoint=adjoint, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    names = ["x", *tensors]
    grads = torch.autograd.grad((out * w).sum(), [x, *tensors.values()], allow_unused=True)
    return out.detach(), dict(zip(names, grads))


def _named(module: nn.Module, prefix: str = "") -> dict:
    return {prefix + n: p for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# a small DiT-style transformer: patch embedding + learned positional embedding + adaLN-modulated
# attention blocks + unpatchify


def _t_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * 100.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero, as DiT initialises it
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        B, N, D = h.shape
        a = self.norm1(h) * (1 + scale1) + shift1
        q, k, v = self.qkv(a).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        h = h + gate1 * self.proj(a)
        m = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * self.mlp(m)


class TinyDiT(nn.Module):
    def __init__(self, channels=2, size=8, patch=2, dim=16, heads=2, depth=2):
        super().__init__()
        self.channels, self.size, self.patch, self.dim = channels, size, patch, dim
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, patch * patch * channels)

    def forward(self, t, x):
        B, p, g = x.shape[0], self.patch, self.size // self.patch
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_mlp(_t_embedding(t, self.dim))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        h = self.final(self.final_norm(h) * (1 + scale) + shift)
        h = h.view(B, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, self.channels, self.size, self.size)


class GroupNormNet(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.temb = nn.Linear(1, 8)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, t, x):
        h = self.norm(self.conv1(x)) + self.temb(t[:, None])[:, :, None, None]
        return self.conv2(F.silu(h))


class PositionalOffset(nn.Module):
    """tanh(lin(x + pos)): a parameter shaped like x added to the input (aliased cotangents)."""

    def __init__(self, d=5):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(2, d))
        self.lin = nn.Linear(d, d)

    def forward(self, t, x):
        return torch.tanh(self.lin(x + self.pos))


class SummedOffsets(nn.Module):
    """tanh(x) + w1 + w2: two parameters added to the output (aliased cotangents)."""

    def __init__(self, d=5):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2, d))
        self.w2 = nn.Parameter(torch.randn(2, d))

    def forward(self, t, x):
        return torch.tanh(x) + self.w1 + self.w2


def _apply(net, t, x):
    return net(t, x)


# Each case: () -> (velocity, x, {name: tensor requiring grad}, extra reverse() kwargs, steps)
def _unet_tiny():
    torch.manual_seed(0)
    net = _randomize(UNet.preset("tiny", in_channels=1, image_size=8).double())
    return net, torch.randn(2, 1, 8, 8, dtype=torch.float64), _named(net), {}, 2


def _unet_tiny_channels_last():
    net, x, params, kw, steps = _unet_tiny()
    return net, x.to(memory_format=torch.channels_last), params, kw, steps


def _dit():
    torch.manual_seed(0)
    net = _randomize(TinyDiT().double())
    return net, torch.randn(2, 2, 8, 8, dtype=torch.float64), _named(net), {}, 2


def _groupnorm():
    torch.manual_seed(0)
    net = _randomize(GroupNormNet().double())
    return net, torch.randn(2, 4, 6, 6, dtype=torch.float64), _named(net), {}, 2


def _dropout_train():
    torch.manual_seed(0)
    net = MLPVelocity(dim=6, dropout=0.3).double().train()
    return net, torch.randn(3, 6, dtype=torch.float64), _named(net), {}, 3


def _closure_tensors():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64).mul_(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    return (lambda t, x: torch.tanh(x @ A + b) * t[:, None]), torch.randn(3, 4, dtype=torch.float64), \
        {"A": A, "b": b}, {}, 3


def _closure_module():
    torch.manual_seed(0)
    net = GroupNormNet().double()
    _randomize(net)
    return (lambda t, x: net(t, x)), torch.randn(2, 4, 4, 4, dtype=torch.float64), _named(net), {}, 2


def _time_reversed_lambda():
    torch.manual_seed(0)
    net = _randomize(TinyDiT().double())
    return prg_fast.time_reversed(lambda t, x: net(t, x)), torch.randn(2, 2, 8, 8, dtype=torch.float64), \
        _named(net), {}, 2


def _partial():
    torch.manual_seed(0)
    net = _randomize(GroupNormNet().double())
    return functools.partial(_apply, net), torch.randn(2, 4, 4, 4, dtype=torch.float64), _named(net), {}, 2


def _t_only():
    return (lambda t, x: torch.cos(3 * t)[:, None].expand_as(x) * 1.0), torch.randn(3, 4, dtype=torch.float64), \
        {}, {}, 3


def _t_only_param():
    torch.manual_seed(0)
    w = torch.randn(4, dtype=torch.float64).requires_grad_()
    return (lambda t, x: torch.sin(2 * t)[:, None] * w), torch.randn(3, 4, dtype=torch.float64), {"w": w}, {}, 3


def _zero():
    return (lambda t, x: torch.zeros_like(x)), torch.randn(3, 4, dtype=torch.float64), {}, {}, 3


def _positional_offset():
    torch.manual_seed(0)
    net = PositionalOffset().double()
    return net, torch.randn(2, 5, dtype=torch.float64), _named(net), {}, 3


def _summed_offsets():
    torch.manual_seed(0)
    net = SummedOffsets().double()
    return net, torch.randn(2, 5, dtype=torch.float64), _named(net), {}, 3


def _batchnorm_train():
    torch.manual_seed(0)
    net = _randomize(BatchNormMLP().double()).train()
    return net, torch.randn(5, 6, dtype=torch.float64), _named(net), {}, 3


def _spectral_norm_train():
    """spectral_norm in train mode: a power iteration writes its vectors on every call, and the
    weight each evaluation uses depends on them (prg_fast/ode/module_state.py)."""
    torch.manual_seed(0)
    net = _randomize(BatchNormMLP().double())
    net.bn = nn.Identity()
    net.l1 = nn.utils.parametrizations.spectral_norm(net.l1)
    return net.train(), torch.randn(5, 6, dtype=torch.float64), _named(net), {}, 3


class SpectralConv(nn.Module):
    """A Fourier-neural-operator layer: real state, complex weights on the lowest modes (torch.fft)."""

    def __init__(self, channels=2, modes=3):
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(0.3 * torch.randn(channels, channels, modes, dtype=torch.complex128))
        self.skip = nn.Conv1d(channels, channels, 1).double()

    def forward(self, t, x):
        spec = torch.fft.rfft(x, dim=-1)
        out = torch.zeros_like(spec)
        out[..., : self.modes] = torch.einsum("bim,iom->bom", spec[..., : self.modes], self.weight)
        return torch.tanh(torch.fft.irfft(out, n=x.shape[-1], dim=-1) + self.skip(x)) * (1 + t[:, None, None])


def _spectral_conv():
    torch.manual_seed(0)
    net = SpectralConv()
    return net, torch.randn(2, 2, 8, dtype=torch.float64), _named(net), {}, 3


def _partial_adjoint_params():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64).mul_(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    # only A is named; b is read too and must still get its exact gradient
    return (lambda t, x: torch.tanh(x @ A + b)), torch.randn(3, 4, dtype=torch.float64), {"A": A, "b": b}, \
        {"adjoint_params": [A]}, 3


CASES = {
    "unet_tiny": _unet_tiny,
    "unet_tiny_channels_last": _unet_tiny_channels_last,
    "dit": _dit,
    "groupnorm": _groupnorm,
    "dropout_train": _dropout_train,
    "closure_over_tensors": _closure_tensors,
    "closure_over_module": _closure_module,
    "time_reversed_lambda": _time_reversed_lambda,
    "functools_partial": _partial,
    "function_of_t_only": _t_only,
    "function_of_t_and_param": _t_only_param,
    "zero_velocity": _zero,
    "x_shaped_additive_param": _positional_offset,
    "summed_output_offsets": _summed_offsets,
    "partial_adjoint_params": _partial_adjoint_params,
    "batchnorm_train": _batchnorm_train,
    "fno_complex_weights": _spectral_conv,
    "spectral_norm_train": _spectral_norm_train,
}


@pytest.mark.parametrize("budget", ["auto", 0])  # the default (every graph kept here), and recompute all
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_adjoint_equals_backprop(case, method, budget):
    # built afresh for each run: a velocity that writes buffers (batchnorm, spectral_norm) must start
    # both from the same state (the builders are seeded)
    fn, x, tensors, kw, steps = CASES[case]()
    out_ref, ref = adjoint_and_backprop_gradients(fn, x, tensors, adjoint=False, method=method, steps=steps, **kw)
    fn, x, tensors, kw, steps = CASES[case]()
    out_adj, adj = adjoint_and_backprop_gradients(fn, x, tensors, adjoint=True, method=method, steps=steps,
                                                  memory_budget=budget, **kw)
    # same forward (dropout masks replayed from the same seed)
    torch.testing.assert_close(out_adj, out_ref, rtol=1e-12, atol=1e-12)
    assert all(g is not None for g in ref.values()), "oracle lost a gradient: the test case is wrong"
    assert_grads_close(adj, ref, what=f"{case}/{method}")


def test_unet_tiny_16x16_rk4():
    torch.manual_seed(0)
    net = _randomize(UNet.preset("tiny", in_channels=3, image_size=16).double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _, ref = adjoint_and_backprop_gradients(net, x, _named(net), adjoint=False, method="rk4", steps=1)
    _, adj = adjoint_and_backprop_gradients(net, x, _named(net), adjoint=True, method="rk4", steps=1)
    assert_grads_close(adj, ref, what="unet tiny 16x16")


@pytest.mark.slow
def test_unet_cifar_preset_once():
    """The real CIFAR-10 architecture (35.7M parameters, dropout 0.1 in train mode) once, at 8x8, one
    euler step: the shapes that matter are its blocks, not the resolution. Attention sits at the
    second level, as at 16x16 for 32x32 images."""
    torch.manual_seed(0)
    net = UNet.preset("cifar", in_channels=3, image_size=8, attention_resolutions=(4,))
    net = _randomize(net.double().train(), scale=0.02)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    _, ref = adjoint_and_backprop_gradients(net, x, _named(net), adjoint=False, method="euler", steps=1)
    _, adj = adjoint_and_backprop_gradients(net, x, _named(net), adjoint=True, method="euler", steps=1)
    assert_grads_close(adj, ref, what="unet cifar")


def test_worst_relative_error_helper():
    a = {"x": torch.ones(3), "w": torch.ones(2)}
    assert worst_relative_error(a, {"x": torch.ones(3), "w": torch.ones(2)}) == ("", 0.0)
    name, err = worst_relative_error(a, {"x": torch.ones(3), "w": torch.tensor([1.0, 2.0])})
    assert name == "w" and err == pytest.approx(1 / math.sqrt(5))
    assert worst_relative_error({"x": torch.ones(3), "w": None}, a) == ("w", math.inf)


def test_network_modifying_its_input_in_place_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, t, x):
            x.mul_(0.5)  # corrupts the stage input the adjoint would store
            return torch.tanh(self.lin(x))

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises((RuntimeError, ValueError), match=r"in[- ]place"):
        prg_fast.reverse(InPlace().double(), x, steps=2, method="rk4", adjoint=True)


@pytest.mark.parametrize("adjoint", [True, False])
def test_autocast_runs_and_keeps_the_state_dtype(adjoint):
    """Under bfloat16 autocast the network computes in bfloat16, the solver state stays float32: the
    network is handed a float32 state at every evaluation, the output carries bits that no bfloat16
    has (a state rounded to bfloat16 anywhere on the way would not), and x's gradient is float32."""
    torch.manual_seed(0)
    net = MLPVelocity(dim=8, hidden=64)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[1].dtype))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prg_fast.reverse(net, x, steps=4, method="rk4", adjoint=adjoint)
    assert out.dtype == torch.float32 and not torch.equal(out, out.bfloat16().float())
    assert len(seen) >= 16 and set(seen) == {torch.float32}
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_autocast_adjoint_within_twice_pytorch_bf16_error():
    """Flash-attention rule: the adjoint under autocast may be at most twice as far from the float64
    truth as PyTorch's own autocast backprop through the same solve."""
    torch.manual_seed(0)
    net = MLPVelocity(dim=8, hidden=64)
    x = torch.randn(4, 8)
    net64 = MLPVelocity(dim=8, hidden=64).double()
    net64.load_state_dict(net.state_dict())
    _, ref64 = adjoint_and_backprop_gradients(net64, x.double(), _named(net64), adjoint=False, method="rk4", steps=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = adjoint_and_backprop_gradients(net, x, _named(net), adjoint=False, method="rk4", steps=4)
        _, adj = adjoint_and_backprop_gradients(net, x, _named(net), adjoint=True, method="rk4", steps=4)
    for name, r in ref64.items():
        assert adj[name] is not None, name
        err_adj = (adj[name].double() - r).abs().max().item()
        err_plain = (plain[name].double() - r).abs().max().item()
        atol = 1e-5 * r.abs().max().item()
        assert err_adj <= 2 * err_plain + atol, f"{name}: adjoint error {err_adj:.3g}, bf16 backprop {err_plain:.3g}"
