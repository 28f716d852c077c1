"""The flow-matching loss: regress v_theta(t, x_t) onto a path's target velocity u_t."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch

from .paths import Path, get_path

__all__ = ["flow_matching_loss"]


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
