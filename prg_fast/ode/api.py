"""Public entry points: reverse (data -> noise), generate (noise -> data), odeint (any grid). Each
checks its arguments and hands the Grid and the SolveDescription to `run`; reverse / generate's
times (the unit interval, float or tensor grids) are built here. Details: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import adaptive, fixed_grid, states
from .cuda_graphs import graphed_solve
from .description import SolveDescription, describe
from .integrate import Grid, check_state
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


def run(func, x: torch.Tensor, grid: Grid, spec: SolveDescription) -> torch.Tensor:
    """The states at the grid's outputs stacked on dim 0, in x's dtype: the call's Problem, run by
    the description's strategy."""
    out = spec.strategy.run(spec.problem(func, x, grid), x)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _dispatch(model, x: torch.Tensor, grid: Grid, spec: SolveDescription, cuda_graph, names: str) -> torch.Tensor:
    """Run the solve, through a captured CUDA graph when asked for. A graph replays fixed float
    times: time tensors run eagerly with cuda_graph="auto" and are refused with cuda_graph=True."""
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


def as_time(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number (or a one-element tensor), got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def save_times(save_at) -> List[float]:
    if isinstance(save_at, torch.Tensor):
        save_at = save_at.detach().flatten().tolist()
    if isinstance(save_at, (str, bytes)) or not hasattr(save_at, "__iter__"):
        raise TypeError(f"save_at must be a sequence of times, got {type(save_at).__name__}")
    times = [as_time(s, "save_at entries") for s in save_at]
    if not times:
        raise ValueError("save_at must hold at least one time (or be None)")
    return times


def merge_plan(t0: float, t1: float, steps: int, times: Optional[List[float]]) -> Tuple[List[float], List[int], List[int]]:
    """(grid, out index, sources): a uniform grid of `steps` steps from t0 to t1, with the save_at
    `times` inserted as extra grid points (so every saved state is an exact solver state, never an
    interpolation). sources[i] says where grid point i comes from: k < steps+1 is the uniform
    point k, steps+1+j the save time j (a tensor grid is assembled from the same plan)."""
    grid = [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]
    grid[-1] = t1
    if times is None:
        return grid, [steps], list(range(steps + 1))
    lo, hi = min(t0, t1), max(t0, t1)
    tol = 1e-9 * abs(t1 - t0)
    for s in times:
        if s < lo - tol or s > hi + tol:
            raise ValueError(f"save_at times must lie in [t0, t] = [{t0:g}, {t1:g}], got {s:g}")
    sign = 1.0 if t1 > t0 else -1.0
    # snap to an existing grid point when within rounding, else insert
    tol = max(tol, 1e-12)
    entries = [(g, k) for k, g in enumerate(grid)]
    for j, s in enumerate(times):
        if all(abs(s - g) > tol for g, _ in entries):
            entries.append((s, steps + 1 + j))
    entries.sort(key=lambda e: sign * e[0])
    grid = [g for g, _ in entries]
    index = [min(range(len(grid)), key=lambda k: abs(grid[k] - s)) for s in times]
    return grid, index, [src for _, src in entries]


def time_arg(value, name: str, x: torch.Tensor):
    """A time argument of reverse/generate: a float (the float path), or a float64 tensor on x's
    device, 0-dim (one time that requires grad) or (B,) (one time per sample)."""
    if not isinstance(value, torch.Tensor):
        return as_time(value, name)
    B = x.shape[0]
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a number or a floating-point tensor, got a {value.dtype} tensor")
    per_sample = value.dim() == 1 and value.shape[0] == B and B > 1
    if not per_sample and value.numel() != 1:
        raise ValueError(
            f"{name} must be a number, a one-element tensor or a tensor of shape (B,) = ({B},) (one time "
            f"per sample of x), got shape {tuple(value.shape)}"
        )
    if value.device != x.device and (per_sample or value.device.type != "cpu"):
        raise ValueError(
            f"{name} is on {value.device} but x is on {x.device}: a time tensor must be on x's device "
            "(a one-element time may also be a CPU tensor)"
        )
    finite = torch.isfinite(value.detach().reshape(-1))
    if not bool(finite.all()):
        if per_sample:
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{name} must be finite for every sample; sample {i} has {name}={value[i].item()}")
        raise ValueError(f"{name} must be a finite number, got {value.item()}")
    if per_sample or (value.requires_grad and torch.is_grad_enabled()):
        return value.reshape(B if per_sample else ()).to(device=x.device, dtype=torch.float64)
    return float(value.item())


def check_order(lo, hi, message: str, lo_name: str, hi_name: str) -> None:
    """`hi` > `lo` (floats or time tensors), else `message`, naming the first offending sample."""
    if not isinstance(lo, torch.Tensor) and not isinstance(hi, torch.Tensor) and hi > lo:
        return  # floats in order: no tensors (~100 us a call); NaN was refused by time_arg
    a, b = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in (lo, hi)))
    bad = ~(b > a)
    if not bool(bad.any()):
        return
    if a.dim() == 0:
        raise ValueError(f"{message}; got {lo_name}={a.item():g}, {hi_name}={b.item():g}")
    i = int(bad.nonzero()[0, 0])
    raise ValueError(f"{message} for every sample; sample {i} has {lo_name}={a[i].item():g}, {hi_name}={b[i].item():g}")


