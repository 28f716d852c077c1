"""Which implementation of the fused stage arithmetic runs, and why the others cannot.

A backend is a function with the signature of `prg_fast.ode.reference.stage_combine`.
"auto" picks cuda > triton > cpu > reference among those that are built and fit the tensor's
device (interpreted Triton on the CPU is for tests only and is never picked by "auto").
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import ops, reference

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

_TRITON_ERROR: Optional[str] = None
_triton_combine = None


def _load_triton():
    global _TRITON_ERROR, _triton_combine
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


def _implementation(name: str) -> Callable:
    if name == "reference":
        return reference.stage_combine
    if name in ("cpu", "cuda"):
        return ops.stage_combine
    if name == "triton":
        _load_triton()
        return _triton_combine
    raise AssertionError(name)


def resolve(backend: str, device: torch.device) -> Tuple[str, Callable]:
    """(name, combine function) for the requested backend on `device`; raises if unavailable."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            if unavailable_reason(name, device) is None:
                return name, _implementation(name)
        raise AssertionError("the reference backend is always available")
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {why}")
    return backend, _implementation(backend)


def status() -> Dict[str, Optional[str]]:
    """Each backend -> None if built, else why not (independent of any tensor's device)."""
    _load_triton()
    return {
        "cpu": ops.CPU_ERROR,
        "cuda": ops.CUDA_ERROR,
        "triton": _TRITON_ERROR,
        "reference": None,
    }
