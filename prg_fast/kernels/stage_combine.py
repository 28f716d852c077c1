"""Triton backend of the fused stage arithmetic, as the operator

    torch.ops.prg_fast.stage_combine_triton(base, terms, coeffs, alpha=1.0, out_dtype=None)
        = alpha * base + sum_j coeffs[j] * terms[j]

with the schema and semantics of the C++ operator prg_fast::stage_combine (csrc/prg_fast.cpp):
accumulated in float32 (float64 when base, the terms or out_dtype is float64), written in
out_dtype (default: base's dtype), at most 8 terms of one dtype, every shape equal to base's.

It is a `torch.library.triton_op`, so torch.compile sees the Triton kernel itself; its autograd
formula is the shared one of `prg_fast.kernels.op_rules` (also the C++ operator's). The kernel runs on CUDA tensors,
and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported; slow, for tests).

`stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None)` has the signature of
`prg_fast.ode.reference.stage_combine` and is what `prg_fast.ode.backends` calls (which chains sums of
more than 8 terms). `stage_combine_rows(base, terms, coeffs, out_dtype=None)` is the per-row
operator prg_fast::stage_combine_rows_triton (the semantics of the C++ prg_fast::stage_combine_rows).

Without Triton this module still imports: `IMPORT_ERROR` then says why, and nothing that needs
Triton is defined.
"""
import contextlib
import math
import struct
from typing import List, Optional, Sequence, Tuple

import torch

from .op_rules import accumulate_dtype, register_combine_op, register_rows_op

QUALNAME = "prg_fast::stage_combine_triton"
ROWS_QUALNAME = "prg_fast::stage_combine_rows_triton"
MAX_TERMS = 8  # kernel slots; the same limit as the C++ kernels (csrc/stage_combine.h)
BLOCK = 1024
NUM_WARPS = 4

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16"}

IMPORT_ERROR: Optional[str] = None
try:
    import triton
    import triton.language as tl
except ImportError:
    IMPORT_ERROR = "triton not installed (pip install triton)"
except Exception as e:  # a broken installation (no backend, incompatible driver, ...)
    IMPORT_ERROR = f"triton is installed but not importable ({type(e).__name__}: {e})"

if IMPORT_ERROR is None and not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
    IMPORT_ERROR = f"torch {torch.__version__} has no torch.library.triton_op/wrap_triton (needs torch>=2.6)"