def time_grid(start, end, steps: int, save_at, x: torch.Tensor):
    """The Grid from `start` to `end`, as floats (times None: the float path) or, when a time is a
    tensor, as a float64 tensor built with differentiable ops: (P,) shared, (P, B) per sample."""
    save_2d = isinstance(save_at, torch.Tensor) and save_at.dim() == 2
    save_tensor = isinstance(save_at, torch.Tensor) and save_at.requires_grad and torch.is_grad_enabled()
    if not (isinstance(start, torch.Tensor) or isinstance(end, torch.Tensor) or save_tensor or save_2d):
        grid, index, _ = merge_plan(start, end, steps, None if save_at is None else save_times(save_at))
        return Grid(grid, index)
    dev = x.device
    a = start if isinstance(start, torch.Tensor) else torch.tensor(start, dtype=torch.float64, device=dev)
    b = end if isinstance(end, torch.Tensor) else torch.tensor(end, dtype=torch.float64, device=dev)
    per_sample = a.dim() == 1 or b.dim() == 1 or save_2d
    if per_sample:
        a, b = a.expand(x.shape[0]), b.expand(x.shape[0])
    k = torch.arange(steps, dtype=torch.float64, device=dev).reshape((steps,) + (1,) * a.dim())
    # the same arithmetic as the float grid (t0 + (t1 - t0) * k / steps), last point exactly t1
    uniform = torch.cat([a + (b - a) * k / steps, b.unsqueeze(0)])
    if per_sample:
        if save_at is None:
            return Grid(uniform[:, 0].tolist(), [steps], uniform)
        return per_sample_save_grid(uniform, save_at, x)
    save = None if save_at is None else save_times(save_at)
    grid, index, sources = merge_plan(a.item(), b.item(), steps, save)
    if save is not None:
        points = save_at.reshape(-1) if isinstance(save_at, torch.Tensor) else torch.tensor(save, dtype=torch.float64)
        uniform = torch.cat([uniform, points.to(device=dev, dtype=torch.float64)])
    times = uniform if sources == list(range(steps + 1)) else uniform[torch.tensor(sources, device=dev)]
    return Grid(grid, index, times)


