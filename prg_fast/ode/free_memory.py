"""How much memory a solve may spend on kept evaluation graphs under memory_budget="auto" (half the
memory free when it starts), and how an allocation failure looks. How free memory is measured:
docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import os
from typing import Optional

import torch

AUTO_FRACTION = 0.5
FREE_MEMORY_ENV = "PRG_FAST_FREE_MEMORY_BYTES"
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def free_bytes(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on `device` now, or None when unknown."""
    forced = os.environ.get(FREE_MEMORY_ENV)
    if forced is not None and forced.strip():
        try:
            return max(int(float(forced)), 0)
        except (ValueError, OverflowError):  # not a number; nan; inf (int() overflows)
            raise ValueError(f"{FREE_MEMORY_ENV} must be a number of bytes, got {forced!r}") from None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _host_available()
    return None


_MEM_AVAILABLE = b"MemAvailable:"


def _host_available() -> Optional[int]:
    try:
        # one read of the file's head (MemAvailable is its third line) and a search for the one
        # field: ~15 us a call, read on every "auto" solve (decoding and splitting the lines cost
        # as much again)
        fd = os.open("/proc/meminfo", os.O_RDONLY)
        try:
            head = os.read(fd, 512)
        finally:
            os.close(fd)
        at = head.find(_MEM_AVAILABLE)
        if at >= 0:
            start = at + len(_MEM_AVAILABLE)
            return int(head[start:head.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA), or the RuntimeError the CPU allocator
    raises ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)
