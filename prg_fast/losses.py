"""The flow-matching loss: regress v_theta(t, x_t) onto a path's target velocity u_t."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from .paths import Path, get_path

__all__ = ["flow_matching_loss", "PREDICTIONS", "velocity_coefficients", "prediction_weighting"]

# what a network trained on a path may predict: the velocity u_t itself, the noise x1 (epsilon), or
# v = a x1 - b x0 (Salimans & Ho's v for x_t = a x0 + b x1; on GVP it is u_t / (pi / 2))
PREDICTIONS = ("velocity", "epsilon", "v")
# where a(t) -> 0 (t = 1 on GVP and ICFM: no signal left) an epsilon prediction says nothing about x0;
# its velocity is taken with a clamped from below here (GVP: t > 0.99936 reads t = 0.99936)
MIN_SIGNAL = 1e-3


def velocity_coefficients(path: Union[Path, str], prediction: str, t: torch.Tensor):
    """(A, C), shaped like t, with which a network's `prediction` out at (t, x_t) gives the velocity
    u = A x_t + C out on `path`: the prediction's exact relation to u_t on the path's x_t = a x0 + b x1."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if prediction == "velocity":
        return torch.zeros_like(t), torch.ones_like(t)
    a, b, da, db = get_path(path).coefficients(t)
    if prediction == "epsilon":  # x0 = (x - b eps) / a
        a = a.clamp(min=MIN_SIGNAL)
        return da / a, db - da * b / a
    norm = a * a + b * b  # x0 = (a x - b v) / norm, x1 = (b x + a v) / norm
    return (da * a + db * b) / norm, (db * a - da * b) / norm


def prediction_weighting(path: Union[Path, str], prediction: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The flow_matching_loss weighting under which the velocity loss of a network whose output is
    converted by velocity_coefficients is its `prediction`'s own mean squared error:
    |A x + C out - u|^2 = C^2 |out - target|^2, so the weight is 1 / C^2 (None for "velocity")."""
    if prediction == "velocity":
        return None
    path = get_path(path)
    if getattr(path, "sigma", 0.0):
        raise ValueError(f"prediction={prediction!r} needs a path without extra noise (sigma = 0): x_t's extra noise "
                         "is neither data nor the noise the network predicts")
    return lambda t: velocity_coefficients(path, prediction, t)[1].pow(-2)


def flow_matching_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    path: Union[Path, str],
    *,
    weighting: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    eps: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Mean squared error between model(t, x_t) and u_t, a scalar.

    x0 is a data batch (B, ...). Inside: t ~ U(eps, 1) of shape (B,) and noise x1 ~ N(0, I) shaped
    like x0 (drawn from `generator` when given, else the global RNG); (x_t, u_t) = path.sample(x0,
    x1, t). `path` is a prg_fast.paths.Path or its name. `weighting`, when given, maps t (B,) to
    per-sample weights (B,); the loss is then mean_b w_b * mse_b. The error is accumulated in
    float32 even when the model runs under bf16 autocast.
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(t, x), got {type(model).__name__}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating torch.Tensor, got {getattr(x0, 'dtype', type(x0).__name__)}")
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0.0 <= eps < 1.0) or math.isnan(eps):
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    if weighting is not None and not callable(weighting):
        raise TypeError(f"weighting must be None or a callable t -> weights, got {type(weighting).__name__}")
    path = get_path(path)

    batch = x0.shape[0]
    t = eps + (1.0 - eps) * torch.rand(batch, device=x0.device, dtype=x0.dtype, generator=generator)
    x1 = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t, u_t = path.sample(x0, x1, t)
    v = model(t, x_t)
    if not isinstance(v, torch.Tensor) or v.shape != x_t.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"model(t, x) must return a tensor shaped like x {tuple(x_t.shape)}, got {got}")
    per_sample = (v.float() - u_t.float()).pow(2).reshape(batch, -1).mean(dim=1)
    if weighting is None:
        return per_sample.mean()
    w = weighting(t)
    if not isinstance(w, torch.Tensor) or w.shape != (batch,):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weighting(t) must return a tensor of shape (B,) = ({batch},), got {got}")
    return (w.float() * per_sample).mean()