def per_sample_save_grid(uniform: torch.Tensor, save_at, x: torch.Tensor):
    """save_at on a per-sample grid: shape (S,) (the same absolute times for every sample) or
    (S, B) (per sample). Every save time must lie in its sample's interval and is inserted into
    that sample's grid, so every sample takes steps + S steps; a save time equal to a uniform grid
    point gives a zero-length step, an exact no-op (h = 0). No snapping, unlike a shared grid."""
    B, dev = x.shape[0], x.device
    if isinstance(save_at, torch.Tensor):
        if not save_at.is_floating_point():
            raise TypeError(f"save_at must hold floating-point times, got a {save_at.dtype} tensor")
        if save_at.dim() == 2 and save_at.shape[1] != B or save_at.dim() > 2:
            raise ValueError(
                f"save_at must have shape (S,) or (S, B) = (S, {B}) (per-sample times), got {tuple(save_at.shape)}"
            )
        if save_at.device != dev:
            raise ValueError(f"save_at is on {save_at.device} but x is on {dev}: a time tensor must be on x's device")
        points = save_at.to(torch.float64)  # finite: check_unit_times found it in [0, 1]
        if points.dim() < 2:
            points = points.reshape(-1, 1)
        if points.numel() == 0:
            raise ValueError("save_at must hold at least one time (or be None)")
        points = points.expand(points.shape[0], B)
    else:
        points = torch.tensor(save_times(save_at), dtype=torch.float64, device=dev)[:, None].expand(-1, B)
    lo = torch.minimum(uniform[0], uniform[-1]).detach()
    hi = torch.maximum(uniform[0], uniform[-1]).detach()
    tol = 1e-9 * (hi - lo)
    outside = (points.detach() < lo - tol) | (points.detach() > hi + tol)
    if bool(outside.any()):
        j, i = (int(v) for v in outside.nonzero()[0])
        raise ValueError(
            f"save_at times must lie in [t0, t] of every sample; save_at[{j}] = {points[j, i].item():g} is outside "
            f"sample {i}'s [t0, t] = [{uniform[0, i].item():g}, {uniform[-1, i].item():g}]"
        )
    # clamp rounding-level excursions into the interval, so no step runs backwards
    points = points.clamp(lo, hi)
    merged = torch.cat([uniform, points])
    sign = 1.0 if bool((uniform[-1] >= uniform[0]).all()) else -1.0
    # stable: a save time equal to a uniform point comes after it (a zero-length step, then saved)
    order = torch.sort(sign * merged.detach(), dim=0, stable=True).indices
    times = merged.gather(0, order)
    position = torch.argsort(order, dim=0)[uniform.shape[0]:]  # (S, B): each save time's grid index
    out_rows = position.tolist()
    return Grid(times[:, 0].tolist(), [row[0] for row in out_rows], times, out_rows)


UNIT_TIME = "a time in [0, 1] (0 = data, 1 = noise)"


def check_unit_times(**times) -> None:
    """Every given time (a number, a sequence of numbers or a tensor of any shape; None skips) lies
    in [0, 1], else ValueError naming the argument and the first value outside (a tensor: one sync)."""
    for name, value in times.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            values = value.detach().reshape(-1)
        elif isinstance(value, numbers.Real):
            if not 0.0 <= float(value) <= 1.0:  # in Python: a tensor per number cost ~50 us a call (NaN fails too)
                raise ValueError(f"{name}: expected {UNIT_TIME}, got {float(value):g}")
            continue
        else:  # a sequence of times; one that is not numbers is refused by the caller's own parsing
            try:
                values = torch.tensor([float(v) for v in value], dtype=torch.float64)
            except (TypeError, ValueError):
                continue
        outside = ~((values >= 0) & (values <= 1))  # NaN is outside too
        if bool(outside.any()):
            first = values[outside][0].item()
            raise ValueError(f"{name}: expected {UNIT_TIME}, got {first:g}")


