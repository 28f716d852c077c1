"""Time grids of reverse / generate: a uniform grid of `steps` steps with the save_at times
inserted, as floats (the fast path) or as a float64 tensor built with differentiable ops, and which
of its states a solve returns (`Grid`: the outputs gathered, their cotangents spread back).

A time argument that is a tensor requiring grad (under grad mode) or holding one time per sample
makes the grid a float64 tensor ((P,) shared, (P, B) per sample) that the solve takes as an input.
(odeint's grids: prg_fast.ode.fixed_grid.) Every message names the argument and what was expected.

The unit time interval of reverse/generate: t = 0 is data, t = 1 is noise (DESIGN.md section 2). A
trajectory read past either end runs the network on times it was never trained on, silently;
reverse and generate refuse it, and so does every layer above through the one parser of times
(prg_fast.classifier.parse_time / parse_times: the segment, the trainers' time fields, the command
line's --t / --t0 / --save-at), which calls check_unit_times. odeint takes any grid.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class Grid:
    """The times a solve steps through and which of its states it returns."""

    points: List[float]  # the grid's values, strictly monotone (sample 0's on a per-sample grid)
    out_index: List[int]  # grid indices whose states are returned, in output order
    times: Optional[torch.Tensor] = None  # the float64 tensor grid, (P,) or (P, B); None: floats
    # save_at on a per-sample grid: out_rows[j][b] is the grid index of output j for sample b (the
    # save times sit at different grid positions per sample); out_index is then sample 0's
    out_rows: Optional[List[List[int]]] = None

    def output_points(self) -> set:
        """Grid indices whose state goes into some output."""
        if self.out_rows is None:
            return set(self.out_index)
        return {m for row in self.out_rows for m in row}

    def _rows_at(self, j: int, m: int, like: torch.Tensor) -> torch.Tensor:
        hit = torch.tensor([r == m for r in self.out_rows[j]], device=like.device)
        return hit.reshape((-1,) + (1,) * (like.dim() - 1))

    def gather_outputs(self, saved: dict) -> List[torch.Tensor]:
        """The outputs from the states at output_points(): per sample, each row from its own
        grid index."""
        if self.out_rows is None:
            return [saved[i] for i in self.out_index]
        outs = []
        for j, row in enumerate(self.out_rows):
            points = sorted(set(row))
            out = saved[points[0]]
            for m in points[1:]:
                out = torch.where(self._rows_at(j, m, out), saved[m], out)
            outs.append(out)
        return outs

    def output_cotangents(self, grad_out: torch.Tensor) -> dict:
        """grid index -> the cotangent arriving there from the outputs (an index may be output
        twice; on a per-sample grid each output's rows arrive at their own indices)."""
        arriving = {}
        for pos in range(grad_out.shape[0]):
            g = grad_out[pos]
            if self.out_rows is None:
                parts = [(self.out_index[pos], g)]
            else:
                parts = [(m, torch.where(self._rows_at(pos, m, g), g, torch.zeros_like(g)))
                         for m in sorted(set(self.out_rows[pos]))]
            for idx, part in parts:
                arriving[idx] = part if idx not in arriving else arriving[idx] + part
        return arriving


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
    if not isinstance(lo, torch.Tensor) and not isinstance(hi, torch.Tensor):
        if hi > lo:  # floats: no tensors (~100 us a call); NaN was refused by time_arg
            return
        raise ValueError(f"{message}; got {lo_name}={lo:g}, {hi_name}={hi:g}")
    a = lo.detach().cpu() if isinstance(lo, torch.Tensor) else torch.tensor(lo, dtype=torch.float64)
    b = hi.detach().cpu() if isinstance(hi, torch.Tensor) else torch.tensor(hi, dtype=torch.float64)
    a, b = torch.broadcast_tensors(a.double(), b.double())
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
        if isinstance(save_at, torch.Tensor):
            points = save_at.reshape(-1).to(device=dev, dtype=torch.float64)
        else:
            points = torch.tensor(save, dtype=torch.float64, device=dev)
        uniform = torch.cat([uniform, points])
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
        if not bool(torch.isfinite(save_at).all()):
            raise ValueError("save_at must hold finite times")
        points = save_at.to(torch.float64)
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
    in [0, 1], else ValueError naming the argument and the first value outside. Numbers cost nothing;
    a tensor costs one host synchronisation (the bool of its range test) -- on CUDA the only one this
    adds, and reverse/generate already synchronise on a time tensor to check that it is finite."""
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
