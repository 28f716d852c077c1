"""The replay record: what an adjoint needs to rerun the forward's evaluations exactly.

Both autograd Functions (adjoint.AdjointSolve, reversible.ReversibleSolve) rerun evaluations in
the backward; a rerun is exact when it sees what the forward's evaluation saw. The forward records,
per rerunnable evaluation (a network evaluation, or a reversible base step), the random state
(dropout) and the written buffers (module_state); per solve, the autocast state, the modules'
train/eval flags, the cached parametrizations and the parameters' versions. Random states (torch.get_rng_state: ~2 us, no
device sync) are dropped when the generators did not move over the forward (the replay's
fork/restore costs ~15 us per evaluation).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Sequence

import torch

from ..compat import version
from . import parametrize_cache
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

    def __init__(self, problem, device: torch.device, preserve_rng: bool, params: Sequence[torch.Tensor]):
        self.device = device
        self.rng: Optional[list] = [] if preserve_rng else None
        # the buffers the velocity reaches; for the written ones, their values before each evaluation
        self.watch: Optional[ModuleState] = problem.module_state
        self.snapshots: List[list] = []
        self.cannot_rerun: Optional[str] = None  # why a rerun would not be exact (see finish)
        # reruns run under the forward's autocast state (as torch.utils.checkpoint does), so a
        # network run in bf16 autocast is differentiated as run, under its train/eval flags, and
        # read the parametrized tensors cached around the solve (prg_fast.ode.parametrize_cache)
        self.autocast = autocast_state(device.type)
        self.modes = TrainingModes(problem.modules)
        self.shared = problem.shared_parametrizations
        self.params, self.at_start = params, [version(q) for q in params]  # a model may write its own
        self.versions: Optional[ParamVersions] = None

    @property
    def state(self) -> Optional[ModuleState]:
        """The watched buffers when the first evaluation wrote some (else None: nothing to keep)."""
        return self.watch if self.watch is not None and self.watch.written else None

    def record(self, rng=None, buffers=None, chained: bool = False) -> None:
        """Before a rerunnable evaluation: its random state and written buffers (given when already
        captured, as for the solve's first evaluation). `chained`: the evaluation is only ever rerun
        right after the one recorded before it, inside `chain` (the kept tail, rerun as a whole):
        its random state is where the previous evaluation's draws left the generators, as nothing
        between two evaluations draws, so none is captured (a capture costs ~2-10 us, per evaluation)."""
        if self.rng is not None:
            self.rng.append(None if chained else capture_rng(self.device) if rng is None else rng)
        if self.state is not None:
            self.snapshots.append(self.state.snapshot() if buffers is None else buffers)

    def clear(self) -> None:
        """Forget every evaluation recorded: the forward starts over (strategies.EvaluationGraphs)."""
        if self.rng is not None:
            self.rng = []
        self.snapshots = []

    def finish(self, reruns: bool) -> None:
        """After the forward. Generators that did not move: nothing random ran, nothing to replay.
        A buffer written after the first evaluation only cannot be replayed: refused now if the
        backward will rerun something (`reruns`), else when a later backward tries."""
        self.versions = ParamVersions(self.params, self.at_start)
        if self.rng and _same_rng(self.rng[0], capture_rng(self.device)):
            self.rng = None
        if self.watch is not None:
            why = self.watch.untracked()
            if why is not None and reruns:
                raise RuntimeError(why)
            self.cannot_rerun = why

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Around a whole backward: parameters changed in place since the forward are found before
        anything is rerun, the written buffers end as they were found, and the forward's train/eval
        flags and cached parametrizations hold while it runs."""
        self.versions.before_backward()
        with left_as_found(self.state), self.modes, parametrize_cache.kept(self.shared):
            yield

    @contextmanager
    def chain(self, e: int) -> Iterator[None]:
        """Around the reruns, in order, of evaluation e and the chained evaluations recorded after
        it (`record(chained=True)`; each rerun with `rerun(..., chained=True)`): the random state is
        set once, to e's, and the draws follow on as in the forward; the caller's is put back."""
        if self.rng is None:
            yield
            return
        with restore_rng(self.rng[e], self.device):
            yield

    @contextmanager
    def rerun(self, e: int, chained: bool = False) -> Iterator[None]:
        """Around the rerun of evaluation e: its buffers, random state (inside `chain`: the
        chain's) and autocast state."""
        if self.cannot_rerun is not None:
            raise RuntimeError(self.cannot_rerun)
        if self.state is not None:
            self.state.load(self.snapshots[e])
        on, dtype = self.autocast
        with ExitStack() as stack:
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=on))
            if self.rng is not None and not chained:
                stack.enter_context(restore_rng(self.rng[e], self.device))
            yield

    def check_versions(self, grads: Sequence) -> None:
        """After the backward, with the parameters' gradients (see ParamVersions)."""
        self.versions.after_backward(grads)


class ParamVersions:
    """What happened to the solve's parameters in place, for the adjoints' backward.

    - Between the forward and the backward (optimizer.step() before backward): the reruns would
      differentiate another network. Plain backprop raises for this; so do the adjoints, for the
      tensors the reruns actually read (a gradient came back). Checked against the versions at the
      end of the forward, before the backward reruns anything.
    - During the forward, by the model itself (nn.Embedding(max_norm=...) renormalises the rows
      it reads, in place, inside its own forward): the reruns do the same again. Exact when that
      write leaves the values the forward read as they were (a renorm of rows already within the
      norm does); the written tensors are copied at the start of the backward and compared at its
      end, and a rerun that changed them is an error that names the in-place write (the values are
      put back first)."""

    def __init__(self, params: Sequence[torch.Tensor], at_forward_start: Sequence[int]):
        self.params = list(params)
        self.versions = [version(q) for q in self.params]  # at the end of the forward
        self.written = [i for i, (a, b) in enumerate(zip(at_forward_start, self.versions)) if a != b]
        self.moved: List[int] = []
        self.copies: dict = {}

    def before_backward(self) -> None:
        self.moved = [i for i, (q, v) in enumerate(zip(self.params, self.versions)) if version(q) != v]
        with torch.no_grad():
            self.copies = {i: self.params[i].detach().clone() for i in self.written if i not in self.moved}

    def after_backward(self, grads: Sequence) -> None:
        params = self.params
        for i in self.moved:
            if grads[i] is not None:
                q = params[i]
                raise RuntimeError(
                    f"a tensor the velocity reads (input {i} of the solve's {len(params)} parameters, shape "
                    f"{tuple(q.shape)}) was modified by an inplace operation between the forward and the backward "
                    f"(version {self.versions[i]} -> {version(q)}): the adjoint recomputes the network from its current "
                    "tensors, so its gradient would not be the forward's. Call backward before changing the parameters "
                    "(e.g. before optimizer.step()), or use adjoint=False"
                )
        changed = [i for i, c in self.copies.items() if not torch.equal(params[i], c)]
        with torch.no_grad():
            for i in changed:
                params[i].data.copy_(self.copies[i])
        self.copies = {}
        if changed:
            i = changed[0]
            raise RuntimeError(
                f"the model writes a tensor it reads in place while it runs (input {i} of the solve's {len(params)} "
                f"parameters, shape {tuple(params[i].shape)}; e.g. nn.Embedding(max_norm=...) renormalises its weight "
                "inside its own forward), and rerunning it in the backward changed that tensor again, so the adjoint's "
                "reruns do not read what the forward read (its values are put back). Use adjoint=False, or "
                "memory_budget=float('inf') (nothing is rerun)"
            )
