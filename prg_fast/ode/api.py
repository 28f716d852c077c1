"""Public entry points: reverse (data -> noise), generate (noise -> data), odeint (any grid).

Time convention (docs/engine.md, "The calls"): t = 0 is data, t = 1 is noise; the velocity network
is called model(t, x) with t of shape (B,) and returns a tensor shaped like x.

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

from . import adaptive, fixed_grid, states
from .cuda_graphs import graphed_solve
from .description import OPTIONS, SolveDescription, describe
from .grids import Grid, check_order, check_unit_times, time_arg, time_grid
from .integrate import check_state
from .solvers import SOLVERS, EmbeddedTableau, get_embedded

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
    cuda_graph="auto" and are refused with cuda_graph=True. (A fixed-step solve: an adaptive method is odeint's.)"""
    if isinstance(spec.tableau, EmbeddedTableau):
        raise ValueError(f"method {spec.tableau.name!r} is adaptive: reverse and generate step a fixed grid (steps=); "
                         f"use a fixed-step method ({', '.join(sorted(SOLVERS))}), or odeint for adaptive steps")
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
    method: Optional[str] = None,
    adjoint: bool = True,
    backend: str = "auto",
    options: Optional[dict] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    return_stats: bool = False,
    event_fn: Optional[Callable] = None,
    **solve_options,
) -> torch.Tensor:
    """torchdiffeq's odeint: method None is dopri5, adaptive (below), as torchdiffeq's default. A fixed-step
    method takes one step per interval of the 1-D grid `t` (increasing or decreasing); the states at
    every grid point are returned stacked on dim 0.
    As in torchdiffeq, func(t, y) receives t as a 0-dim tensor. Note method="rk4" here is the
    classic rule; torchdiffeq's "rk4" is our "rk4_38". A grid that requires grad gets the exact
    derivative of the discrete solve. `t` may also have shape (T, B), one grid per sample
    (torchode-style): y0 is then (B, ...), func receives t of shape (B,), the result is (T, B, ...).
    `y0` may be complex, 0-dim or a (nested) tuple of tensors, as in torchdiffeq (prg_fast.ode.states).
    The solve options (memory_budget, store, reversible, adjoint_params, ...) are `reverse`'s **options.

    torchdiffeq's fixed-grid options: `options=dict(step_size=h)` or `dict(grid_constructor=fn)` steps
    along a finer grid and linearly interpolates the states at t (prg_fast.ode.fixed_grid; the same
    grid and interpolation as torchdiffeq). A fixed-step method ignores `rtol`/`atol` with a warning.

    Adaptive methods ("dopri5", "bosh3", "adaptive_heun", "fehlberg2", "dopri8", "tsit5" or an
    EmbeddedTableau; prg_fast.ode.adaptive): torchdiffeq's rtol/atol (default 1e-7/1e-9) and options
    (first_step, safety, ifactor, dfactor, max_num_steps, min_step, max_step, step_t, jump_t, norm,
    dtype), the states at t by dense output; `return_stats=True` returns (ys, SolveStats)."""
    if get_embedded(method) is not None:
        spec = describe(method=method, adjoint=adjoint, backend=backend, **_solve_options("odeint", solve_options))
        return adaptive.odeint(func, y0, t, dataclasses.replace(spec, batch_time=False), rtol, atol, options,
                               return_stats, event_fn)
    if return_stats or event_fn is not None:
        raise ValueError(f"{'return_stats=True' if return_stats else 'event_fn'} needs an adaptive method; "
                         f"{method!r} is fixed-step")
    if rtol is not None or atol is not None:
        warnings.warn(f"odeint: rtol/atol are ignored by the fixed-step method {method!r} (choose the grid t or "
                      "options=dict(step_size=...); an adaptive method such as dopri5 reads them)", UserWarning, stacklevel=2)
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


_WARNED: set = set()


def odeint_adjoint(func: Callable, y0, t, *, rtol=None, atol=None, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None, **solve_options):
    """torchdiffeq's odeint_adjoint, so `from prg_fast import odeint_adjoint as odeint` works: the same
    solve and exact discrete adjoint as odeint (its gradient is the derivative of the solve the
    forward took). No second ODE runs backwards, so adjoint_rtol, adjoint_atol, adjoint_method and
    adjoint_options do not apply (warned about once); adjoint_params are odeint's."""
    unused = [n for n, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                             ("adjoint_method", adjoint_method), ("adjoint_options", adjoint_options)) if v is not None]
    unused += [n for n in ("callback_step_adjoint", "callback_accept_step_adjoint", "callback_reject_step_adjoint")
               if hasattr(func, n)]
    if unused and not set(unused) <= _WARNED:
        _WARNED.update(unused)
        warnings.warn(f"odeint_adjoint: {unused} do not apply here: the gradient is the exact derivative of the forward "
                      "solve (no adjoint ODE is solved backwards)", UserWarning, stacklevel=2)
    return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                  adjoint_params=adjoint_params, **solve_options)


def odeint_event(func: Callable, y0, t0, *, event_fn: Callable, reverse_time: bool = False, odeint_interface=None,
                 **odeint_kwargs):
    """torchdiffeq's odeint_event: solve from t0 (forwards, or backwards with reverse_time) until
    event_fn(t, y) reaches 0; returns (event time, the states at t0 and at the event)."""
    t0 = torch.as_tensor(t0, dtype=torch.float64).reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    solve = odeint if odeint_interface is None else odeint_interface
    return solve(func, y0, t, event_fn=event_fn, **{"method": None, **odeint_kwargs})
