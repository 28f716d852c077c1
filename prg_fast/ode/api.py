"""Public entry points: reverse (data -> noise), generate (noise -> data), odeint (any grid).

Time convention (DESIGN.md section 2): t = 0 is data, t = 1 is noise; the velocity network is called
model(t, x) with t of shape (B,) and returns a tensor shaped like x.

Each entry point checks its arguments, builds the Grid (prg_fast.ode.grids) and the
SolveDescription (prg_fast.ode.description: tableau, backend, adjoint strategy) once, and hands
both to `run` (or to the CUDA-graph cache, which keys on them): the description makes the call's
Problem, and its strategy runs it.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Callable, Optional, Sequence, Union

import torch

from . import fixed_grid, states
from .cuda_graphs import graphed_solve
from .description import OPTIONS, SolveDescription, describe
from .grids import Grid, check_order, check_unit_times, time_arg, time_grid
from .integrate import check_state

Time = Union[float, torch.Tensor]  # a number, a one-element tensor, or shape (B,): one time per sample


def time_reversed(model: Callable) -> "TimeReversed":
    """Adapt a model trained with the opposite convention (torchcfm: t = 0 is noise):
    v'(t, x) = -v(1 - t, x)."""
    return TimeReversed(model)


class TimeReversed(torch.nn.Module):
    def __init__(self, model: Callable):
        super().__init__()
        _check_model(model)
        self.model = model  # registered as a submodule when it is one, so .parameters() sees it

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -self.model(1 - t, x)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_model(model, name: str = "model") -> None:
    if not callable(model):
        raise TypeError(f"{name} must be callable as {name}(t, x), got {type(model).__name__}")


def _solve_options(entry: str, options: dict) -> dict:
    """An entry point's solve options (prg_fast.ode.description.OPTIONS, where they are named with
    their defaults; generate takes describe's method, backend and adjoint here too), a name that is
    none of them refused as Python would refuse it, naming the entry point."""
    unknown = sorted(set(options) - set(OPTIONS) - {"method", "backend", "adjoint"})
    if unknown:
        raise TypeError(f"{entry}() got unexpected keyword arguments {unknown}")
    return options


def run(func, x: torch.Tensor, grid: Grid, spec: SolveDescription) -> torch.Tensor:
    """The states at the grid's outputs stacked on dim 0, in x's dtype: the call's Problem, run by
    the description's strategy (prg_fast.ode.stored_adjoint, reversible_adjoint, backprop)."""
    out = spec.strategy.run(spec.problem(func, x, grid), x)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _dispatch(model, x: torch.Tensor, grid: Grid, spec: SolveDescription, cuda_graph, names: str) -> torch.Tensor:
    """Run the solve, through a captured CUDA graph when asked for. A captured graph replays fixed
    float times: time tensors (per sample, or requiring grad under grad mode) run eagerly with
    cuda_graph="auto" and are refused with cuda_graph=True."""
    if grid.times is None:
        if cuda_graph:
            return graphed_solve(run, model, x, grid, spec, mode=cuda_graph)
        return run(model, x, grid, spec)
    if cuda_graph is True:
        raise ValueError(
            f"cuda_graph=True replays a solve on plain float times, but {names} include a tensor that is per "
            "sample or requires grad: pass numbers (under torch.no_grad()), or cuda_graph=False / 'auto'"
        )
    if cuda_graph not in (False, None, "auto"):
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
    return run(model, x, grid, spec)


def reverse(
    model: Callable,
    x: torch.Tensor,
    t: Time = 1.0,
    *,
    steps: int = 20,
    method: str = "rk4",
    t0: Time = 0.0,
    adjoint: bool = True,
    backend: str = "auto",
    save_at: Optional[Union[Sequence[float], torch.Tensor]] = None,
    cuda_graph: Union[bool, str] = False,
    **options,
) -> torch.Tensor:
    """Integrate dx/dt = model(t, x) from t0 (data end) up to t (noise end) in `steps` fixed steps.

    Returns the state at t, shaped like x; with `save_at` (times in [t0, t]) the states at those
    times stacked on dim 0 -- inserted into the grid, so each is an exact solver state.
    Times may be tensors (prg_fast.ode.grids): `t`, `t0`, `save_at` that require grad get the exact
    derivative of the discrete solve; `t`, `t0` of shape (B,) give each sample its own interval in
    the same `steps` steps (then `save_at` is (S,) or (S, B) and the result (S, B, ...)).
    `backend`: "auto", "cuda", "triton", "cpu", "reference".
    `cuda_graph=True` (CUDA, no grad) captures the loop once per shape and replays it; "auto"
    only where it pays (prg_fast.ode.cuda_graphs).

    `adjoint=True` (default): the exact discrete adjoint; `adjoint=False`: plain autograd through
    the same solver; or a strategy object (StoredAdjoint, ReversibleAdjoint, Backprop).

    **options: the solve options -- memory_budget, store, reversible and its coupling and check,
    preserve_rng_state, adjoint_params, model_dtype, check_finite -- each with its default and
    meaning in prg_fast.ode.description.OPTIONS (costs of the strategies: docs/engine.md).
    """
    check_state(x)
    steps = _check_steps(steps)
    t1, t0 = time_arg(t, "t", x), time_arg(t0, "t0", x)
    check_unit_times(t=t1, t0=t0, save_at=save_at)
    check_order(t0, t1, "reverse integrates from t0 up to t, so t must be > t0", "t0", "t")
    grid = time_grid(t0, t1, steps, save_at, x)
    _check_model(model)
    spec = describe(method=method, adjoint=adjoint, backend=backend, **_solve_options("reverse", options))
    out = _dispatch(model, x, grid, spec, cuda_graph, "t, t0")
    return out[0] if save_at is None else out


