"""Probability paths for flow-matching pretraining: GVP, ICFM and OTCFM.

The project's time convention, everywhere: t = 0 is data (x0), t = 1 is noise (x1 ~ N(0, I)).
Every path has `sample(x0, x1, t) -> (x_t, u_t)` where u_t = d x_t / d t is the regression target
of the velocity network v_theta(t, x_t).

    GVP:   x_t = cos(pi t/2) x0 + sin(pi t/2) x1,   u_t = (pi/2) (cos(pi t/2) x1 - sin(pi t/2) x0)
    ICFM:  x_t = (1 - t) x0 + t x1 + sigma * n,     u_t = x1 - x0
    OTCFM: ICFM after re-pairing the minibatch by an exact optimal assignment on squared
           Euclidean cost (a permutation of x1; every noise sample used exactly once).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Tuple, Type

import numpy as np
import torch

__all__ = ["Path", "GVP", "ICFM", "OTCFM", "ot_cost_matrix", "ot_permutation", "get_path", "PATHS"]


def _time(t, x0: torch.Tensor) -> torch.Tensor:
    """t as a (B, 1, ..., 1) tensor in x0's dtype that broadcasts against x0. Accepts a number,
    a 0-dim tensor, or a (B,) tensor."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        t = torch.tensor(float(t))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a number or a tensor of shape (B,), got {type(t).__name__}")
    batch = x0.shape[0]
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape (B,) = ({batch},) to match x0, got {tuple(t.shape)}")
    return t.to(device=x0.device, dtype=x0.dtype).reshape(batch, *([1] * (x0.dim() - 1)))


def _check_pair(x0, x1) -> None:
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 (data) and x1 (noise) must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


class Path:
    """Base class: `sample(x0, x1, t)` returns (x_t, u_t); `pair(x0, x1)` returns the (x0, x1)
    coupling the path is built on (independent by default)."""

    name: str = ""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x0, x1

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, da/dt, db/dt) with x_t = a x0 + b x1 (without the path's own extra noise), shaped like t."""
        raise NotImplementedError(f"{type(self).__name__} does not say its coefficients")

    def config(self) -> Dict:
        """What rebuilds this path: get_path(**path.config())."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class GVP(Path):
    """Generalized variance-preserving (trigonometric) path: x_t = cos(pi t/2) x0 + sin(pi t/2) x1."""

    name = "gvp"

    def sample(self, x0, x1, t):
        _check_pair(x0, x1)
        x0, x1 = self.pair(x0, x1)
        tt = _time(t, x0) * (math.pi / 2)
        c, s = torch.cos(tt), torch.sin(tt)
        x_t = c * x0 + s * x1
        u_t = (math.pi / 2) * (c * x1 - s * x0)
        return x_t, u_t

    def coefficients(self, t):
        angle = t * (math.pi / 2)
        c, s = torch.cos(angle), torch.sin(angle)
        return c, s, -(math.pi / 2) * s, (math.pi / 2) * c


class ICFM(Path):
    """Independent conditional flow matching (straight lines): x_t = (1 - t) x0 + t x1, u_t = x1 - x0,
    optionally blurred by sigma * N(0, I) (torchcfm's constant-sigma variant; the target stays x1 - x0)."""

    name = "icfm"

    def __init__(self, sigma: float = 0.0):
        self.sigma = _check_sigma(sigma)

    def config(self) -> Dict:
        return {"name": self.name, "sigma": self.sigma}

    def coefficients(self, t):
        return 1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)

    def sample(self, x0, x1, t):
        _check_pair(x0, x1)
        x0, x1 = self.pair(x0, x1)
        tt = _time(t, x0)
        x_t = x0 + tt * (x1 - x0)
        if self.sigma > 0:
            x_t = x_t + self.sigma * torch.randn_like(x_t)
        return x_t, x1 - x0


@torch.no_grad()
def ot_cost_matrix(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """C[i, j] = ||x0[i] - x1[j]||^2 for flattened samples, (B, B), on the tensors' device.

    Expanded as |a|^2 + |b|^2 - 2 a.b: one GEMM instead of a (B, B, D) difference. Computed in
    float64 for float64 inputs, else in float32 (2-4x faster than float64 on a CPU; its rounding,
    ~1e-7 of |a|^2, can only reorder pairings whose costs tie to that precision)."""
    _check_pair(x0, x1)
    n = x0.shape[0]
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a = x0.reshape(n, -1).to(dtype)
    b = x1.reshape(n, -1).to(device=a.device, dtype=dtype)
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)


@torch.no_grad()
def ot_permutation(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation `perm` minimising sum_i ||x0[i] - x1[perm[i]]||^2, exactly (an assignment
    by scipy's linear_sum_assignment on ot_cost_matrix). A long tensor on x1's device."""
    from scipy.optimize import linear_sum_assignment  # here, not at import: keeps `import prg_fast` light

    cost = ot_cost_matrix(x0, x1)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    # rows comes back sorted (0..n-1) for a square matrix; scatter anyway rather than rely on it
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(x1.device)


class OTCFM(ICFM):
    """ICFM on the minibatch coupling given by exact optimal transport (squared Euclidean cost).
    The pairing is an assignment: x1 is permuted, x0 (and therefore t, per data sample) keeps its
    order, every noise sample is used exactly once."""

    name = "otcfm"

    def pair(self, x0, x1):
        return x0, x1[ot_permutation(x0, x1)]


PATHS: Dict[str, Type[Path]] = {"gvp": GVP, "icfm": ICFM, "otcfm": OTCFM}


def get_path(name, sigma: float = 0.0) -> Path:
    """A path by name ("gvp", "icfm", "otcfm"); a Path instance is returned unchanged."""
    if isinstance(name, Path):
        return name
    if not isinstance(name, str) or name.lower() not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)} (or a prg_fast.paths.Path), got {name!r}")
    cls = PATHS[name.lower()]
    if cls is GVP:
        if _check_sigma(sigma) != 0.0:
            raise ValueError(f"sigma is not used by the GVP path; got sigma={sigma!r}")
        return GVP()
    return cls(sigma=sigma)
