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
from typing import Optional

import torch

from prg_fast.kernels.op_rules import register_combine_op, register_into_op, register_rows_op  # the layer below

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


# The fixed cost of a call is most of a small state's stage arithmetic: prg_fast._C's entries read
# plain tensors and numbers directly and call the operator through the dispatcher (about half the
# cost of torch.ops' boxed call, csrc/python_calls.cpp); they return NotImplemented for anything
# else (tensor subclasses, __torch_function__ modes, unusual argument types), which then goes
# through torch.ops. torch.compile traces torch.ops (is_compiling() is constant there).
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
