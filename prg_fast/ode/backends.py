"""Which implementation of the fused stage arithmetic runs (`select`: the solve's ops.Backend), and
why the others cannot. "auto" picks cuda > triton > cpu > reference among those that are built and
fit the tensor's device (interpreted Triton on the CPU is for tests only, never picked by "auto").
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
from ..compat import under_transform
from . import ops, reference
from .ops import MAX_TERMS, Backend  # noqa: F401  (MAX_TERMS: the kernels' limit, read by benchmarks)

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

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


def _pick(backend: str, device: torch.device) -> str:
    if backend == "auto":  # the reference backend is always available
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        return next((name for name in order if unavailable_reason(name, device) is None), "reference")
    why = unavailable_reason(backend, device)  # an unknown name: its ValueError
    if why is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {why}")
    return backend


def _implementations(name: str) -> Tuple[Callable, Callable, Optional[Callable]]:
    """(combine, combine_rows, combine_into) of backend `name`."""
    if name == "reference":
        return reference.stage_combine, reference.stage_combine_rows, None
    if name == "triton":
        _load_triton()
        return _triton_combine, _triton_combine_rows, None
    # cpu, cuda: the compiled operators (one dispatch, by the tensors' device)
    return ops.stage_combine, ops.stage_combine_rows, ops.stage_combine_into


def select(backend: str, device: torch.device) -> Backend:
    """The requested backend on `device` (raises if unavailable), as the Backend a solve calls; inside
    a torch.func transform or a forward-AD dual level the reference's arithmetic runs (a compiled
    operator has no forward-mode rule: docs/engine.md, "Inside the engine": ops)."""
    name = _pick(backend, device)
    return Backend(name, *_implementations("reference" if under_transform() else name))


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
    return {"cpu": ops.CPU_ERROR, "cuda": ops.CUDA_ERROR, "triton": _TRITON_ERROR, "reference": None}