def _name(dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _fail(msg: str) -> None:
    # RuntimeError, like TORCH_CHECK in the C++ kernels, so every backend fails the same way.
    raise RuntimeError(f"stage_combine: {msg}")


def check_inputs(base: torch.Tensor, terms: Sequence[torch.Tensor], coeffs: Sequence[float], out_dtype) -> None:
    """The checks of csrc/stage_combine.h, with the same messages."""
    if base.dtype not in _FLOATS:
        _fail(f"base must be float32, float64, float16 or bfloat16, got {_name(base.dtype)}")
    if len(terms) != len(coeffs):
        _fail(f"coeffs must have one entry per term, got {len(coeffs)} coeffs for {len(terms)} terms")
    if len(terms) > MAX_TERMS:
        _fail(f"at most {MAX_TERMS} terms per call, got {len(terms)}")
    for j, t in enumerate(terms):
        if t.device != base.device:
            _fail(f"terms[{j}] is on {t.device} but base is on {base.device}")
        if t.shape != base.shape:
            _fail(f"terms[{j}] has shape {list(t.shape)} but base has shape {list(base.shape)}")
        if t.dtype not in _FLOATS:
            _fail(f"terms[{j}] must be float32, float64, float16 or bfloat16, got {_name(t.dtype)}")
        if t.dtype != terms[0].dtype:
            _fail(f"all terms must share one dtype, terms[0] is {_name(terms[0].dtype)} and terms[{j}] is {_name(t.dtype)}")
    if out_dtype is not None and out_dtype not in _FLOATS:
        _fail(f"out_dtype must be float32, float64, float16 or bfloat16, got {_name(out_dtype)}")


def split_coefficient(c: float) -> Tuple[float, float, float]:
    """(hi, mid, lo), three float32-representable numbers with hi + mid + lo == c exactly.

    Triton passes Python floats to kernels as float32 (the JIT, and Inductor for user kernels),
    which would round float64 coefficients. The kernel rebuilds c in float64 as (hi + mid) + lo,
    which is exact (53 <= 3 * 24 bits) for 2**-77 <= |c| < 2**128 (smaller ones lose their last
    bits to float32 underflow); in float32 it uses hi = float32(c), the rounding PyTorch applies
    to a Python scalar times a float32 tensor.
    """
    c = float(c)
    if not math.isfinite(c):
        return c, 0.0, 0.0
    try:
        hi = struct.unpack("f", struct.pack("f", c))[0]
    except OverflowError:
        hi = math.inf
    if math.isinf(hi):
        _fail(f"coefficient {c!r} is outside the float32 range that the Triton kernel takes")
    r = c - hi  # exact
    mid = struct.unpack("f", struct.pack("f", r))[0]
    lo = struct.unpack("f", struct.pack("f", r - mid))[0]
    return hi, mid, lo


if IMPORT_ERROR is None:
    from torch.library import triton_op, wrap_triton

    from ..compat import functional_tensor_mode, is_traced

    try:
        from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
    except ImportError:  # pragma: no cover - very old or trimmed Triton
        _InterpretedFunction = ()

    @triton.jit
    def _coefficient(hi, mid, lo, ACC_F64: tl.constexpr):
        # tl.cast, not .to(): under the interpreter the scalars arrive as Python floats.
        if ACC_F64:
            c = (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
        else:
            c = tl.cast(hi, tl.float32)
        return c

    @triton.jit
    def _scaled_load(ptr, offs, mask, hi, mid, lo, ACC_F64: tl.constexpr):
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        if ACC_F64:
            x = x.to(tl.float64)
        else:
            x = x.to(tl.float32)
        return _coefficient(hi, mid, lo, ACC_F64) * x

    @triton.jit
    def _bfloat16_rtne(y):
        # float32 -> bfloat16, round to nearest even, in integer arithmetic: the Triton
        # interpreter (3.x) truncates in its own float32 -> bfloat16 cast.
        u = y.to(tl.uint32, bitcast=True)
        u = tl.where(y != y, 0x7FC00000, u)  # NaN -> the quiet NaN
        u = u + (((u >> 16) & 1) + 0x7FFF)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _stage_combine_kernel(
        base_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr, t4_ptr, t5_ptr, t6_ptr, t7_ptr, out_ptr, n,
        a_hi, a_mid, a_lo,
        c0_hi, c0_mid, c0_lo, c1_hi, c1_mid, c1_lo, c2_hi, c2_mid, c2_lo, c3_hi, c3_mid, c3_lo,
        c4_hi, c4_mid, c4_lo, c5_hi, c5_mid, c5_lo, c6_hi, c6_mid, c6_lo, c7_hi, c7_mid, c7_lo,
        NUM_TERMS: tl.constexpr, ACC_F64: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per BLOCK contiguous elements; unused term slots are never read.
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # the terms summed first, the base added last (the C++ kernels' rounding order)
        scaled = _scaled_load(base_ptr, offs, mask, a_hi, a_mid, a_lo, ACC_F64)
        if NUM_TERMS > 0:
            acc = _scaled_load(t0_ptr, offs, mask, c0_hi, c0_mid, c0_lo, ACC_F64)
        else:
            acc = scaled
        if NUM_TERMS > 1:
            acc = acc + _scaled_load(t1_ptr, offs, mask, c1_hi, c1_mid, c1_lo, ACC_F64)
        if NUM_TERMS > 2:
            acc = acc + _scaled_load(t2_ptr, offs, mask, c2_hi, c2_mid, c2_lo, ACC_F64)
        if NUM_TERMS > 3:
            acc = acc + _scaled_load(t3_ptr, offs, mask, c3_hi, c3_mid, c3_lo, ACC_F64)
        if NUM_TERMS > 4:
            acc = acc + _scaled_load(t4_ptr, offs, mask, c4_hi, c4_mid, c4_lo, ACC_F64)
        if NUM_TERMS > 5:
            acc = acc + _scaled_load(t5_ptr, offs, mask, c5_hi, c5_mid, c5_lo, ACC_F64)
        if NUM_TERMS > 6:
            acc = acc + _scaled_load(t6_ptr, offs, mask, c6_hi, c6_mid, c6_lo, ACC_F64)
        if NUM_TERMS > 7:
            acc = acc + _scaled_load(t7_ptr, offs, mask, c7_hi, c7_mid, c7_lo, ACC_F64)
        if NUM_TERMS > 0:
            acc = scaled + acc
        if OUT_KIND == 0:  # float32 / float64 out
            y = acc.to(out_ptr.dtype.element_ty)
        elif OUT_KIND == 1:  # float16 / bfloat16 out, through float32 like PyTorch's casts
            y = acc.to(tl.float32).to(out_ptr.dtype.element_ty)
        else:  # bfloat16 out under the interpreter
            y = _bfloat16_rtne(acc.to(tl.float32))
        tl.store(out_ptr + offs, y, mask=mask)

    INTERPRETED = isinstance(_stage_combine_kernel, _InterpretedFunction) if _InterpretedFunction else False

    def _check_device(base: torch.Tensor) -> None:
        if base.device.type == "cuda":
            return
        if base.device.type == "cpu":
            if not INTERPRETED:
                _fail(
                    "the Triton kernel got CPU tensors, which need the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before triton is first imported)"
                )
            return
        _fail(f"the Triton kernel runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), but base is on {base.device}")

    def _device_guard(base: torch.Tensor):
        # Triton launches on the current CUDA device; make that base's device (eager calls only:
        # when traced, the compiler places the launch itself).
        if (
            base.device.type == "cuda"
            and base.device.index is not None
            and not INTERPRETED
            and not is_traced(base)
        ):
            return torch.cuda.device(base.device)
        return contextlib.nullcontext()

    def _out_kind(out_dtype: torch.dtype) -> int:
        if out_dtype in (torch.float32, torch.float64):
            return 0
        # The interpreter's own float -> bfloat16 casts truncate (from float32) or are wrong (from
        # float64); float16 it does right (numpy).
        return 2 if (out_dtype == torch.bfloat16 and INTERPRETED) else 1

    def _opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    def _existing_op():
        try:
            return torch.ops.prg_fast.stage_combine_triton.default
        except (AttributeError, RuntimeError):
            return None

    if _existing_op() is None:

        @triton_op(QUALNAME, mutates_args=())
        def _stage_combine_triton(
            base: torch.Tensor,
            terms: List[torch.Tensor],
            coeffs: List[float],
            alpha: float = 1.0,
            out_dtype: Optional[torch.dtype] = None,
        ) -> torch.Tensor:
            # torch.compile traces this function (with fake tensors) to see the kernel: only
            # shapes, dtypes and devices may steer it.
            check_inputs(base, terms, coeffs, out_dtype)
            _check_device(base)
            out_dtype = base.dtype if out_dtype is None else out_dtype
            acc_f64 = accumulate_dtype(base, terms, out_dtype) == torch.float64
            base = base.contiguous()
            terms = [t.contiguous() for t in terms]
            out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
            n = base.numel()
            if n == 0:
                return out
            ptrs = terms + [base] * (MAX_TERMS - len(terms))
            scalars = list(split_coefficient(alpha))
            for c in coeffs:
                scalars += split_coefficient(c)
            scalars += [0.0] * (3 * (MAX_TERMS - len(coeffs)))
            # An interpreted kernel (TRITON_INTERPRET=1) launches eagerly as it is (torch 2.6-2.12's
            # wrap_triton refuses one; it is never traced: opaque under functionalization, below).
            # wrap_triton(kernel) stays written out here: triton_op finds the kernel for
            # torch.compile by reading this function's source.
            kernel = _stage_combine_kernel if INTERPRETED else wrap_triton(_stage_combine_kernel)
            with _device_guard(base):
                kernel[(triton.cdiv(n, BLOCK),)](
                    base, *ptrs, out, n, *scalars,
                    NUM_TERMS=len(terms), ACC_F64=acc_f64, OUT_KIND=_out_kind(out_dtype),
                    BLOCK=BLOCK, num_warps=NUM_WARPS,
                )  # fmt: skip
            return out

        # The fake kernel and autograd formula shared with the C++ operator. The fake kernel
        # replaces the one triton_op makes from the function above: that one launches the kernel
        # on fake tensors, which only works for compiled (not interpreted) Triton.
        register_combine_op(QUALNAME)

        if INTERPRETED and functional_tensor_mode() is not None:
            # triton_op decomposes the operator into its kernel when it is functionalized
            # (torch.compile, AOTAutograd). An interpreted kernel cannot be traced, so keep the
            # operator opaque there, as torch.export does: it then runs eagerly inside the graph.
            _stage_combine_triton.register_torch_dispatch(functional_tensor_mode(), _opaque)

    _op = _existing_op()

    def stage_combine(
        base: torch.Tensor,
        terms: Sequence[torch.Tensor],
        coeffs: Sequence[float],
        alpha: float = 1.0,
        out_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """alpha * base + sum_j coeffs[j] * terms[j] by the Triton kernel (the signature of
        prg_fast.ode.reference.stage_combine), at most 8 terms (prg_fast.ode.backends chains
        longer sums)."""
        return _op(base, list(terms), [float(c) for c in coeffs], float(alpha), out_dtype)

    @triton.jit
    def _rows_term(acc, ptr, c_ptr, crow, offs, mask, J: tl.constexpr, ACC_F64: tl.constexpr):
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        c = tl.load(c_ptr + crow + J, mask=mask, other=0.0)
        if ACC_F64:
            x = x.to(tl.float64)
        else:
            x = x.to(tl.float32)
        return acc + c * x

    @triton.jit
    def _stage_combine_rows_kernel(
        base_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr, t4_ptr, t5_ptr, t6_ptr, t7_ptr, out_ptr, c_ptr,
        n, inner, row_step,
        NUM_TERMS: tl.constexpr, ACC_F64: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # coeffs (acc dtype, contiguous (R, 1 + NUM_TERMS)) are read per element from its row;
        # row_step is 0 when one row serves every sample. The rounding order is the C++ kernels':
        # acc = sum_j c_j * term_j in order, then c0 * base + acc.
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        crow = (offs // inner) * row_step * (NUM_TERMS + 1)
        x = tl.load(base_ptr + offs, mask=mask, other=0.0)
        if ACC_F64:
            x = x.to(tl.float64)
        else:
            x = x.to(tl.float32)
        scaled = tl.load(c_ptr + crow, mask=mask, other=0.0) * x
        if NUM_TERMS > 0:
            acc = _rows_term(tl.zeros_like(scaled), t0_ptr, c_ptr, crow, offs, mask, 1, ACC_F64)
        else:
            acc = scaled
        if NUM_TERMS > 1:
            acc = _rows_term(acc, t1_ptr, c_ptr, crow, offs, mask, 2, ACC_F64)
        if NUM_TERMS > 2:
            acc = _rows_term(acc, t2_ptr, c_ptr, crow, offs, mask, 3, ACC_F64)
        if NUM_TERMS > 3:
            acc = _rows_term(acc, t3_ptr, c_ptr, crow, offs, mask, 4, ACC_F64)
        if NUM_TERMS > 4:
            acc = _rows_term(acc, t4_ptr, c_ptr, crow, offs, mask, 5, ACC_F64)
        if NUM_TERMS > 5:
            acc = _rows_term(acc, t5_ptr, c_ptr, crow, offs, mask, 6, ACC_F64)
        if NUM_TERMS > 6:
            acc = _rows_term(acc, t6_ptr, c_ptr, crow, offs, mask, 7, ACC_F64)
        if NUM_TERMS > 7:
            acc = _rows_term(acc, t7_ptr, c_ptr, crow, offs, mask, 8, ACC_F64)
        if NUM_TERMS > 0:
            acc = scaled + acc
        if OUT_KIND == 0:
            y = acc.to(out_ptr.dtype.element_ty)
        elif OUT_KIND == 1:
            y = acc.to(tl.float32).to(out_ptr.dtype.element_ty)
        else:
            y = _bfloat16_rtne(acc.to(tl.float32))
        tl.store(out_ptr + offs, y, mask=mask)

    def check_rows_inputs(base, terms, coeffs, out_dtype) -> None:
        """The checks of check_stage_combine_rows_inputs (csrc/stage_combine.h), same messages."""
        def fail(msg):
            raise RuntimeError(f"stage_combine_rows: {msg}")

        if base.dtype not in _FLOATS:
            fail(f"base must be float32, float64, float16 or bfloat16, got {_name(base.dtype)}")
        if base.dim() < 1:
            fail("base must have a batch (row) dimension, got a 0-dimensional tensor")
        if coeffs.dtype not in (torch.float32, torch.float64):
            fail(f"coeffs must be float32 or float64, got {_name(coeffs.dtype)}")
        if coeffs.device != base.device:
            fail(f"coeffs is on {coeffs.device} but base is on {base.device}")
        n = len(terms)
        if not (coeffs.dim() == 2 and coeffs.shape[1] == 1 + n and coeffs.shape[0] in (base.shape[0], 1)):
            fail(
                f"coeffs must have shape (B, 1 + len(terms)) or (1, 1 + len(terms)) with B = base.size(0) = "
                f"{base.shape[0]} and len(terms) = {n}, got {list(coeffs.shape)}"
            )
        if n > MAX_TERMS:
            fail(f"at most {MAX_TERMS} terms per call, got {n}")
        for j, t in enumerate(terms):
            if t.device != base.device:
                fail(f"terms[{j}] is on {t.device} but base is on {base.device}")
            if t.shape != base.shape:
                fail(f"terms[{j}] has shape {list(t.shape)} but base has shape {list(base.shape)}")
            if t.dtype not in _FLOATS:
                fail(f"terms[{j}] must be float32, float64, float16 or bfloat16, got {_name(t.dtype)}")
            if t.dtype != terms[0].dtype:
                fail(f"all terms must share one dtype, terms[0] is {_name(terms[0].dtype)} and terms[{j}] is {_name(t.dtype)}")
        if out_dtype is not None and out_dtype not in _FLOATS:
            fail(f"out_dtype must be float32, float64, float16 or bfloat16, got {_name(out_dtype)}")

    def _existing_rows_op():
        try:
            return torch.ops.prg_fast.stage_combine_rows_triton.default
        except (AttributeError, RuntimeError):
            return None

    if _existing_rows_op() is None:

        @triton_op(ROWS_QUALNAME, mutates_args=())
        def _stage_combine_rows_triton(
            base: torch.Tensor,
            terms: List[torch.Tensor],
            coeffs: torch.Tensor,
            out_dtype: Optional[torch.dtype] = None,
        ) -> torch.Tensor:
            check_rows_inputs(base, terms, coeffs, out_dtype)
            _check_device(base)
            out_dtype = base.dtype if out_dtype is None else out_dtype
            acc_f64 = accumulate_dtype(base, terms, out_dtype, coeffs) == torch.float64
            base = base.contiguous()
            terms = [t.contiguous() for t in terms]
            c = coeffs.to(torch.float64 if acc_f64 else torch.float32).contiguous()
            out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
            n = base.numel()
            if n == 0:
                return out
            ptrs = terms + [base] * (MAX_TERMS - len(terms))
            kernel = _stage_combine_rows_kernel if INTERPRETED else wrap_triton(_stage_combine_rows_kernel)
            with _device_guard(base):  # (the launch as in _stage_combine_triton)
                kernel[(triton.cdiv(n, BLOCK),)](
                    base, *ptrs, out, c, n, n // base.shape[0], 0 if c.shape[0] == 1 else 1,
                    NUM_TERMS=len(terms), ACC_F64=acc_f64, OUT_KIND=_out_kind(out_dtype),
                    BLOCK=BLOCK, num_warps=NUM_WARPS,
                )  # fmt: skip
            return out

        register_rows_op(ROWS_QUALNAME)

        if INTERPRETED and functional_tensor_mode() is not None:
            _stage_combine_rows_triton.register_torch_dispatch(functional_tensor_mode(), _opaque)

    _rows_op = _existing_rows_op()

    def stage_combine_rows(
        base: torch.Tensor,
        terms: Sequence[torch.Tensor],
        coeffs: torch.Tensor,
        out_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """Per-row coefficients by the Triton kernel (the signature of
        prg_fast.ode.reference.stage_combine_rows), at most 8 terms."""
        return _rows_op(base, list(terms), coeffs, out_dtype)

else:

    def stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None):  # noqa: D103 - stub
        raise RuntimeError(f"the Triton backend is unavailable: {IMPORT_ERROR}")

    def stage_combine_rows(base, terms, coeffs, out_dtype=None):  # noqa: D103 - stub
        raise RuntimeError(f"the Triton backend is unavailable: {IMPORT_ERROR}")
