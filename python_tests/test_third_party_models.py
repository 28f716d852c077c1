"""Networks prg_fast did not write, as their users call them (issue 19): tiny diffusers models,
peft LoRA/DoRA, torchdyn vector fields and HNN, torchcfm's MLP and UNet, and torch's own toolbox
(MultiheadAttention, GRU, parametrizations, tied / frozen weights, functional_call). Each is solved
with the adjoint under euler and rk4 x {default ("auto"), memory_budget=0, memory_budget=inf,
store="steps", reversible=True} and compared with plain backprop through the same solver
(adjoint=False; for reversible=True through the same reversible scheme), in float64: x's gradient
and every tensor's that requires grad.

The libraries are not dependencies (setup.py's `thirdparty` extra installs them): a case whose
library is missing is skipped with the import error as its reason. The diffusers and torchcfm UNet
cases take seconds each and are marked slow."""
import functools
import math

import pytest
import torch
import torch.nn as nn

import prg_fast

D = torch.float64
INF = float("inf")
STRATEGIES = {
    "default": {},  # "auto": every graph kept at these sizes
    "budget_0": dict(memory_budget=0),
    "budget_inf": dict(memory_budget=INF),
    "steps": dict(store="steps", memory_budget=0),
    "reversible": dict(reversible=True),
}
METHODS = ["euler", "rk4"]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _library(name):
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install prg_fast[thirdparty])")