def generate(
    model: Callable,
    z: torch.Tensor,
    *,
    steps: int = 20,
    t: Time = 1.0,
    t_end: Time = 0.0,
    cuda_graph: Union[bool, str] = False,
    **options,
) -> torch.Tensor:
    """Integrate from the noise end t (default 1) down to t_end (default 0, data): samples.
    Differentiable like `reverse`, with the same keyword arguments (method, adjoint, backend, the
    strategy keywords, ...). `t` and `t_end` may be tensors that require grad and/or have shape
    (B,) (per-sample intervals), as `reverse`'s t0 and t."""
    check_state(z, "z")
    steps = _check_steps(steps)
    t1, t_end = time_arg(t, "t", z), time_arg(t_end, "t_end", z)
    check_unit_times(t=t1, t_end=t_end)
    check_order(t_end, t1, "generate integrates from t down to t_end, so t must be > t_end", "t_end", "t")
    # reverse's grid over [t_end, t], walked backwards: a round trip generate(reverse(x)) visits the same
    # time points bit for bit (t_end + (t - t_end) k / steps, not t - (t - t_end) k / steps, which rounds
    # differently), so a velocity with knots on reverse's grid sees them in both directions
    up = time_grid(t_end, t1, steps, None, z)
    grid = Grid(up.points[::-1], up.out_index, None if up.times is None else up.times.flip(0))
    _check_model(model)
    return _dispatch(model, z, grid, describe(**_solve_options("generate", options)), cuda_graph, "t, t_end")[0]


def odeint(
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    method: str = "rk4",
    adjoint: bool = True,
    backend: str = "auto",
    options: Optional[dict] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    **solve_options,
) -> torch.Tensor:
    """torchdiffeq-compatible fixed-grid solve: one step per interval of the 1-D grid `t`
    (increasing or decreasing); returns the state at every grid point stacked on dim 0.
    As in torchdiffeq, func(t, y) receives t as a 0-dim tensor. Note method="rk4" here is the
    classic rule; torchdiffeq's "rk4" is our "rk4_38". A grid that requires grad gets the exact
    derivative of the discrete solve. `t` may also have shape (T, B), one grid per sample
    (torchode-style): y0 is then (B, ...), func receives t of shape (B,), the result is (T, B, ...).
    `y0` may be complex, 0-dim or a (nested) tuple of tensors, as in torchdiffeq (prg_fast.ode.states).
    The solve options (memory_budget, store, reversible, adjoint_params, ...) are `reverse`'s **options.

    torchdiffeq's fixed-grid options: `options=dict(step_size=h)` or `dict(grid_constructor=fn)` steps
    along a finer grid and linearly interpolates the states at t (prg_fast.ode.fixed_grid; the same
    grid and interpolation as torchdiffeq). `rtol`/`atol` are accepted for drop-in use and ignored
    with a warning: every method here is fixed-step (torchdiffeq's fixed-grid solvers drop them too)."""
    if rtol is not None or atol is not None:
        warnings.warn(
            "odeint: rtol/atol are ignored; every method here is fixed-step (choose the grid t, or "
            "options=dict(step_size=...))", UserWarning, stacklevel=2,
        )
    options = fixed_grid.check_options(options)
    spec = describe(method=method, adjoint=adjoint, backend=backend, **_solve_options("odeint", solve_options))
    # odeint's own: t passed 0-dim, and torchdiffeq's perturb (fixed_grid) from its options
    spec = dataclasses.replace(spec, batch_time=False, perturb=bool(options.get("perturb", False)))
    return _odeint(func, y0, t, spec, options)


def _odeint(func, y0, t, spec: SolveDescription, options: dict):
    adapted = states.adapt(func, y0, t, spec, options)
    if adapted is not None:
        return adapted.unwrap(_odeint(adapted.func, adapted.y0, t, adapted.spec, adapted.options))
    check_state(y0, "y0", batched=False)
    _check_model(func, "func")
    grid, outputs = fixed_grid.odeint_grid(func, y0, t, options)
    return outputs(run(func, y0, grid, spec))
