"""The no-grad loop's outputs, written into tensors it owns (stage_combine_into) instead of fresh ones."""
from __future__ import annotations

from typing import Optional

import torch


class StepBuffers:
    """One stage input buffer and one state buffer, updated in place step after step; nothing kept is
    overwritten (give_away, apart). Why: docs/engine.md, "Inside the engine": step_buffers."""

    def __init__(self):
        self.stage_buffer: Optional[torch.Tensor] = None
        self.state_buffer: Optional[torch.Tensor] = None

    def stage(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buf = self.stage_buffer
        if buf is None or buf.shape != like.shape or buf.dtype != dtype:
            buf = self.stage_buffer = torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        return buf

    def state(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.state_buffer:  # the caller's x, or a state given away as an output
            self.state_buffer = torch.empty_like(x, memory_format=torch.contiguous_format)
        return self.state_buffer

    def give_away(self, x: torch.Tensor) -> None:
        if x is self.state_buffer:
            self.state_buffer = None

    def apart(self, k: torch.Tensor) -> torch.Tensor:
        """k itself, or a copy when it shares memory with a buffer that will be overwritten."""
        storage = k.untyped_storage().data_ptr()
        for buf in (self.stage_buffer, self.state_buffer):
            if buf is not None and buf.untyped_storage().data_ptr() == storage:
                return k.clone()
        return k
