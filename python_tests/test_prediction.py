"""Diffusion-parametrised networks on the project's paths (`prg-fast pretrain --prediction epsilon|v`):
the conversion to the velocity is exact on the path, the weighted velocity loss is the prediction's own
mean squared error, and pretrain -> finetune -> evaluate runs end to end on an epsilon UNet."""
import pytest
import torch

from prg_fast.losses import flow_matching_loss, prediction_weighting, velocity_coefficients
from prg_fast.models import UNet
from prg_fast.paths import GVP, ICFM

pytestmark = pytest.mark.usefixtures("one_thread")


def draws(seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 1, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(batch, 1, 4, 4, generator=g, dtype=torch.float64)
    t = 0.01 + 0.98 * torch.rand(batch, generator=g, dtype=torch.float64)
    return x0, x1, t


@pytest.mark.parametrize("path", [GVP(), ICFM()], ids=["gvp", "icfm"])
def test_each_prediction_gives_the_paths_velocity(path):
    x0, x1, t = draws()
    x_t, u_t = path.sample(x0, x1, t)
    a, b, _, _ = path.coefficients(t.reshape(-1, 1, 1, 1))
    targets = {"velocity": u_t, "epsilon": x1, "v": a * x1 - b * x0}
    for prediction, target in targets.items():
        A, C = velocity_coefficients(path, prediction, t)
        u = A.reshape(-1, 1, 1, 1) * x_t + C.reshape(-1, 1, 1, 1) * target
        torch.testing.assert_close(u, u_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_weighted_velocity_loss_is_the_predictions_own_loss(prediction):
    path = GVP()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16)).double()

    def raw(t, x):
        return net(x).reshape(x.shape) * (1 + t.reshape(-1, 1, 1, 1))

    def velocity(t, x):
        A, C = velocity_coefficients(path, prediction, t)
        return A.reshape(-1, 1, 1, 1) * x + C.reshape(-1, 1, 1, 1) * raw(t, x)

    x0 = draws()[0]
    loss = flow_matching_loss(velocity, x0, path, weighting=prediction_weighting(path, prediction),
                              generator=torch.Generator().manual_seed(3))
    # the same draws as flow_matching_loss makes: t ~ U(eps, 1), then the noise
    g = torch.Generator().manual_seed(3)
    t = 1e-5 + (1 - 1e-5) * torch.rand(x0.shape[0], generator=g, dtype=x0.dtype)
    x1 = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    x_t, _ = path.sample(x0, x1, t)
    a, b, _, _ = path.coefficients(t.reshape(-1, 1, 1, 1))
    target = x1 if prediction == "epsilon" else a * x1 - b * x0
    # flow_matching_loss accumulates in float32: u and A x + C out are rounded to float32 before their
    # difference is taken, an error of ~1e-7 |u| against a difference of size |u| here
    torch.testing.assert_close(loss.double(), (raw(t, x_t) - target).pow(2).mean(), rtol=1e-5, atol=0)


def test_unet_prediction_is_in_its_config_and_refused_without_a_path():
    net = UNet.preset("tiny", in_channels=1, image_size=8, prediction="epsilon", prediction_path="gvp")
    assert UNet(**net.config).prediction == "epsilon"
    assert "prediction" not in UNet.preset("tiny", in_channels=1, image_size=8).config  # old configs unchanged
    with pytest.raises(ValueError, match="prediction_path"):
        UNet.preset("tiny", in_channels=1, image_size=8, prediction="v")
    with pytest.raises(ValueError, match="sigma"):
        prediction_weighting(ICFM(sigma=0.1), "epsilon")


@pytest.mark.slow
def test_pretrain_finetune_evaluate_on_an_epsilon_unet(tmp_path):
    from prg_fast.training.evaluate import evaluate
    from prg_fast.training.finetune import finetune
    from prg_fast.training.pretrain import PretrainConfig, build_model, load_checkpoint, pretrain

    pre = str(tmp_path / "pre")
    pretrain(PretrainConfig(data="digits", path="gvp", prediction="epsilon", model="tiny", batch_size=32, steps=3,
                            warmup=0, log_every=1, num_samples=4, sample_steps=2, progress=False, device="cpu", out=pre))
    flow = build_model(load_checkpoint(pre))
    assert flow.prediction == "epsilon" and flow.prediction_path == "gvp"
    out = str(tmp_path / "ft")
    finetune(checkpoint=pre, out=out, data="digits", steps=2, batch_size=32, ode_steps=2, method="euler",
             progress=False, log_every=1)
    metrics = evaluate(out, data="digits")
    assert 0.0 <= metrics["top1"] <= 1.0
