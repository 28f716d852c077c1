"""odeint's grids: the 1-D grid t (checked), a per-sample (T, B) grid, and torchdiffeq's fixed-grid
options (step_size, grid_constructor, interp, perturb), a solver grid finer than the output times
read by linear interpolation, as torchdiffeq. Details: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import bisect
import math
import numbers
from typing import Callable, List, Optional, Tuple

import torch

from .integrate import Grid

SUPPORTED = ("step_size", "grid_constructor", "interp", "perturb")


def check_options(options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict (torchdiffeq-style, e.g. dict(step_size=0.1)), got {type(options).__name__}")
    unknown = sorted(set(options) - set(SUPPORTED))
    if unknown:
        raise ValueError(
            f"options: unsupported key(s) {unknown}; supported: step_size, grid_constructor, interp='linear', "
            "perturb (torchdiffeq's cubic interpolation, jump_t and adaptive-solver options are not "
            "implemented for these fixed-step solvers)"
        )
    if not isinstance(options.get("perturb", False), bool):
        raise ValueError(f"options['perturb'] must be True or False, got {options['perturb']!r}")
    interp = options.get("interp", "linear")
    if interp != "linear":
        raise ValueError(f"options['interp'] must be 'linear' (the only interpolation implemented), got {interp!r}")
    step, ctor = options.get("step_size"), options.get("grid_constructor")
    if step is not None and ctor is not None:
        raise ValueError("options: step_size and grid_constructor are mutually exclusive")
    if step is not None:
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, numbers.Real) or not (math.isfinite(step) and step > 0):
            raise ValueError(f"options['step_size'] must be a finite number > 0, got {step!r}")
    if ctor is not None and not callable(ctor):
        raise TypeError(f"options['grid_constructor'] must be callable as fn(func, y0, t), got {type(ctor).__name__}")
    return {k: v for k, v in options.items() if v is not None}


def odeint_grid(func: Callable, y0: torch.Tensor, t, options: dict) -> Tuple[Grid, Callable]:
    """The Grid odeint(func, y0, t, options=...) solves on -- t itself (1-D, or (T, B) per sample),
    or the finer solver grid of step_size / grid_constructor, returning only the states the
    interpolation reads -- and what turns the solve's states into the outputs at t. A grid that
    requires grad is the solve's tensor grid (its gradient is returned); else floats."""
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        if options:
            raise ValueError("options (step_size, grid_constructor, perturb) need a 1-D grid t, not a per-sample (T, B) grid")
        return odeint_per_sample_grid(t, y0), lambda states: states
    t, values = odeint_values(t)
    fine = solver_grid(options, func, y0, t, values) if options else None
    # the grid the solve steps along requires grad (a finer grid does whenever t does)
    differentiable = (t if fine is None else fine).requires_grad and torch.is_grad_enabled()
    if options.get("perturb", False) and differentiable:
        what = "t" if t.requires_grad else "the grid_constructor's grid"
        raise ValueError("options['perturb']=True moves stage times off the grid by one floating-point step; it is "
                         f"for float grids: {what} must not require grad")
    if fine is None:
        times = t.to(device=y0.device, dtype=torch.float64) if differentiable else None
        return Grid(values, list(range(len(values))), times), lambda states: states
    fine_values = fine.detach().cpu().tolist()
    needed, plan = interpolation_plan(fine_values, values)
    grid = Grid(fine_values, needed, fine.to(y0.device) if differentiable else None)
    return grid, lambda states: interpolate(states, needed, plan, fine if differentiable else fine.detach(), t)


def solver_grid(options: dict, func: Callable, y0, t: torch.Tensor, values: List[float]) -> Optional[torch.Tensor]:
    """The grid the solver steps along (float64, on t's device, differentiable w.r.t. t's ends), or
    None when the options ask for no grid of their own (then the solver steps along t)."""
    step, ctor = options.get("step_size"), options.get("grid_constructor")
    if (step is None and ctor is None) or len(values) < 2:
        return None
    t64 = t.to(torch.float64)
    start, end = values[0], values[-1]
    sign = 1.0 if end > start else -1.0
    if step is not None:
        # torchdiffeq's count of points is ceil(span / h + 1); where h divides the span up to rounding
        # (0.8 / 0.2 = 4.000000000000001) that adds a step of length ~1e-16, backwards or forwards,
        # which the reversible scheme would not treat as the identity: such a sliver is dropped
        inner_count = max(math.ceil(abs(end - start) / float(step) - 1e-9) - 1, 0)
        inner = t64[:1] + sign * float(step) * torch.arange(1, inner_count + 1, dtype=torch.float64, device=t.device)
        return torch.cat([t64[:1], inner, t64[-1:]])
    grid = ctor(func, y0, t)
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() < 2:
        got = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
        raise ValueError(f"options['grid_constructor'] must return a 1-D tensor of at least 2 times, got {got}")
    g = grid.detach().to(torch.float64).cpu().tolist()
    if g[0] != start or g[-1] != end:
        raise ValueError(
            f"options['grid_constructor'] must return a grid from t[0] = {start:g} to t[-1] = {end:g}, "
            f"got one from {g[0]:g} to {g[-1]:g}"
        )
    if not all(math.isfinite(v) for v in g) or not all(sign * (b - a) > 0 for a, b in zip(g[:-1], g[1:])):
        raise ValueError("options['grid_constructor'] must return finite times, strictly monotone in t's direction")
    inner = grid[1:-1].to(device=t.device, dtype=torch.float64)
    return torch.cat([t64[:1], inner, t64[-1:]])


