"""The torch.library layer: loads the compiled operators and gives them fake (meta) kernels and an
autograd formula, so they work under torch.compile and inside plain backprop.

    torch.ops.prg_fast.stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None)
        = alpha * base + sum_j coeffs[j] * terms[j]   (float32/float64 accumulation)

The package imports without the compiled part; `CPU_ERROR` / `CUDA_ERROR` say why it is missing.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

CPU_ERROR: Optional[str] = None
CUDA_ERROR: Optional[str] = None

try:
    from .. import _C  # noqa: F401  (the compiled bottom layer; loading it registers torch.ops.prg_fast.*)
except ImportError as e:  # pragma: no cover - depends on the build
    CPU_ERROR = f"compiled extension prg_fast._C not importable ({e}); build with `pip install --no-build-isolation -e .`"


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


def stage_combine(
    base: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    alpha: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The compiled operator (CPU or CUDA kernel, chosen by the device of `base`)."""
    return torch.ops.prg_fast.stage_combine.default(base, list(terms), [float(c) for c in coeffs], float(alpha), out_dtype)


def register_combine_op(qualname: str) -> None:
    """Fake kernel and autograd formula for an operator with stage_combine's schema. Shared by the
    C++ operator and the Triton one (prg_fast.kernels), which have the same semantics."""

    @torch.library.register_fake(qualname)
    def _fake(base, terms, coeffs, alpha=1.0, out_dtype=None):
        return torch.empty(base.shape, dtype=base.dtype if out_dtype is None else out_dtype, device=base.device)

    def _setup_context(ctx, inputs, output):
        base, terms, coeffs = inputs[:3]
        ctx.alpha = inputs[3] if len(inputs) > 3 else 1.0
        ctx.coeffs = list(coeffs)
        ctx.base_dtype = base.dtype
        ctx.term_dtypes = [t.dtype for t in terms]

    def _backward(ctx, grad):
        # d out / d base = alpha, d out / d terms[j] = coeffs[j]: each gradient is one scaled copy
        # (plain torch ops, so double backward works too).
        grad_base = (grad * ctx.alpha).to(ctx.base_dtype)
        grad_terms: List[torch.Tensor] = [(grad * c).to(dt) for c, dt in zip(ctx.coeffs, ctx.term_dtypes)]
        # The dispatcher drops trailing arguments left at their defaults, and the gradient tuple
        # must match the arguments it actually passed: needs_input_grad has exactly that length.
        # An empty coeffs list is a (childless) list node in autograd's structure check, not a leaf.
        grad_coeffs = [] if not ctx.coeffs else None
        return (grad_base, grad_terms, grad_coeffs) + (None,) * (len(ctx.needs_input_grad) - 3)

    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)


if HAS_OPS:
    register_combine_op("prg_fast::stage_combine")