def _randomize(module, scale=0.05):
    """Zero-initialised output layers (diffusers, adaLN-Zero, LoRA's B) would make most gradients
    zero and the comparison vacuous: every parameter gets a random shift."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


class Case:
    """velocity(t, x), the input x, the tensors whose gradients are compared, and the dtype."""

    def __init__(self, velocity, x, tensors, dtype=D, steps=2):
        self.velocity, self.x, self.tensors, self.dtype, self.steps = velocity, x, tensors, dtype, steps


def _x(*shape, dtype=D):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(5))


def _params(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


# ---- diffusers --------------------------------------------------------------------------------


def diffusers_unet2d():
    diffusers = _library("diffusers")
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=8)
    net = _randomize(net.to(D))
    return Case(lambda t, x: net(x, t * 999).sample, _x(2, 2, 8, 8), _params(net))


def diffusers_dit():
    diffusers = _library("diffusers")
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=2,
                                          num_layers=1, sample_size=4, patch_size=2, norm_num_groups=2,
                                          num_embeds_ada_norm=10)
    net = _randomize(net.to(D))
    labels = torch.tensor([1, 3])
    return Case(lambda t, x: net(x, timestep=t * 999, class_labels=labels).sample, _x(2, 2, 4, 4), _params(net))


def diffusers_unet2d_condition():
    diffusers = _library("diffusers")
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                         layers_per_block=1, cross_attention_dim=6, norm_num_groups=4,
                                         attention_head_dim=4,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    net = _randomize(net.to(D))
    # the text encoder's output, closed over: a leaf the velocity reads, whose gradient is wanted too
    context = _x(2, 3, 6).requires_grad_(True)
    tensors = {**_params(net), "encoder_hidden_states": context}
    return Case(lambda t, x: net(x, t * 999, encoder_hidden_states=context).sample, _x(2, 2, 8, 8), tensors)


# ---- peft ---------------------------------------------------------------------------------------


class TimeMLP(nn.Module):
    def __init__(self, dim=4, hidden=8):
        super().__init__()
        self.inp = nn.Linear(dim + 1, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, t, x):
        return self.out(torch.tanh(self.inp(torch.cat([x, t[:, None].to(x.dtype)], 1))))


class TimeConv(nn.Module):
    def __init__(self, channels=2, hidden=4):
        super().__init__()
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, t, x):
        return self.c2(torch.tanh(self.c1(x) + t[:, None, None, None]))


def _peft(base, targets, dora):
    peft = _library("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=dora)
    net = peft.get_peft_model(base.to(D), config)
    _randomize(net)  # LoRA's B starts at zero
    return net


def peft_lora_mlp():
    net = _peft(TimeMLP(), ["inp", "out"], dora=False)
    return Case(lambda t, x: net(t, x), _x(3, 4), _params(net))


def peft_dora_mlp():
    net = _peft(TimeMLP(), ["inp", "out"], dora=True)
    return Case(lambda t, x: net(t, x), _x(3, 4), _params(net))


def peft_lora_conv():
    net = _peft(TimeConv(), ["c1", "c2"], dora=False)
    return Case(lambda t, x: net(t, x), _x(2, 2, 5, 5), _params(net))


# ---- torchdyn -----------------------------------------------------------------------------------


def torchdyn_neural_ode_field():
    _library("torchdyn")
    from torchdyn.core import NeuralODE
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 4)).to(D)
    f = NeuralODE(field, solver="euler").vf  # torchdyn's wrapped vector field (DEFunc): f(t, x)
    return Case(f, _x(3, 4), _params(f))


def torchdyn_hnn():
    _library("torchdyn")
    from torchdyn.models import HNN
    torch.manual_seed(0)
    hnn = HNN(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(D))  # dx/dt from grad H
    return Case(lambda t, x: hnn(x), _x(3, 4), _params(hnn))


# ---- torchcfm -----------------------------------------------------------------------------------


def torchcfm_mlp():
    _library("torchcfm")
    from torchcfm.models import MLP
    torch.manual_seed(0)
    net = MLP(dim=3, w=8, time_varying=True).to(D)
    return Case(lambda t, x: net(torch.cat([x, t[:, None]], 1)), _x(3, 3), _params(net))


def torchcfm_unet():
    _library("torchcfm")
    from torchcfm.models.unet.unet import UNetModelWrapper
    torch.manual_seed(0)
    net = UNetModelWrapper(dim=(2, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                           attention_resolutions="4", num_heads=2, num_head_channels=16, dropout=0.0)
    net = _randomize(net)
    # its time embedding and GroupNorm run in float32 whatever the weights: the network runs in
    # float32, as its users run it (compared on all gradients together, see test below)
    return Case(prg_fast.time_reversed(net), _x(2, 2, 8, 8, dtype=torch.float32), _params(net),
                dtype=torch.float32)


# ---- torch's own toolbox --------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, t, x):  # x (B, L, 4)
        y, _ = self.attn(x, x, x, need_weights=False)
        return torch.tanh(y) * t[:, None, None]


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 3, batch_first=True)

    def forward(self, t, x):  # x (B, L, 3)
        y, _ = self.gru(x)
        return y + t[:, None, None]


def torch_multihead_attention():
    torch.manual_seed(0)
    net = _randomize(Attention().to(D))
    return Case(net, _x(2, 3, 4), _params(net))


def torch_gru():
    torch.manual_seed(0)
    net = _randomize(Recurrent().to(D))
    return Case(net, _x(2, 3, 3), _params(net))


def _parametrized(wrap):
    torch.manual_seed(0)
    net = TimeMLP().to(D)
    net.inp = wrap(net.inp)
    net.out = wrap(net.out)
    return Case(net, _x(3, 4), _params(net))


def torch_weight_norm():
    return _parametrized(nn.utils.parametrizations.weight_norm)


def torch_orthogonal():
    return _parametrized(lambda m: nn.utils.parametrizations.orthogonal(m))


class Tied(nn.Module):
    """An autoencoder-style velocity whose decoder reuses the encoder's weight (tied weights)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 6)
        self.dec = nn.Linear(6, 4)
        self.dec.weight = nn.Parameter(self.enc.weight.t())  # replaced by the tie below
        del self.dec.weight

    def forward(self, t, x):
        h = torch.tanh(self.enc(x) + t[:, None])
        return nn.functional.linear(h, self.enc.weight.t(), self.dec.bias)


def torch_tied_weights():
    torch.manual_seed(0)
    net = Tied().to(D)
    return Case(net, _x(3, 4), _params(net))


def torch_frozen_weights():
    torch.manual_seed(0)
    net = TimeMLP().to(D)
    net.inp.weight.requires_grad_(False)
    return Case(net, _x(3, 4), _params(net))


