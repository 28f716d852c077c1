"""ClassifierHead: the PRG head (pool to at most 16x16 -> LayerNorm -> Linear -> Tanh -> Linear, no bias)."""
import pytest
import torch

import prg_fast.models
from prg_fast.models import ClassifierHead

# tiny networks: one thread avoids OpenMP oversubscription on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def test_exported_from_models():
    assert prg_fast.models.ClassifierHead is ClassifierHead
    assert "ClassifierHead" in prg_fast.models.__all__


@pytest.mark.parametrize("in_shape, pooled, features", [
    ((1, 8, 8), (8, 8), 64),            # digits: nothing to pool
    ((3, 32, 32), (16, 16), 768),       # CIFAR: the release's 3x16x16 = 768
    ((3, 64, 64), (16, 16), 768),       # ImageNet-64
    ((2, 20, 12), (16, 12), 2 * 16 * 12),  # each side capped separately
    ((6, 32, 32), (16, 16), 6 * 256),   # two save_at states concatenated on channels
])
def test_shapes(in_shape, pooled, features):
    head = ClassifierHead(in_shape, 10)
    assert head.pooled_size == pooled
    assert head.num_features == features
    assert head.norm.normalized_shape == (features,)
    assert (head.fc.in_features, head.fc.out_features) == (features, features)  # hidden defaults to the input size
    assert (head.out.in_features, head.out.out_features) == (features, 10)
    x = torch.randn(5, *in_shape)
    assert head(x).shape == (5, 10)


def test_layers_in_order_and_last_has_no_bias():
    head = ClassifierHead((3, 32, 32), 7, hidden=33)
    kinds = [type(m) for m in head.children()]
    assert kinds == [torch.nn.AdaptiveAvgPool2d, torch.nn.LayerNorm, torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    assert head.out.bias is None
    assert head.fc.bias is not None
    assert (head.fc.out_features, head.out.in_features, head.out.out_features) == (33, 33, 7)


def test_forward_matches_manual_computation():
    torch.manual_seed(1)
    head = ClassifierHead((3, 32, 32), 4, hidden=12)
    x = torch.randn(2, 3, 32, 32)
    pooled = x.reshape(2, 3, 16, 2, 16, 2).mean(dim=(3, 5)).flatten(1)  # 2x2 average pooling
    h = torch.nn.functional.layer_norm(pooled, (768,), head.norm.weight, head.norm.bias)
    expected = torch.tanh(h @ head.fc.weight.T + head.fc.bias) @ head.out.weight.T
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter_and_input():
    head = ClassifierHead((1, 8, 8), 10)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    head(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_rebuilds_the_same_architecture():
    head = ClassifierHead((3, 32, 32), 10, hidden=64)
    cfg = dict(head.config)
    clone = ClassifierHead(cfg.pop("in_shape"), cfg.pop("num_classes"), **cfg)
    clone.load_state_dict(head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clone(x), head(x))


@pytest.mark.parametrize("in_shape", [(8, 8), (1, 0, 8), (1, 8, 8, 1), "1x8x8", (1.5, 8, 8)])
def test_bad_in_shape(in_shape):
    with pytest.raises(ValueError, match="in_shape"):
        ClassifierHead(in_shape, 10)


@pytest.mark.parametrize("num_classes", [0, 1, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierHead((1, 8, 8), num_classes)


def test_wrong_feature_shape_is_reported():
    head = ClassifierHead((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        head(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="ClassifierHead expects"):
        head(torch.randn(2, 64))
