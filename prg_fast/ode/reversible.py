"""Algebraically reversible Runge-Kutta (McCallum & Foster 2024, arXiv 2410.11648): the scheme's
steps forward and back and the reconstruction check; its adjoint is prg_fast.ode.reversible_adjoint.
The scheme, its coupling, costs and exactness: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Tuple

import torch

from .integrate import Problem, check_finite

DEFAULT_COUPLING = 0.999
# what the reversible backward does when its rebuilt initial state is off (check_reconstruction)
RECONSTRUCTION_CHECKS = ("error", "warn", "off")


def check_coupling(coupling) -> float:
    if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0.0 < float(coupling) <= 1.0:
        raise ValueError(f"reversible_coupling must be a number in (0, 1], got {coupling!r}")
    return float(coupling)


# the rebuilt initial state's largest relative error the backward accepts (check_reconstruction)
RECONSTRUCTION_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def reconstruction_error(y0: torch.Tensor, z0: torch.Tensor, x: torch.Tensor) -> float:
    """max(|y0 - x|, |z0 - x|) / |x| (norms over the whole state): how far the inverse steps'
    rebuilt initial pair lies from the initial state both y and z started from."""
    x = x.detach().to(y0.dtype)
    scale = x.norm().clamp_min(torch.finfo(y0.dtype).tiny)
    return (torch.maximum((y0 - x).norm(), (z0 - x).norm()) / scale).item()


def check_reconstruction(error: float, dtype: torch.dtype, mode: str) -> None:
    """The rebuilt initial state's relative `error` against RECONSTRUCTION_TOL[state dtype]: above it
    "error" raises, "warn" warns with the figure, "off" does nothing (why: docs/engine.md, "Adjoint
    strategies", when the reversible scheme is unsafe)."""
    tol = RECONSTRUCTION_TOL.get(dtype, RECONSTRUCTION_TOL[torch.float32])
    if mode == "off" or (error <= tol and math.isfinite(error)):
        return
    message = (
        f"reversible=True: the backward rebuilt the initial state by the inverse steps with a relative error of "
        f"{error:.3g} (tolerance {tol:g} for {dtype}), so its gradients are not those of the forward. The velocity "
        "amplifies rounding too much for the algebraically reversible scheme (large Lipschitz constant x step size): "
        "use more steps, a float64 state, or reversible=False (the stored adjoint is exact for any network); "
        "reversible_check='warn' continues with a warning"
    )
    if mode == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise RuntimeError(message)


def base_step(p: Problem, t, h, x: torch.Tensor, end) -> torch.Tensor:
    """x + Psi_h(t, x): one step of the base tableau from t towards `end` (state dtype)."""
    ks = p.stages(x, h, p.stage_times(t, h, end), lambda i, tau, xi: p.evaluate(tau, xi))
    return p.step_output(x, ks, h)


def _forward_step(p, lam, n, y, z, record: Optional[Callable[[], None]]):
    t0, t1 = p.point(n), p.point(n + 1)
    h = t1 - t0
    if record is not None:  # before each base step (the adjoint's replay record: random state, buffers)
        record()
    fz = base_step(p, t0, h, z, t1)  # z + Psi_h(t0, z)
    # lam y + (1 - lam) z + (fz - z) = lam y - lam z + fz
    y = p.backend.combine(fz, [y, z], [lam, -lam], 1.0, p.state_dtype)
    if record is not None:
        record()
    gy = base_step(p, t1, -h, y, t0)  # y + Psi_{-h}(t1, y)
    z = p.backend.combine(z, [y, gy], [1.0, -1.0], 1.0, p.state_dtype)
    return y, z


def run(p: Problem, x: torch.Tensor, lam: float,
        record: Optional[Callable[[], None]] = None) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the y states at the grid's outputs, y_K, z_K), calling `record` before each base step."""
    if p.grid.out_rows is not None:  # save_at on per-sample times: its grid may hold zero-length steps
        raise ValueError(
            "reversible=True cannot be combined with save_at on per-sample times (t, t0 or save_at per sample): "
            "a zero-length step of the reversible scheme is not the identity (its coupling mixes the two states); "
            "use reversible=False, or shared times"
        )
    want = p.grid.output_points()
    y = z = x
    saved = {0: x} if 0 in want else {}
    for n in range(p.steps):
        y, z = _forward_step(p, lam, n, y, z, record)
        check_finite(p, y, n)
        if n + 1 in want:
            saved[n + 1] = y
    return p.grid.gather_outputs(saved), y, z


def solve_reversible(problem: Problem, x: torch.Tensor, coupling: float = DEFAULT_COUPLING) -> torch.Tensor:
    """The reversible scheme under ordinary autograd (or no_grad): the oracle for the reversible
    adjoint. Returns the y states at the grid's outputs stacked on dim 0."""
    outs, _, _ = run(problem, x.to(problem.state_dtype), check_coupling(coupling))
    return torch.stack(outs)


def inverse_step(p: Problem, lam: float, n: int, y: torch.Tensor, z: torch.Tensor,
                 step: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_n, z_n) from (y_{n+1}, z_{n+1}): the scheme's exact inverse. `step(e, t, h, end,
    x)` is base step e (2n: F from t_n, 2n+1: G from t_{n+1}): base_step itself by default, the
    adjoint's rerun with its VJP in the backward (prg_fast.ode.reversible_adjoint)."""
    t0, t1 = p.point(n), p.point(n + 1)
    h = t1 - t0
    if step is None:
        def step(e, t, hh, end, x):
            return base_step(p, t, hh, x, end)
    gy = step(2 * n + 1, t1, -h, t0, y)
    z = p.backend.combine(z, [gy, y], [1.0, -1.0], 1.0, p.state_dtype)
    fz = step(2 * n, t0, h, t1, z)
    # y_n = (y_{n+1} + lam z_n - F(z_n)) / lam
    y = p.backend.combine(y, [z, fz], [1.0, -1.0 / lam], 1.0 / lam, p.state_dtype)
    return y, z