def _unit_grid(x: torch.Tensor, steps, t, start, start_name: str, save_at, order: str) -> Grid:
    """reverse / generate's checks of their times, said once, and their Grid from `start` (t0 or
    t_end) up to t; `order` is the message for a start not before t."""
    steps = _check_steps(steps)
    t1, t0 = time_arg(t, "t", x), time_arg(start, start_name, x)
    check_unit_times(**{"t": t1, start_name: t0, "save_at": save_at})
    check_order(t0, t1, order, start_name, "t")
    return time_grid(t0, t1, steps, save_at, x)


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
    times stacked on dim 0. `t`, `t0`, `save_at` may be tensors that require grad, `t`, `t0` of shape
    (B,). `backend`: "auto", "cuda", "triton", "cpu", "reference"; `cuda_graph`: True, False, "auto".
    `adjoint`: True (the exact discrete adjoint), False (plain autograd) or a strategy object.
    **options: prg_fast.ode.description.OPTIONS. Details: docs/engine.md, "The calls" and "Adjoint
    strategies".
    """
    check_state(x)
    grid = _unit_grid(x, steps, t, t0, "t0", save_at, "reverse integrates from t0 up to t, so t must be > t0")
    _check_model(model)
    spec = describe(method=method, adjoint=adjoint, backend=backend, caller="reverse", **options)
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
    # reverse's grid over [t_end, t], walked backwards: a round trip generate(reverse(x)) visits the same
    # time points bit for bit (t_end + (t - t_end) k / steps, not t - (t - t_end) k / steps, which rounds
    # differently), so a velocity with knots on reverse's grid sees them in both directions
    up = _unit_grid(z, steps, t, t_end, "t_end", None, "generate integrates from t down to t_end, so t must be > t_end")
    grid = Grid(up.points[::-1], up.out_index, None if up.times is None else up.times.flip(0))
    _check_model(model)
    return _dispatch(model, z, grid, describe(caller="generate", **options), cuda_graph, "t, t_end")[0]


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
    """torchdiffeq's odeint: the states at the times `t` (1-D, or (T, B) per sample), stacked on
    dim 0; func(t, y) receives t 0-dim. method None is dopri5 (adaptive: rtol/atol, options,
    return_stats, event_fn as torchdiffeq's); a fixed-step method steps along t, or along the finer
    grid of options=dict(step_size=h) or dict(grid_constructor=fn). torchdiffeq's "rk4" is "rk4_38"
    here. The solve options are `reverse`'s **options. Details: docs/engine.md, "The calls" and
    "Adaptive `odeint`"."""
    spec = describe(method=method, adjoint=adjoint, backend=backend, caller="odeint", **solve_options)
    spec = dataclasses.replace(spec, batch_time=False)  # odeint passes t 0-dim
    _check_model(func, "func")
    if get_embedded(method) is not None:
        return adaptive.odeint(func, y0, t, spec, rtol, atol, options, return_stats, event_fn)
    if return_stats or event_fn is not None:
        raise ValueError(f"{'return_stats=True' if return_stats else 'event_fn'} needs an adaptive method; "
                         f"{method!r} is fixed-step")
    if rtol is not None or atol is not None:
        warnings.warn(f"odeint: rtol/atol are ignored by the fixed-step method {method!r} (choose the grid t or "
                      "options=dict(step_size=...); an adaptive method such as dopri5 reads them)", UserWarning, stacklevel=2)
    options = fixed_grid.check_options(options)
    spec = dataclasses.replace(spec, perturb=bool(options.get("perturb", False)))  # torchdiffeq's (fixed_grid)
    return _odeint(func, y0, t, spec, options)


def _odeint(func, y0, t, spec: SolveDescription, options: dict):
    adapted = states.adapt(func, y0, t, spec, options)
    if adapted is not None:
        return adapted.unwrap(_odeint(adapted.func, adapted.y0, t, adapted.spec, adapted.options))
    check_state(y0, "y0", batched=False)
    grid, outputs = fixed_grid.odeint_grid(func, y0, t, options)
    return outputs(run(func, y0, grid, spec))


_WARNED: set = set()


def odeint_adjoint(func: Callable, y0, t, *, rtol=None, atol=None, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None, **solve_options):
    """torchdiffeq's odeint_adjoint: odeint's solve and exact discrete adjoint; adjoint_rtol, adjoint_atol,
    adjoint_method and adjoint_options do not apply (warned about once; docs/engine.md, "Adaptive `odeint`")."""
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
