"""Pure-PyTorch oracle, every kernel and backend is tested against: written for clarity, not speed
(no fusion, no custom ops, ordinary autograd)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from prg_fast.kernels.op_rules import accumulate_dtype  # noqa: F401  (re-exported: the dtype rule every backend follows)

from .solvers import SOLVERS, ButcherTableau


def stage_combine(base: torch.Tensor, terms: Sequence[torch.Tensor], coeffs: Sequence[float], alpha: float = 1.0,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """alpha * base + sum_j coeffs[j] * terms[j], accumulated in float32/float64, cast to out_dtype: the
    terms summed first, the base added last (the increment rounds at its own scale)."""
    out_dtype = base.dtype if out_dtype is None else out_dtype
    acc = accumulate_dtype(base, terms, out_dtype)
    increment = None
    for c, t in zip(coeffs, terms):
        increment = c * t.to(acc) if increment is None else increment + c * t.to(acc)
    out = base.to(acc) * alpha
    return (out if increment is None else out + increment).to(out_dtype)


def stage_combine_rows(base: torch.Tensor, terms: Sequence[torch.Tensor], coeffs: torch.Tensor,
                       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per-row coefficients: out[b] = coeffs[r, 0] * base[b] + sum_j coeffs[r, j + 1] * terms[j][b]
    with r = b, or r = 0 when coeffs has one row. Accumulated in float64 when base, the terms,
    out_dtype or coeffs is float64, else float32; cast to out_dtype (default base.dtype)."""
    out_dtype = base.dtype if out_dtype is None else out_dtype
    acc = accumulate_dtype(base, terms, out_dtype, coeffs)
    c = coeffs.to(acc)
    view = (c.shape[0],) + (1,) * (base.dim() - 1)
    increment = None  # the terms first, the base last
    for j, t in enumerate(terms):
        term = c[:, j + 1].reshape(view) * t.to(acc)
        increment = term if increment is None else increment + term
    out = c[:, 0].reshape(view) * base.to(acc)
    return (out if increment is None else out + increment).to(out_dtype)


def rk_solve(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: Sequence[float],
    method: str = "rk4",
) -> torch.Tensor:
    """States at every point of `grid` (stacked on dim 0) by the explicit RK method `method`,
    differentiated by ordinary autograd. The textbook loop, one line per formula."""
    tab = method if isinstance(method, ButcherTableau) else SOLVERS[method]
    states = [x]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        ks = []
        for i in range(tab.stages):
            xi = x
            for j in range(i):
                if tab.a[i][j] != 0.0:
                    xi = xi + h * tab.a[i][j] * ks[j]
            tt = torch.full((x.shape[0],), t0 + tab.c[i] * h, dtype=x.dtype, device=x.device)
            ks.append(func(tt, xi))
        for i in range(tab.stages):
            if tab.b[i] != 0.0:
                x = x + h * tab.b[i] * ks[i]
        states.append(x)
    return torch.stack(states)
