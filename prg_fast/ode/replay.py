"""The replay record: what an adjoint needs to rerun the forward's evaluations exactly.

Both autograd Functions (adjoint.AdjointSolve, reversible.ReversibleSolve) rerun evaluations in
the backward. A rerun is exact when it sees what the forward's evaluation saw: the random state
(dropout), the written buffers (BatchNorm's running statistics: module_state), the autocast state,
the modules' train/eval flags, and the same parameter values. The forward records, per rerunnable
evaluation (one network evaluation, or one base step of the reversible scheme), the random state
and the written buffers; per solve, the autocast state, the flags and the parameters' versions.

Random state: with preserve_rng_state the generator state before every evaluation is captured
(torch.get_rng_state: ~2 us on the CPU, a host-side read on CUDA -- no device synchronisation); if the
generators did not move over the whole forward (nothing random ran) the states are dropped and the
backward skips the replay (the fork/restore costs ~15 us per evaluation).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Sequence

import torch

from .integrate import autocast_state, capture_rng, check_param_versions, param_versions, restore_rng
from .module_state import ModuleState, TrainingModes, left_as_found


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and ((a[1] is None and b[1] is None) or (a[1] is not None and b[1] is not None and torch.equal(a[1], b[1])))


class ReplayRecord:
    """Recorded by a forward (`record` before each rerunnable evaluation, `finish` at its end),
    read by its backward (`backward` around it, `rerun(e)` around each rerun of evaluation e)."""

    def __init__(self, watch: Optional[ModuleState], modules: Sequence[torch.nn.Module], device: torch.device,
                 preserve_rng: bool, params: Sequence[torch.Tensor]):
        self.device = device
        self.rng: Optional[list] = [] if preserve_rng else None
        # the buffers the velocity reaches; for the written ones, their values before each evaluation
        self.watch = watch
        self.snapshots: List[list] = []
        self.cannot_rerun: Optional[str] = None  # why a rerun would not be exact (see finish)
        # reruns run under the forward's autocast state (as torch.utils.checkpoint does), so a
        # network run in bf16 autocast is differentiated as run, and under its train/eval flags
        self.autocast = autocast_state(device.type)
        self.modes = TrainingModes(modules)
        self.versions = param_versions(params)

    @property
    def state(self) -> Optional[ModuleState]:
        """The watched buffers when the first evaluation wrote some (else None: nothing to keep)."""
        return self.watch if self.watch is not None and self.watch.written else None

    def record(self, rng=None, buffers=None) -> None:
        """Before a rerunnable evaluation: its random state and written buffers (given when already
        captured, as for the solve's first evaluation)."""
        if self.rng is not None:
            self.rng.append(capture_rng(self.device) if rng is None else rng)
        if self.state is not None:
            self.snapshots.append(self.state.snapshot() if buffers is None else buffers)

    def finish(self, reruns: bool) -> None:
        """After the forward. Generators that did not move: nothing random ran, nothing to replay.
        A buffer written after the first evaluation only cannot be replayed: refused now if the
        backward will rerun something (`reruns`), else when a later backward tries."""
        if self.rng and _same_rng(self.rng[0], capture_rng(self.device)):
            self.rng = None
        if self.watch is not None:
            why = self.watch.untracked()
            if why is not None and reruns:
                raise RuntimeError(why)
            self.cannot_rerun = why

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Around a whole backward: the written buffers end as they were found, and the forward's
        train/eval flags hold while it runs."""
        with left_as_found(self.state), self.modes:
            yield

    @contextmanager
    def rerun(self, e: int) -> Iterator[None]:
        """Around the rerun of evaluation e: its buffers, random state and autocast state."""
        if self.cannot_rerun is not None:
            raise RuntimeError(self.cannot_rerun)
        if self.state is not None:
            self.state.load(self.snapshots[e])
        on, dtype = self.autocast
        with ExitStack() as stack:
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=on))
            if self.rng is not None:
                stack.enter_context(restore_rng(self.rng[e], self.device))
            yield

    def check_versions(self, params: Sequence[torch.Tensor], grads: Sequence) -> None:
        check_param_versions(params, self.versions, grads)
