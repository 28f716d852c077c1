"""The torch.library layer: loads the compiled operators and gives them fake (meta) kernels and an
autograd formula, so they work under torch.compile and inside plain backprop.

    torch.ops.prg_fast.stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None)
        = alpha * base + sum_j coeffs[j] * terms[j]   (float32/float64 accumulation)

    torch.ops.prg_fast.stage_combine_into(base, terms, coeffs, alpha, out)
        the same sum written into `out` (a tensor the caller owns; its dtype is the output dtype)

    torch.ops.prg_fast.stage_combine_rows(base, terms, coeffs, out_dtype=None)
        out[b] = coeffs[r, 0] * base[b] + sum_j coeffs[r, j+1] * terms[j][b]   (r = b, or 0 if R == 1)

The package imports without the compiled part; `CPU_ERROR` / `CUDA_ERROR` say why it is missing.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

from .reference import accumulate_dtype

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
    return torch.ops.prg_fast.stage_combine.default(base, terms, coeffs, alpha, out_dtype)


def stage_combine_into(
    base: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    alpha: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """stage_combine written into `out` (no allocation; `out` may be base or a term itself).
    Records no gradient: refused when an input requires grad under grad mode. Returns `out`."""
    torch.ops.prg_fast.stage_combine_into.default(base, terms, coeffs, alpha, out)
    return out


def register_combine_op(qualname: str, python_autograd: bool = True) -> None:
    """Fake kernel and autograd formula for an operator with stage_combine's schema. Shared by the
    C++ operator and the Triton one (prg_fast.kernels), which have the same semantics. The C++
    operator brings its own autograd kernel (csrc/autograd.cpp; python_autograd=False): that one
    costs nothing on a call that needs no gradient, where this Python formula costs an
    autograd.Function call."""

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

    if python_autograd:
        torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)

    op = _op(qualname)

    def _vmap(info, in_dims, base, terms, coeffs, alpha=1.0, out_dtype=None):
        # elementwise in every dimension: the vmapped dimension is one more (unbatched tensors expanded)
        base_dim, term_dims = in_dims[0], in_dims[1]
        tensors = _batched_first([base, *terms], [base_dim, *(term_dims or [None] * len(terms))], info.batch_size)
        return op(tensors[0], tensors[1:], coeffs, alpha, out_dtype), 0

    torch.library.register_vmap(qualname, _vmap)


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _batched_first(tensors: Sequence[torch.Tensor], dims: Sequence[Optional[int]], size: int) -> List[torch.Tensor]:
    """Each tensor with its vmapped dimension first (an unbatched one expanded to `size`, a view: the
    kernels read any strides)."""
    out = []
    for t, d in zip(tensors, dims):
        out.append(t.unsqueeze(0).expand(size, *t.shape) if d is None else t.movedim(d, 0))
    return out


def stage_combine_rows(
    base: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The compiled per-row operator (CPU or CUDA kernel, chosen by the device of `base`)."""
    return torch.ops.prg_fast.stage_combine_rows.default(base, list(terms), coeffs, out_dtype)


def register_rows_op(qualname: str) -> None:
    """Fake kernel and autograd formula for an operator with stage_combine_rows's schema (the C++
    operator and the Triton one). Gradients reach base, the terms and coeffs, so time values the
    coefficients are computed from get exact gradients by plain backprop."""

    @torch.library.register_fake(qualname)
    def _fake(base, terms, coeffs, out_dtype=None):
        return torch.empty(base.shape, dtype=base.dtype if out_dtype is None else out_dtype, device=base.device)

    def _setup_context(ctx, inputs, output):
        base, terms, coeffs = inputs[:3]
        out_dtype = inputs[3] if len(inputs) > 3 else None
        ctx.acc = accumulate_dtype(base, terms, out_dtype, coeffs)
        ctx.base_dtype = base.dtype
        ctx.term_dtypes = [t.dtype for t in terms]
        ctx.n_terms = len(terms)
        # base and terms are only needed for coeffs' gradient.
        ctx.save_for_backward(coeffs, base, *terms)

    def _backward(ctx, grad):
        coeffs, base, *terms = ctx.saved_tensors
        acc = ctx.acc
        rows = coeffs.shape[0]
        view = (rows,) + (1,) * (grad.dim() - 1)
        c = coeffs.to(acc)
        g = grad.to(acc)
        grad_base = (g * c[:, 0].reshape(view)).to(ctx.base_dtype)
        grad_terms: List[torch.Tensor] = [
            (g * c[:, j + 1].reshape(view)).to(dt) for j, dt in enumerate(ctx.term_dtypes)
        ]
        grad_coeffs = None
        if ctx.needs_input_grad[2]:

            def row_dot(x):
                s = (g * x.to(acc)).reshape(g.shape[0], -1).sum(1)
                return s.sum(0, keepdim=True) if rows == 1 else s

            grad_coeffs = torch.stack([row_dot(base)] + [row_dot(t) for t in terms], 1).to(coeffs.dtype)
        return (grad_base, grad_terms, grad_coeffs) + (None,) * (len(ctx.needs_input_grad) - 3)

    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)

    op = _op(qualname)

    def _vmap(info, in_dims, base, terms, coeffs, out_dtype=None):
        # rows are base's dim 0 (the solve's batch B); under vmap (size V) the rows become the V*B
        # rows of the flattened (V, B, ...) tensors, with coefficients per (v, b)
        base_dim, term_dims, coeff_dim = in_dims[:3]
        V = info.batch_size
        tensors = _batched_first([base, *terms], [base_dim, *(term_dims or [None] * len(terms))], V)
        B = tensors[0].shape[1]
        c = coeffs.unsqueeze(0).expand(V, *coeffs.shape) if coeff_dim is None else coeffs.movedim(coeff_dim, 0)
        c = c.expand(V, B, c.shape[-1]).reshape(V * B, c.shape[-1])
        flat = [t.reshape(V * B, *t.shape[2:]) for t in tensors]
        out = op(flat[0], flat[1:], c, out_dtype)
        return out.reshape(V, B, *out.shape[1:]), 0

    torch.library.register_vmap(qualname, _vmap)


def register_into_op(qualname: str) -> None:
    """Fake kernel for an operator with stage_combine_into's schema (it returns nothing: the
    result is its `out` argument), so it traces under torch.compile."""

    @torch.library.register_fake(qualname)
    def _fake(base, terms, coeffs, alpha, out):
        return None


if HAS_OPS:
    register_combine_op("prg_fast::stage_combine", python_autograd=False)
    register_into_op("prg_fast::stage_combine_into")
    register_rows_op("prg_fast::stage_combine_rows")
