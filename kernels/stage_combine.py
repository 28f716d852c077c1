"""Triton backend of the fused stage arithmetic, as the operator

    torch.ops.prg_fast.stage_combine_triton(base, terms, coeffs, alpha=1.0, out_dtype=None)
        = alpha * base + sum_j coeffs[j] * terms[j]

with the schema and semantics of the C++ operator prg_fast::stage_combine (csrc/prg_fast.cpp):
accumulated in float32 (float64 when base, the terms or out_dtype is float64), written in
out_dtype (default: base's dtype), at most 8 terms of one dtype, every shape equal to base's.

It is a `torch.library.triton_op`, so torch.compile sees the Triton kernel itself; its autograd
formula is the shared one of `prg_fast.ode.ops.register_combine_op`. The kernel runs on CUDA tensors,
and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported; slow, for tests).

`stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None)` has the signature of
`prg_fast.ode.reference.stage_combine` and is what `prg_fast.ode.backends` calls; it splits sums of more
than 8 terms into chained calls (the partial sum is kept in the accumulation dtype, so the result
is the same as one long sum).

Without Triton this module still imports: `IMPORT_ERROR` then says why, and nothing that needs
Triton is defined.
"""
import contextlib
import math
import struct
from typing import List, Optional, Sequence, Tuple

import torch

QUALNAME = "prg_fast::stage_combine_triton"
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


def accumulate_in_double(base: torch.Tensor, terms: Sequence[torch.Tensor], out_dtype: torch.dtype) -> bool:
    return base.dtype == torch.float64 or out_dtype == torch.float64 or (len(terms) > 0 and terms[0].dtype == torch.float64)


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
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
    from torch.library import triton_op, wrap_triton

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
        acc = _scaled_load(base_ptr, offs, mask, a_hi, a_mid, a_lo, ACC_F64)
        if NUM_TERMS > 0:
            acc = acc + _scaled_load(t0_ptr, offs, mask, c0_hi, c0_mid, c0_lo, ACC_F64)
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
            and not isinstance(base, (FakeTensor, FunctionalTensor))
        ):
            return torch.cuda.device(base.device)
        return contextlib.nullcontext()

    def _out_kind(out_dtype: torch.dtype) -> int:
        if out_dtype in (torch.float32, torch.float64):
            return 0
        # The interpreter's own float -> bfloat16 casts truncate (from float32) or are wrong (from
        # float64); float16 it does right (numpy).
        return 2 if (out_dtype == torch.bfloat16 and INTERPRETED) else 1

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
            acc_f64 = accumulate_in_double(base, terms, out_dtype)
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
            with _device_guard(base):
                wrap_triton(_stage_combine_kernel)[(triton.cdiv(n, BLOCK),)](
                    base, *ptrs, out, n, *scalars,
                    NUM_TERMS=len(terms), ACC_F64=acc_f64, OUT_KIND=_out_kind(out_dtype),
                    BLOCK=BLOCK, num_warps=NUM_WARPS,
                )  # fmt: skip
            return out

        # The fake kernel and autograd formula shared with the C++ operator. The fake kernel
        # replaces the one triton_op makes from the function above: that one launches the kernel
        # on fake tensors, which only works for compiled (not interpreted) Triton.
        from prg_fast.ode.ops import register_combine_op

        register_combine_op(QUALNAME)

        if INTERPRETED:
            # triton_op decomposes the operator into its kernel when it is functionalized
            # (torch.compile, AOTAutograd). An interpreted kernel cannot be traced, so keep the
            # operator opaque there, as torch.export does: it then runs eagerly inside the graph.
            def _opaque(mode, op, types, args, kwargs):
                return mode.__torch_dispatch__(op, types, args, kwargs)

            _stage_combine_triton.register_torch_dispatch(FunctionalTensorMode, _opaque)

    _op = _existing_op()

    def stage_combine(
        base: torch.Tensor,
        terms: Sequence[torch.Tensor],
        coeffs: Sequence[float],
        alpha: float = 1.0,
        out_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """alpha * base + sum_j coeffs[j] * terms[j] by the Triton kernel (the signature of
        prg_fast.ode.reference.stage_combine). More than 8 terms are chained through a partial sum
        in the accumulation dtype."""
        terms = list(terms)
        coeffs = [float(c) for c in coeffs]
        alpha = float(alpha)
        if len(terms) > MAX_TERMS and len(terms) == len(coeffs):
            final = base.dtype if out_dtype is None else out_dtype
            check_inputs(base, terms[:MAX_TERMS], coeffs[:MAX_TERMS], final)
            acc = torch.float64 if accumulate_in_double(base, terms, final) else torch.float32
            while len(terms) > MAX_TERMS:
                base = _op(base, terms[:MAX_TERMS], coeffs[:MAX_TERMS], alpha, acc)
                terms, coeffs, alpha = terms[MAX_TERMS:], coeffs[MAX_TERMS:], 1.0
            out_dtype = final
        return _op(base, terms, coeffs, alpha, out_dtype)

else:

    def stage_combine(base, terms, coeffs, alpha=1.0, out_dtype=None):  # noqa: D103 - stub
        raise RuntimeError(f"the Triton backend is unavailable: {IMPORT_ERROR}")
