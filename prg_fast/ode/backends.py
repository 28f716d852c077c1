"""Which implementation of the fused stage arithmetic runs, and why the others cannot.

A backend is a function with the signature of `prg_fast.ode.reference.stage_combine` (`resolve`),
or of `prg_fast.ode.reference.stage_combine_rows` (`resolve_rows`, per-row coefficients).
Kernels take at most `MAX_TERMS` terms per call; longer sums are chained here, for every backend,
through a partial sum kept in the accumulation dtype (so the result is the one long sum's).
"auto" picks cuda > triton > cpu > reference among those that are built and fit the tensor's
device (interpreted Triton on the CPU is for tests only and is never picked by "auto").
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import ops, reference

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

MAX_TERMS = 8  # the kernels' limit (csrc/stage_combine.h, kernels/stage_combine.py)

_TRITON_ERROR: Optional[str] = None
_triton_combine = None
_triton_combine_rows = None


def _load_triton():
    global _TRITON_ERROR, _triton_combine, _triton_combine_rows
    if _triton_combine is not None or _TRITON_ERROR is not None:
        return
    try:
        from prg_fast.kernels import stage_combine as triton_module  # installed from kernels/ (below the engine)
    except ImportError as e:
        _TRITON_ERROR = f"Triton kernels not importable ({e}); install triton"
        return
    if getattr(triton_module, "IMPORT_ERROR", None):
        _TRITON_ERROR = triton_module.IMPORT_ERROR
        return
    _triton_combine = triton_module.stage_combine
    _triton_combine_rows = triton_module.stage_combine_rows


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    if name == "reference":
        return None
    if name == "cpu":
        if ops.CPU_ERROR:
            return ops.CPU_ERROR
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, but x is on {device}"
        return None
    if name == "cuda":
        if ops.CUDA_ERROR:
            return ops.CUDA_ERROR
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, but x is on {device}"
        return None
    if name == "triton":
        _load_triton()
        if _TRITON_ERROR:
            return _TRITON_ERROR
        if device.type == "cpu" and not triton_interpreted():
            return "backend 'triton' on CPU tensors needs the interpreter (TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA tensors, but x is on {device}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def under_transform() -> bool:
    """True inside torch.func transforms (vmap, grad, jvp, jacrev, jacfwd, ...) or a
    torch.autograd.forward_ad dual level. PyTorch gives a compiled operator with a registered
    backward formula no forward-mode derivative -- the tangent silently comes out zero -- and
    refuses functorch's grad transforms on it, so there the pure-PyTorch reference (the same
    arithmetic; every transform works on it) runs instead. (Private PyTorch flags, read only here;
    python_tests/test_api.py checks jvp/jacfwd/jacrev results against the reference.)"""
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


def _transform_safe(fn: Callable, ref: Callable) -> Callable:
    def call(*args):
        return ref(*args) if under_transform() else fn(*args)

    call.__wrapped__ = fn
    return call


def _implementation(name: str) -> Tuple[Callable, Optional[Callable]]:
    """(the backend's function, what runs instead under a transform: None for the reference)."""
    if name == "reference":
        return reference.stage_combine, None
    if name in ("cpu", "cuda"):
        return ops.stage_combine, reference.stage_combine
    if name == "triton":
        _load_triton()
        return _triton_combine, reference.stage_combine
    raise AssertionError(name)


def _rows_implementation(name: str) -> Callable:
    if name == "reference":
        return reference.stage_combine_rows
    if name in ("cpu", "cuda"):
        return _transform_safe(ops.stage_combine_rows, reference.stage_combine_rows)
    if name == "triton":
        _load_triton()
        return _transform_safe(_triton_combine_rows, reference.stage_combine_rows)
    raise AssertionError(name)


def chained(fn: Callable, under_transforms: Optional[Callable] = None) -> Callable:
    """`fn` (stage_combine's signature) extended to any number of terms: the first MAX_TERMS go
    into a partial sum written in the accumulation dtype, which is the next call's base. Under a
    torch.func transform `under_transforms` runs instead (when given). One Python frame on the
    common path: this wrapper's cost is paid on every stage of every step."""

    def combine(base, terms, coeffs, alpha=1.0, out_dtype=None):
        impl = under_transforms if under_transforms is not None and under_transform() else fn
        if len(terms) <= MAX_TERMS or len(terms) != len(coeffs):  # the kernel reports a mismatch
            return impl(base, terms, coeffs, alpha, out_dtype)
        terms, coeffs = list(terms), list(coeffs)
        final = base.dtype if out_dtype is None else out_dtype
        acc = reference.accumulate_dtype(base, terms, final)
        while len(terms) > MAX_TERMS:
            base = impl(base, terms[:MAX_TERMS], coeffs[:MAX_TERMS], alpha, acc)
            terms, coeffs, alpha = terms[MAX_TERMS:], coeffs[MAX_TERMS:], 1.0
        return impl(base, terms, coeffs, alpha, final)

    combine.__wrapped__ = fn  # the backend's own function (one kernel call)
    return combine


def chained_rows(fn: Callable) -> Callable:
    """`fn` (stage_combine_rows's signature) extended to any number of terms, as `chained`; the
    partial sum enters the next call with coefficient 1 in every row."""

    def combine(base, terms, coeffs, out_dtype=None):
        terms = list(terms)
        if len(terms) <= MAX_TERMS or not isinstance(coeffs, torch.Tensor) or coeffs.dim() != 2 or coeffs.shape[1] != 1 + len(terms):
            return fn(base, terms, coeffs, out_dtype)  # the kernel reports bad input
        final = base.dtype if out_dtype is None else out_dtype
        acc = reference.accumulate_dtype(base, terms, final, coeffs)
        ones = torch.ones(coeffs.shape[0], 1, dtype=coeffs.dtype, device=coeffs.device)
        base = fn(base, terms[:MAX_TERMS], coeffs[:, : 1 + MAX_TERMS], acc)
        terms, coeffs = terms[MAX_TERMS:], coeffs[:, 1 + MAX_TERMS :]
        while len(terms) > MAX_TERMS:
            base = fn(base, terms[:MAX_TERMS], torch.cat([ones, coeffs[:, :MAX_TERMS]], 1), acc)
            terms, coeffs = terms[MAX_TERMS:], coeffs[:, MAX_TERMS:]
        return fn(base, terms, torch.cat([ones, coeffs], 1), final)

    combine.__wrapped__ = getattr(fn, "__wrapped__", fn)
    return combine


def _pick(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            if unavailable_reason(name, device) is None:
                return name
        raise AssertionError("the reference backend is always available")
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {why}")
    return backend


def resolve(backend: str, device: torch.device) -> Tuple[str, Callable]:
    """(name, combine function) for the requested backend on `device`; raises if unavailable.
    The function takes any number of terms (see `chained`)."""
    name = _pick(backend, device)
    return name, chained(*_implementation(name))


def into_function(name: str) -> Optional[Callable]:
    """stage_combine_into (the sum written into a tensor the caller owns, no autograd) for a
    resolved backend name, or None where there is none (reference, triton) or under a torch.func
    transform (the compiled op has no rules there)."""
    if name in ("cpu", "cuda") and not under_transform():
        return ops.stage_combine_into
    return None


def resolve_rows(backend: str, device: torch.device) -> Tuple[str, Callable]:
    """(name, fn) with fn(base, terms, coeffs, out_dtype=None) the per-row combination
    (`prg_fast.ode.reference.stage_combine_rows`) of the requested backend on `device`; the same
    selection and reasons as `resolve`, any number of terms."""
    name = _pick(backend, device)
    return name, chained_rows(_rows_implementation(name))


def status() -> Dict[str, Optional[str]]:
    """Each backend -> None if built, else why not (independent of any tensor's device)."""
    _load_triton()
    return {
        "cpu": ops.CPU_ERROR,
        "cuda": ops.CUDA_ERROR,
        "triton": _TRITON_ERROR,
        "reference": None,
    }
