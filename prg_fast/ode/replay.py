"""The replay record: what an adjoint needs to rerun the forward's evaluations exactly.

Both autograd Functions (adjoint.AdjointSolve, reversible.ReversibleSolve) rerun evaluations in
the backward; a rerun is exact when it sees what the forward's evaluation saw. The forward records,
per rerunnable evaluation (a network evaluation, or a reversible base step), the random state
(dropout) and the written buffers (module_state); per solve, the autocast state, the modules'
train/eval flags and the parameters' versions. Random states (torch.get_rng_state: ~2 us, no
device sync) are dropped when the generators did not move over the forward (the replay's
fork/restore costs ~15 us per evaluation).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Sequence

import torch

from .integrate import autocast_state
from .module_state import ModuleState, TrainingModes, left_as_found


def capture_rng(device: torch.device):
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def set_rng(state, device: torch.device) -> None:
    """Set the generators to a state captured by `capture_rng`."""
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def restore_rng(state, device: torch.device) -> Iterator[None]:
    """Run a block with the random state captured by `capture_rng`, then put the caller's back."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng(state, device)
        yield


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
        self.versions = [q._version for q in params]

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
        """The adjoints rerun the network from its tensors as they are at the backward; one modified in
        place since the forward (optimizer.step() before backward, an in-place update) gives the
        gradient of another network. Plain backprop raises for this (its saved tensors' versions); so
        do the adjoints -- for the tensors the reruns actually read (a gradient came back), so an
        unrelated model that the velocity's object also holds may be stepped meanwhile."""
        for i, (q, v, g) in enumerate(zip(params, self.versions, grads)):
            if q._version != v and g is not None:
                raise RuntimeError(
                    f"a tensor the velocity reads (input {i} of the solve's {len(params)} parameters, shape "
                    f"{tuple(q.shape)}) was modified by an inplace operation between the forward and the backward "
                    f"(version {v} -> {q._version}): the adjoint recomputes the network from its current tensors, so "
                    "its gradient would not be the forward's. Call backward before changing the parameters (e.g. "
                    "before optimizer.step()), or use adjoint=False"
                )
