"""Fixed-step explicit Runge-Kutta solvers, as data.

A solver is its Butcher tableau; one integration loop (prg_fast/ode/integrate.py) serves them all.
For a step from t to t + h with s stages:

    X_i = x + h * sum_{j<i} a[i][j] * k_j,      k_i = f(t + c[i] * h, X_i)
    x'  = x + h * sum_i b[i] * k_i

Cost per step is s network evaluations (forward), and with the adjoint, s vector-Jacobian products
(backward) plus s stored stage inputs per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple


@dataclass(frozen=True)
class ButcherTableau:
    name: str
    order: int
    a: Tuple[Tuple[float, ...], ...]  # strictly lower triangular, row i has i entries
    b: Tuple[float, ...]
    c: Tuple[float, ...]
    # s, read on every stage of every loop: a field (len(b)), not a property call
    stages: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        s = len(self.b)
        object.__setattr__(self, "stages", s)
        if len(self.c) != s or len(self.a) != s:
            raise ValueError(f"tableau {self.name}: a, b and c must have {s} rows")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau {self.name}: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"tableau {self.name}: row {i} of a must sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError(f"tableau {self.name}: b must sum to 1")


EULER = ButcherTableau("euler", order=1, a=((),), b=(1.0,), c=(0.0,))
"""Forward Euler. Order 1, 1 evaluation per step."""

MIDPOINT = ButcherTableau("midpoint", order=2, a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))
"""Explicit midpoint. Order 2, 2 evaluations per step."""

HEUN = ButcherTableau("heun", order=2, a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))
"""Heun's method (explicit trapezoid). Order 2, 2 evaluations per step."""

RK4 = ButcherTableau(
    "rk4",
    order=4,
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    c=(0.0, 0.5, 0.5, 1.0),
)
"""Classic Runge-Kutta (weights 1/6, 1/3, 1/3, 1/6). Order 4, 4 evaluations per step."""

RK4_38 = ButcherTableau(
    "rk4_38",
    order=4,
    a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    c=(0.0, 1 / 3, 2 / 3, 1.0),
)
"""Kutta's 3/8 rule (what torchdiffeq calls "rk4"). Order 4, 4 evaluations per step."""

SOLVERS = {t.name: t for t in (EULER, MIDPOINT, HEUN, RK4, RK4_38)}


# torchdiffeq's names that mean something else here, or nothing: said in the error, not guessed
_TORCHDIFFEQ_NAMES = {
    "heun2": "torchdiffeq's heun2 is 'heun' here",
    "heun3": "Heun's third-order method is not provided (pass a ButcherTableau)",
    "explicit_adams": "multistep methods are not provided",
    "implicit_adams": "multistep methods are not provided",
}
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5", "scipy_solver")


def get_tableau(method) -> ButcherTableau:
    """The tableau `method` names (a ButcherTableau passes as it is); an unknown name is refused,
    saying what torchdiffeq's names mean here."""
    if isinstance(method, ButcherTableau):
        return method
    if not isinstance(method, str) or method not in SOLVERS:
        hint = ""
        if method in _TORCHDIFFEQ_NAMES:
            hint = f"; {_TORCHDIFFEQ_NAMES[method]}"
        elif method in _ADAPTIVE:
            hint = ("; adaptive solvers are not provided (every solve here is fixed-step and exactly "
                    "differentiable): pick a grid, or odeint(..., options=dict(step_size=h))")
        raise ValueError(f"method must be one of {sorted(SOLVERS)} (or a ButcherTableau), got {method!r}{hint}")
    return SOLVERS[method]