Plan = List[Tuple[int, Optional[int]]]  # per output: grid index, or the two grid indices around it


def interpolation_plan(grid: List[float], values: List[float]) -> Tuple[List[int], Plan]:
    """(grid indices the solve must return, and per output time which of them it reads)."""
    sign = 1.0 if grid[-1] > grid[0] else -1.0
    keys = [sign * g for g in grid]
    plan: Plan = []
    for v in values:
        i = min(bisect.bisect_left(keys, sign * v), len(grid) - 1)
        plan.append((i, None) if keys[i] == sign * v else (i - 1, i))  # on grid point i, or strictly before it
    needed = sorted({i for pair in plan for i in pair if i is not None})
    return needed, plan


def interpolate(states: torch.Tensor, needed: List[int], plan: Plan, grid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The outputs at t from the returned grid states (stacked in the order of `needed`):
    y_i + (t_j - g_i) / (g_{i+1} - g_i) (y_{i+1} - y_i), torchdiffeq's linear interpolation."""
    row = {idx: r for r, idx in enumerate(needed)}
    t64 = t.to(device=grid.device, dtype=torch.float64)
    outs = []
    for j, (i0, i1) in enumerate(plan):
        y0 = states[row[i0]]
        if i1 is None:
            outs.append(y0)
        else:
            w = ((t64[j] - grid[i0]) / (grid[i1] - grid[i0])).to(device=y0.device, dtype=y0.dtype)
            outs.append(y0 + w * (states[row[i1]] - y0))
    return torch.stack(outs)


def odeint_values(t) -> Tuple[torch.Tensor, List[float]]:
    """odeint's 1-D grid t (a tensor, or a list of numbers) and its values, checked: finite,
    strictly increasing or strictly decreasing."""
    if not isinstance(t, torch.Tensor):
        if not isinstance(t, (list, tuple)):
            raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
        t = torch.tensor(t, dtype=torch.float64)
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"t must be a 1-D tensor with at least one time (or (T, B) per sample), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor of times, got {t.dtype}")
    values = [float(v) for v in t.detach().cpu().double().tolist()]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("t must hold finite times")
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    return t, values


def odeint_per_sample_grid(t: torch.Tensor, y0: torch.Tensor) -> Grid:
    """odeint's per-sample grid t of shape (T, B), checked against y0 (B, ...): sample b is
    stepped along t[:, b]."""
    if y0.dim() < 1 or y0.shape[0] != t.shape[1]:
        raise ValueError(
            f"a per-sample grid t of shape (T, B) = {tuple(t.shape)} needs y0 of shape (B, ...) with "
            f"B = {t.shape[1]}, got {tuple(y0.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor of times, got {t.dtype}")
    if t.shape[0] < 1:
        raise ValueError(f"t must hold at least one time per sample, got shape {tuple(t.shape)}")
    if t.device != y0.device:
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}: a per-sample grid must be on y0's device")
    values = t.detach().cpu().double()
    finite = torch.isfinite(values).all(0)
    if not bool(finite.all()):
        b = int((~finite).nonzero()[0, 0])
        raise ValueError(f"t must hold finite times for every sample; sample {b} has {values[:, b].tolist()}")
    d = values[1:] - values[:-1]
    monotone = (d > 0).all(0) | (d < 0).all(0)
    if not bool(monotone.all()):
        b = int((~monotone).nonzero()[0, 0])
        raise ValueError(
            f"t must be strictly increasing or strictly decreasing for every sample; sample {b} has {values[:, b].tolist()}"
        )
    return Grid(values[:, 0].tolist(), list(range(t.shape[0])), t.to(torch.float64))
