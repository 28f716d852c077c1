"""The stage arithmetic as the engine calls it: the compiled operators (torch.ops.prg_fast.stage_combine,
stage_combine_into, stage_combine_rows) and `Backend`, one implementation's functions behind the
methods every loop calls (prg_fast.ode.backends picks it). The operators' contracts: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from prg_fast.kernels.op_rules import (  # the layer below
    accumulate_dtype, register_combine_op, register_into_op, register_rows_op)

CPU_ERROR: Optional[str] = None
CUDA_ERROR: Optional[str] = None

try:
    from .. import _C  # the compiled bottom layer; loading it registers torch.ops.prg_fast.*
except ImportError as e:  # pragma: no cover - depends on the build
    CPU_ERROR = f"compiled extension prg_fast._C not importable ({e}); build with `pip install --no-build-isolation -e .`"
else:
    if not hasattr(_C, "stage_combine_into"):  # a build from before csrc/python_calls.cpp
        CPU_ERROR = ("compiled extension prg_fast._C is an older build without its Python entry points; rebuild "
                     "with `pip install --no-build-isolation -e .`")


def build_info() -> dict:
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


if CPU_ERROR is None:
    try:
        from .. import _C_cuda  # noqa: F401
    except ImportError as e:
        info = build_info()
        if info and not info.get("cuda_built", False):
            CUDA_ERROR = info.get("cuda_reason") or "not built with CUDA"
        elif info:
            CUDA_ERROR = f"CUDA extension built but not importable: {e}"
        else:
            CUDA_ERROR = "not built with CUDA (no build information found)"
else:
    CUDA_ERROR = CPU_ERROR

HAS_OPS = CPU_ERROR is None


# prg_fast._C's direct entries first, torch.ops when they decline: docs/engine.md, "Inside the engine": ops
_is_compiling = torch.compiler.is_compiling


def stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None) -> torch.Tensor:
    """The compiled operator (CPU or CUDA kernel, chosen by the device of `base`), with the
    signature of prg_fast.ode.reference.stage_combine."""
    if not _is_compiling():
        out = _C.stage_combine(base, terms, coeffs, alpha, out_dtype)
        if out is not NotImplemented:
            return out
    return torch.ops.prg_fast.stage_combine.default(base, terms, coeffs, alpha, out_dtype)


def stage_combine_into(base, terms, coeffs, alpha, out) -> torch.Tensor:
    """stage_combine written into `out` (no allocation; `out` may be base or a term itself).
    Records no gradient: refused when an input requires grad under grad mode. Returns `out`."""
    if _is_compiling() or _C.stage_combine_into(base, terms, coeffs, alpha, out) is NotImplemented:
        torch.ops.prg_fast.stage_combine_into.default(base, terms, coeffs, alpha, out)
    return out


def stage_combine_rows(base, terms, coeffs, out_dtype=None) -> torch.Tensor:
    """The compiled per-row operator (the signature of prg_fast.ode.reference.stage_combine_rows)."""
    return torch.ops.prg_fast.stage_combine_rows.default(base, list(terms), coeffs, out_dtype)


if HAS_OPS:
    register_combine_op("prg_fast::stage_combine", python_autograd=False)
    register_into_op("prg_fast::stage_combine_into")
    register_rows_op("prg_fast::stage_combine_rows")


MAX_TERMS = 8  # the kernels' limit (csrc/stage_combine.h, kernels/stage_combine.py)


@dataclass(frozen=True)
class Backend:
    """The stage arithmetic of one solve, any number of terms, by one implementation: `fn`, `rows_fn`
    and `into` with the signatures of prg_fast.ode.reference.stage_combine, stage_combine_rows (per-row
    tensor coefficients, for time tensors) and ops.stage_combine_into (None: the no-grad loop then
    allocates its outputs). `weighted` and `scaled` are where a float step size and a tensor one part."""

    name: str
    fn: Callable
    rows_fn: Callable
    into: Optional[Callable] = None

    def combine(self, base, terms, coeffs, alpha=1.0, out_dtype=None, out=None):
        """alpha base + sum_j coeffs[j] terms[j] (with `out`, written there by `into`, in out's dtype). Past
        MAX_TERMS terms, the terms are summed in calls of at most MAX_TERMS into a partial sum in the
        accumulation dtype, and the base is added to it last, as the kernels add it (docs/engine.md,
        "Inside the engine": ops)."""
        if len(terms) > MAX_TERMS and len(terms) == len(coeffs):  # (a mismatch: the kernel reports it)
            final = out.dtype if out is not None else base.dtype if out_dtype is None else out_dtype
            acc = accumulate_dtype(base, terms, final)
            total = self.fn(terms[0], terms[1:MAX_TERMS], coeffs[1:MAX_TERMS], coeffs[0], acc)
            for lo in range(MAX_TERMS, len(terms), MAX_TERMS):
                total = self.fn(total, terms[lo:lo + MAX_TERMS], coeffs[lo:lo + MAX_TERMS], 1.0, acc)
            base, terms, coeffs, alpha, out_dtype = total, [base], [alpha], 1.0, final
        if out is not None:
            self.into(base, terms, coeffs, alpha, out)
            return out
        return self.fn(base, terms, coeffs, alpha, out_dtype)

    def combine_rows(self, base, terms, coeffs, out_dtype=None):
        """Per-row coefficients (coeffs (R, 1 + len(terms))), chained as `combine`: each partial sum
        enters the next call with coefficient 1 in every row, the base the last one."""
        terms = list(terms)
        if len(terms) <= MAX_TERMS or not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2 \
                or coeffs.shape[1] != 1 + len(terms):
            return self.rows_fn(base, terms, coeffs, out_dtype)  # the kernel reports bad input
        final = base.dtype if out_dtype is None else out_dtype
        acc, ones = accumulate_dtype(base, terms, final, coeffs), torch.ones_like(coeffs[:, :1])
        total = self.rows_fn(terms[0], terms[1:MAX_TERMS], coeffs[:, 1:MAX_TERMS + 1], acc)
        for lo in range(MAX_TERMS, len(terms), MAX_TERMS):
            rows = torch.cat([ones, coeffs[:, lo + 1:lo + 1 + MAX_TERMS]], 1)
            total = self.rows_fn(total, terms[lo:lo + MAX_TERMS], rows, acc)
        return self.rows_fn(total, [base], torch.cat([ones, coeffs[:, :1]], 1), final)

    def weighted(self, base, terms, weights, h, out_dtype, state_dtype):
        """base + h sum_j w_j terms_j. A float h folds into the coefficients (one fused call); a
        tensor h (shared, or (B,) per row) gives per-row coefficients [1, h w_0, ...] computed in
        float64 and rounded once to the state dtype, as the float path rounds h * w once."""
        if not isinstance(h, torch.Tensor):
            return self.combine(base, terms, [h * w for w in weights], 1.0, out_dtype)
        h = h.reshape(-1)
        rows = torch.stack([torch.ones_like(h)] + [h * w for w in weights], 1).to(state_dtype)
        return self.combine_rows(base, terms, rows, out_dtype)

    def scaled(self, base, terms, weights, alpha, h, out_dtype, state_dtype):
        """(h (alpha base + sum_j w_j terms_j), and on a tensor h the unscaled sum e (state
        dtype), which time gradients read; None on a float h, folded into the coefficients)."""
        if not isinstance(h, torch.Tensor):
            return self.combine(base, terms, [h * w for w in weights], h * alpha, out_dtype), None
        e = self.combine(base, terms, weights, alpha, state_dtype)
        return self.combine_rows(e, [], h.reshape(-1, 1).to(state_dtype), out_dtype), e
