"""Which implementation of the fused stage arithmetic runs, and why the others cannot.

A solve's `Backend` (`select`) holds a function with the signature of
`prg_fast.ode.reference.stage_combine` and one with that of `stage_combine_rows` (per-row
coefficients), and hides which of the two a float or a tensor step size needs.
Kernels take at most `MAX_TERMS` terms per call; longer sums are chained here, for every backend,
through a partial sum kept in the accumulation dtype (so the result is the one long sum's).
"auto" picks cuda > triton > cpu > reference among those that are built and fit the tensor's
device (interpreted Triton on the CPU is for tests only and is never picked by "auto").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from ..compat import under_transform
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
        from prg_fast.kernels import stage_combine as triton_module  # the layer below the engine
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
    if name in ("cpu", "cuda"):
        why = ops.CPU_ERROR if name == "cpu" else ops.CUDA_ERROR
        if why is None and device.type != name:
            why = f"backend {name!r} runs on {name.upper()} tensors, but x is on {device}"
        return why
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


def _transform_safe(fn: Callable, ref: Callable) -> Callable:
    def call(base, terms, coeffs, *rest):
        return ref(base, terms, coeffs, *rest) if under_transform() else fn(base, terms, coeffs, *rest)

    call.__wrapped__ = fn
    return call


def _implementations(name: str) -> Tuple[Callable, Callable]:
    """(combine, combine_rows) of backend `name`; the pure-PyTorch reference under transforms."""
    refs = (reference.stage_combine, reference.stage_combine_rows)
    if name == "reference":
        return refs
    if name == "triton":
        _load_triton()
        fns = (_triton_combine, _triton_combine_rows)
    else:  # cpu, cuda: the compiled operators (one dispatch, by the tensors' device)
        fns = (ops.stage_combine, ops.stage_combine_rows)
    return _transform_safe(fns[0], refs[0]), _transform_safe(fns[1], refs[1])


def chained(fn: Callable) -> Callable:
    """`fn` (stage_combine's signature) extended to any number of terms: the first MAX_TERMS go
    into a partial sum written in the accumulation dtype, which is the next call's base."""

    def combine(base, terms, coeffs, alpha=1.0, out_dtype=None):
        if not isinstance(terms, (list, tuple)) or not isinstance(coeffs, (list, tuple)):
            terms, coeffs = list(terms), list(coeffs)
        if len(terms) <= MAX_TERMS or len(terms) != len(coeffs):  # the kernel reports a mismatch
            return fn(base, terms, coeffs, alpha, out_dtype)
        terms, coeffs = list(terms), list(coeffs)
        final = base.dtype if out_dtype is None else out_dtype
        acc = reference.accumulate_dtype(base, terms, final)
        while len(terms) > MAX_TERMS:
            base = fn(base, terms[:MAX_TERMS], coeffs[:MAX_TERMS], alpha, acc)
            terms, coeffs, alpha = terms[MAX_TERMS:], coeffs[MAX_TERMS:], 1.0
        return fn(base, terms, coeffs, alpha, final)

    combine.__wrapped__ = getattr(fn, "__wrapped__", fn)  # the backend's own function (one kernel call)
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


@dataclass(frozen=True)
class Backend:
    """The stage arithmetic of one solve, any number of terms: `combine` (float coefficients, the
    fast path) and `combine_rows` (per-row tensor coefficients, for time tensors) of one
    implementation. `weighted` and `scaled` are where a float step size and a tensor one part."""

    name: str
    combine: Callable
    combine_rows: Optional[Callable] = None

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


def select(backend: str, device: torch.device) -> Backend:
    """The requested backend on `device`; raises if unavailable."""
    name = _pick(backend, device)
    combine, combine_rows = _implementations(name)
    return Backend(name, chained(combine), chained_rows(combine_rows))


def into_function(name: str) -> Optional[Callable]:
    """stage_combine_into (the sum written into a tensor the caller owns, no autograd) for a
    selected backend name, or None where there is none (reference, triton) or under a torch.func
    transform (the compiled op has no rules there)."""
    if name in ("cpu", "cuda") and not under_transform():
        return ops.stage_combine_into
    return None


def resolve(backend: str, device: torch.device) -> Tuple[str, Callable]:
    """(name, combine function) for the requested backend on `device` (see `select`)."""
    chosen = select(backend, device)
    return chosen.name, chosen.combine


def resolve_rows(backend: str, device: torch.device) -> Tuple[str, Callable]:
    """(name, fn) with fn(base, terms, coeffs, out_dtype=None) the per-row combination
    (`prg_fast.ode.reference.stage_combine_rows`) of the requested backend (see `select`)."""
    chosen = select(backend, device)
    return chosen.name, chosen.combine_rows


def status() -> Dict[str, Optional[str]]:
    """Each backend -> None if built, else why not (independent of any tensor's device)."""
    _load_triton()
    return {
        "cpu": ops.CPU_ERROR,
        "cuda": ops.CUDA_ERROR,
        "triton": _TRITON_ERROR,
        "reference": None,
    }
