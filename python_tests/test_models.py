"""prg_fast.models.UNet: presets (parameter counts of the published configurations), the
model(t, x) contract, attention through SDPA matching the explicit formula, bad inputs."""
import math

import pytest
import torch

import prg_fast
from prg_fast.models import UNet, timestep_embedding
from prg_fast.models.unet import AttentionBlock

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _count(name, **kw):
    with torch.device("meta"):  # no memory, no initialisation: counting 50M parameters is instant
        model = UNet.preset(name, **kw)
    return model, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("cifar", 35.7e6), ("prg32", 52.5e6)])
def test_big_preset_parameter_counts(name, expected):
    _, n = _count(name, in_channels=3, image_size=32)
    assert abs(n - expected) / expected < 0.02, n


def test_cifar_preset_is_torchcfm_exactly():
    # torchcfm's CIFAR-10 UNet (128 ch, (1,2,2,2), 2 blocks, attention 16x16, 64-channel heads)
    model, n = _count("cifar", in_channels=3, image_size=32)
    assert n == 35_746_307
    sd = model.state_dict()
    # guided-diffusion parameter names, so torchcfm / PRG state dicts load
    for key in ["time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.4.1.qkv.weight", "middle_block.1.proj_out.weight", "output_blocks.11.0.skip_connection.weight",
                "out.2.weight"]:
        assert key in sd, key
    assert model.input_blocks[4][1].num_heads == 4  # 256 channels / 64 per head at 16x16
    assert model.config["dropout"] == 0.1


def test_prg32_preset_structure():
    model, _ = _count("prg32", in_channels=3, image_size=32)
    res = model.input_blocks[1][0]
    assert res.use_scale_shift_norm and res.emb_layers[1].out_features == 2 * 128
    n_attn = sum(isinstance(m, AttentionBlock) for m in model.modules())
    # 16x16 and 8x8: 3 encoder + 4 decoder blocks at each, plus the middle block
    assert n_attn == 2 * (3 + 4) + 1
    assert all(m.num_heads == 4 for m in model.modules() if isinstance(m, AttentionBlock))


def test_tiny_preset_is_small_and_runs_on_digits_shape():
    model = UNet.preset("tiny", in_channels=1, image_size=8)
    n = sum(p.numel() for p in model.parameters())
    assert n < 1_000_000
    t, x = torch.rand(5), torch.randn(5, 1, 8, 8)
    out = model(t, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer: v = 0 at init
    out.sum().backward()
    assert model.out[2].weight.grad is not None


def test_forward_nonzero_after_perturbation_and_time_dependence():
    torch.manual_seed(0)
    model = UNet.preset("tiny", in_channels=3, image_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 16, 16)
    a, b = model(torch.tensor([0.1, 0.1]), x), model(torch.tensor([0.9, 0.9]), x)
    assert a.abs().sum() > 0 and not torch.allclose(a, b)
    # a 0-dim t (as torchdiffeq-style odeint passes it) broadcasts over the batch
    torch.testing.assert_close(model(torch.tensor(0.1), x), a)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * k / 4) for k in range(4)]
    for i, ti in enumerate(t.tolist()):
        expect = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        torch.testing.assert_close(emb[i], torch.tensor(expect))
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_sdpa_attention_matches_legacy_formula():
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4, norm_groups=32)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 4, 4)
    out = block(x)
    # guided-diffusion's QKVAttentionLegacy, written out
    b, c = 2, 64
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    q, k, v = qkv.reshape(b * 4, 3 * c // 4, 16).split(c // 4, dim=1)
    scale = 1 / math.sqrt(math.sqrt(c // 4))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, 16)
    expect = (x.reshape(b, c, -1) + block.proj_out(h)).reshape_as(x)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_config_rebuilds_the_same_architecture():
    model = UNet.preset("tiny", in_channels=1, image_size=8, dropout=0.1)
    clone = UNet(**model.config)
    assert clone.config == model.config and clone.config["preset"] == "tiny" and clone.config["dropout"] == 0.1
    clone.load_state_dict(model.state_dict())  # same keys and shapes


def test_unet_is_a_velocity_net_for_the_ode_engine():
    model = UNet.preset("tiny", in_channels=1, image_size=8)
    z = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        x = prg_fast.generate(model, z, steps=2)
    torch.testing.assert_close(x, z)  # v = 0 at initialisation
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    prg_fast.reverse(model, x, steps=2).sum().backward()
    assert x.grad is not None


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'.*cifar"):
        UNet.preset("huge")
    with pytest.raises(ValueError, match="image_size must be divisible"):
        UNet.preset("cifar", image_size=28)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(in_channels=1, image_size=8, model_channels=32, channel_mult=(1, 2), attention_resolutions=(16,))
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        UNet(in_channels=0)
    model = UNet.preset("tiny", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        model(torch.rand(2), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        model(torch.rand(3), torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.rand(2), torch.randn(2, 1, 7, 7))


def test_patch_size_is_a_unet_on_stacked_patches():
    # patch_size p: the network is the UNet of the (p*p*C, H/p, W/p) patch stack, its output put back
    torch.manual_seed(0)
    model = UNet.preset("mnist28", in_channels=1, image_size=28)
    assert model.config["patch_size"] == 2 and "patch_size" not in UNet.preset("tiny", in_channels=1, image_size=8).config
    inner = UNet(**{**model.config, "in_channels": 4, "out_channels": 4, "image_size": 14, "patch_size": 1})
    for p in model.parameters():  # the zero-initialised output conv too, so the comparison means something
        torch.nn.init.normal_(p, std=0.1)
    inner.load_state_dict(model.state_dict())
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    want = torch.nn.functional.pixel_shuffle(inner(t, torch.nn.functional.pixel_unshuffle(x, 2)), 2)
    torch.testing.assert_close(model(t, x), want, rtol=0, atol=0)
    assert UNet(**model.config).config == model.config  # checkpoints rebuild it
    with pytest.raises(ValueError, match="divisible by patch_size"):
        UNet(in_channels=1, image_size=27, patch_size=2, channel_mult=(1,), norm_groups=8, model_channels=16)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(t, torch.randn(3, 1, 26, 26))
