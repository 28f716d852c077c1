"""Fake kernels, autograd formulas and vmap rules of the stage-combination operators.

Shared by the C++ operators (prg_fast::stage_combine, prg_fast::stage_combine_rows, registered by
prg_fast.ode.ops) and the Triton ones (prg_fast.kernels.stage_combine), which have the same
semantics. Plain torch only: importing this module needs neither Triton nor the compiled
extension, and it imports nothing of the engine (kernels/ is the bottom layer).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def accumulate_dtype(
    base: torch.Tensor,
    terms: Sequence[torch.Tensor],
    out_dtype: Optional[torch.dtype],
    coeffs: Optional[torch.Tensor] = None,
) -> torch.dtype:
    """float64 when anything involved (base, terms, out_dtype, per-row coeffs) is float64, else
    float32 (also for bf16/fp16 inputs). The one statement of the rule every backend follows."""
    dtypes = [base.dtype, base.dtype if out_dtype is None else out_dtype] + [t.dtype for t in terms]
    if coeffs is not None:
        dtypes.append(coeffs.dtype)
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_devices(name: str, base: torch.Tensor, terms: Sequence[torch.Tensor],
                  **others: torch.Tensor) -> None:
    """Every tensor on base's device, as the device kernels check (csrc/stage_combine.h). The fake
    kernels run whenever one input is a meta tensor -- also beside real ones -- and would
    otherwise hand back an uninitialised tensor on base's device for a meta term."""
    named = [(f"terms[{j}]", t) for j, t in enumerate(terms)] + list(others.items())
    for what, t in named:
        if t.device != base.device:
            raise RuntimeError(f"{name}: {what} is on {t.device} but base is on {base.device}")


def register_combine_op(qualname: str, python_autograd: bool = True) -> None:
    """Fake kernel and autograd formula for an operator with stage_combine's schema. Shared by the
    C++ operator and the Triton one (prg_fast.kernels), which have the same semantics. The C++
    operator brings its own autograd kernel (csrc/autograd.cpp; python_autograd=False): that one
    costs nothing on a call that needs no gradient, where this Python formula costs an
    autograd.Function call (about 20 us, also under no_grad)."""

    @torch.library.register_fake(qualname)
    def _fake(base, terms, coeffs, alpha=1.0, out_dtype=None):
        check_devices("stage_combine", base, terms)
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


def register_into_op(qualname: str) -> None:
    """Fake kernel for an operator with stage_combine_into's schema (it returns nothing: the
    result is its `out` argument), so it traces under torch.compile."""

    @torch.library.register_fake(qualname)
    def _fake(base, terms, coeffs, alpha, out):
        check_devices("stage_combine_into", base, terms, out=out)
        return None


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


def register_rows_op(qualname: str) -> None:
    """Fake kernel and autograd formula for an operator with stage_combine_rows's schema (the C++
    operator and the Triton one). Gradients reach base, the terms and coeffs, so time values the
    coefficients are computed from get exact gradients by plain backprop."""

    @torch.library.register_fake(qualname)
    def _fake(base, terms, coeffs, out_dtype=None):
        check_devices("stage_combine_rows", base, terms, coeffs=coeffs)
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
