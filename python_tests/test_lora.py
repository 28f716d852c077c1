"""prg_fast.models.lora: the adapted network starts as the base one, only the adapters train, the
adapters can be switched off (the pretrained reference), and the merged weights load into the base
architecture and compute what the adapted network computes."""
import pytest
import torch
import torch.nn as nn

from conftest import ConvVelocity
from prg_fast.models import LoRA, UNet, add_lora, lora_disabled, merged_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRA):
                m.up.weight.normal_(0, 0.1)


@pytest.mark.parametrize("make, x_shape", [(lambda: ConvVelocity(2, 5), (3, 2, 6, 6)),
                                           (lambda: UNet.preset("tiny", in_channels=1, image_size=8), (2, 1, 8, 8))])
def test_lora_starts_at_the_base_merges_and_switches_off(make, x_shape):
    torch.manual_seed(0)
    base = make().eval()
    with torch.no_grad():  # a fresh UNet zero-initialises its output layer: give it weights
        for p in base.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    model = make().eval()
    model.load_state_dict(base.state_dict())
    names = add_lora(model, rank=3)
    assert names and all(isinstance(model.get_submodule(n), LoRA) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("down.weight", "up.weight")) for n in trainable)
    x, t = torch.randn(x_shape), torch.rand(x_shape[0])
    with torch.no_grad():
        want = base(t, x)
        assert torch.equal(model(t, x), want)  # a zero-initialised `up`: exactly the base network
        _perturb_adapters(model)
        adapted = model(t, x)
        assert not torch.allclose(adapted, want)
        with lora_disabled(model):
            assert torch.equal(model(t, x), want)
        assert torch.equal(model(t, x), adapted)  # back on after the block
        merged = make().eval()
        merged.load_state_dict(merged_state_dict(model))  # strict: the base architecture's keys
        assert torch.allclose(merged(t, x), adapted, atol=1e-5, rtol=1e-4)


def test_lora_layers_and_errors():
    lin = LoRA(nn.Linear(4, 3), rank=2, alpha=4.0)
    assert lin.scale == 2.0 and lin.merged_weight().shape == (3, 4)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRA(nn.Linear(4, 3), rank=0)
    with pytest.raises(TypeError, match="LoRA adapts Linear, Conv1d and Conv2d"):
        LoRA(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    with pytest.raises(ValueError, match="no Linear / Conv1d / Conv2d layer"):
        add_lora(nn.Sequential(nn.Tanh()))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    assert add_lora(grouped, 2) == ["1"]  # a grouped convolution stays as it is (frozen)
    with pytest.raises(RuntimeError, match="boom"), lora_disabled(grouped):
        assert not grouped[1].enabled
        raise RuntimeError("boom")
    assert grouped[1].enabled