def torch_functional_call():
    torch.manual_seed(0)
    net = TimeMLP().to(D)
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    velocity = functools.partial(torch.func.functional_call, net, weights)
    return Case(lambda t, x: velocity((t, x)), _x(3, 4), dict(weights))


CASES = {
    "diffusers_unet2d": pytest.param(diffusers_unet2d, marks=pytest.mark.slow),
    "diffusers_dit": pytest.param(diffusers_dit, marks=pytest.mark.slow),
    "diffusers_unet2d_condition": pytest.param(diffusers_unet2d_condition, marks=pytest.mark.slow),
    "peft_lora_mlp": peft_lora_mlp,
    "peft_dora_mlp": peft_dora_mlp,
    "peft_lora_conv": peft_lora_conv,
    "torchdyn_neural_ode_field": torchdyn_neural_ode_field,
    "torchdyn_hnn": torchdyn_hnn,
    "torchcfm_mlp": torchcfm_mlp,
    "torchcfm_unet": pytest.param(torchcfm_unet, marks=pytest.mark.slow),
    "torch_multihead_attention": torch_multihead_attention,
    "torch_gru": torch_gru,
    "torch_weight_norm": torch_weight_norm,
    "torch_orthogonal": torch_orthogonal,
    "torch_tied_weights": torch_tied_weights,
    "torch_frozen_weights": torch_frozen_weights,
    "torch_functional_call": torch_functional_call,
}


def gradients(case, method, adjoint, **kw):
    x = case.x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    out = prg_fast.reverse(case.velocity, x, steps=case.steps, method=method, adjoint=adjoint, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    names = ["x", *case.tensors]
    return dict(zip(names, torch.autograd.grad((out * w).sum(), [x, *case.tensors.values()], allow_unused=True)))


def worst_error(got, want):
    """(name, relative error) of the worst tensor; a gradient present on one side only is inf. A
    gradient that is zero by symmetry (an attention key's bias: softmax ignores it) comes out as
    rounding noise in both runs, whose ratio says nothing: each error is relative to the tensor's
    own gradient norm, but at least 1e-6 of the largest one's."""
    largest = max((b.norm().item() for b in want.values() if b is not None), default=0.0)
    worst = ("", 0.0)
    for name in want:
        a, b = got[name], want[name]
        if a is None and b is None:
            continue
        if a is None or b is None:
            return name, math.inf
        denom = max(b.norm().item(), 1e-6 * largest)
        err = (a - b).norm().item() / denom if denom > 0 else (0.0 if a.norm().item() == 0 else math.inf)
        if not err <= worst[1]:
            worst = (name, err)
    return worst


def all_together(got, want):
    """Relative L2 error of all gradients as one vector."""
    pairs = [(got[n], want[n]) for n in want if want[n] is not None and got[n] is not None]
    a = torch.cat([g.flatten() for g, _ in pairs])
    b = torch.cat([w.flatten() for _, w in pairs])
    return ((a - b).norm() / b.norm()).item()


def compare(build, method, strategy):
    """((worst tensor, its error), error of all gradients together, dtype)"""
    case = build()
    kw = STRATEGIES[strategy]
    got = gradients(case, method, True, **kw)
    want = gradients(case, method, False, reversible=kw.get("reversible", False))
    return worst_error(got, want), all_together(got, want), case.dtype


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", list(CASES.values()), ids=list(CASES))
def test_adjoint_equals_plain_backprop(build, method, strategy):
    (name, err), together, dtype = compare(build, method, strategy)
    if dtype == torch.float64:
        assert err < RTOL[dtype], f"worst gradient {name!r}: relative error {err:.3g}"
    else:
        # float32: two summation orders of the same arithmetic; a tensor whose gradient nearly
        # cancels (a time-embedding projection followed by GroupNorm) has a relative error far
        # above rounding in both runs alike, so all gradients are judged together
        assert name == "" or math.isfinite(err), f"gradient {name!r} present on one side only"
        assert together < RTOL[dtype], f"all gradients together: relative error {together:.3g}"
