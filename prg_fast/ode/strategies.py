"""Adjoint strategies: which evaluation graphs the forward keeps, and what it stores.

The exact adjoint (prg_fast.ode.adjoint) needs, for every evaluation k = f(t, X) of the forward,
the vector-Jacobian product g^T df/d(X, theta). `EvaluationGraphs` hands it the evaluation *with its
autograd graph*, from one of two sources:

- kept: the forward ran that evaluation with grad enabled and kept its graph (and its stage-input
  leaf); the backward takes the VJP directly -- no recomputation. Costs the graph's memory from the
  forward until the backward reaches it (the VJP frees it).
- recomputed: the forward ran it without a graph; the backward runs it again, with a graph, from the
  stored stage input (today's behaviour: one extra evaluation per stage, one graph alive at a time).

`memory_budget` (bytes) says how many graphs are kept: floor(budget / bytes of one evaluation's
graph). Which ones: the *last* evaluations of the forward, because the backward walks in reverse and
needs them first -- each kept graph is freed by its VJP at the start of the backward, so the peak
(kept graphs + one recomputed graph) never exceeds budget + one evaluation, and the graphs kept
longest are alive for the shortest time.

Bytes of one evaluation's graph: measured on the first evaluation of the solve (which is run with a
graph anyway, for parameter discovery), by `SavedBytes`: saved-tensor hooks sum the nbytes of the
unique storages autograd saves during that evaluation, excluding storages that exist anyway (the
parameters, frozen or not, closed-over leaves requiring grad, and the stage input; a closed-over
plain tensor that does not require grad is counted, erring on the side of the budget), plus the output k (which a kept graph holds). This counts what a
kept graph keeps alive on CPU and CUDA alike; it does not count the allocator's caching or the
transient activations freed during the evaluation (those exist in recomputation too).

`store` says what the forward stores for recomputation: "stages" (every stage input, K*s
state-sized buffers) or "steps" (the state at the start of each step, K buffers; the backward
recomputes the step's stage inputs with s-1 extra evaluations per step, no graph). Both combine with
memory_budget: a kept evaluation's output is reused when the stage inputs are recomputed.

Random state: with preserve_rng_state the generator state before every evaluation is captured
(torch.get_rng_state: ~2 us on the CPU, a host-side read on CUDA -- no device synchronisation); if the
generators did not move over the whole forward (nothing random ran) the states are dropped and the
backward skips the replay (the fork/restore costs ~15 us per evaluation).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .integrate import Problem, autocast_state, capture_rng, restore_rng
from .module_state import ModuleState
from .vjp import uses_reentrant_checkpoint

STORES = ("stages", "steps")


def check_memory_budget(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ValueError(
            "memory_budget must be None (recompute every evaluation) or a number of bytes >= 0 "
            f"(float('inf') keeps every evaluation's graph), got {value!r}"
        )
    return float(value)


def check_store(value) -> str:
    if not isinstance(value, str) or value not in STORES:
        raise ValueError(f'store must be "stages" or "steps", got {value!r}')
    return value


def _storage_key(t: torch.Tensor) -> Tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses, sparse)
        return id(t), t.numel() * t.element_size()


class SavedBytes:
    """Saved-tensor hooks that sum the bytes of the unique storages autograd saves, except those of
    `exclude` (tensors alive anyway). The graph's values are unchanged: pack keeps a detached alias.

    Why detached: a pack hook that returns the very tensor it is given makes a node that saves its
    own output (relu, exp, sigmoid, ...) hold a Python reference to a tensor whose grad_fn is that
    node -- a reference cycle through C++ that Python's gc cannot see, so the whole graph (every
    activation of the evaluation) leaked on every differentiated call. A detached alias shares the
    storage and the version counter (in-place checks still work) but has no grad_fn."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        # a lazy module's parameters have no storage before the first evaluation materialises them
        # (they are parameters: pack excludes them as such)
        self.exclude = {_storage_key(t)[0] for t in exclude if not torch.nn.parameter.is_lazy(t)}
        self.seen: set = set()
        self.nbytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # parameters (frozen ones too) and closed-over leaves exist whether or not a graph is kept
        # (autograd often saves a view of them, e.g. a Linear's transposed weight: look at the base)
        base = t._base if t._base is not None else t
        if isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad):
            return t.detach()
        ptr, nbytes = _storage_key(t)
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.nbytes += nbytes
        return t.detach()

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@dataclass
class FirstEvaluation:
    """The solve's first evaluation, run with a graph before the solve: parameter discovery walks
    it, its graph's bytes size the memory budget, and the solve reuses its output (so discovery
    costs no extra evaluation)."""

    leaf: torch.Tensor  # the stage input, a leaf requiring grad
    tau: object  # the time it read: a float, or a tensor (a leaf requiring grad for time gradients)
    k: Optional[torch.Tensor]  # its output with graph; None once handed over or released
    rng: tuple  # generator state before the evaluation
    nbytes: int  # bytes its graph keeps alive (SavedBytes + the output)
    sequence_nr: int  # autograd nodes made by the evaluation have sequence numbers >= this
    state: Optional[ModuleState] = None  # the buffers the velocity reaches (problem.module_state)

    def take(self) -> Optional[torch.Tensor]:
        k, self.k = self.k, None
        return k

    def discard(self, keep: Sequence[torch.nn.Module] = ()) -> None:
        """Drop the output and put the random generators back to before the evaluation, for a
        solver that does not reuse it (the reversible scheme): its draws are then its own. So are
        the buffers it wrote, except those of the modules in `keep` (whose work is not redone: a
        parametrization whose cached value the solve goes on reading)."""
        self.k = None
        cpu, cuda = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.leaf.device)
        if self.state is not None:
            self.state.load(self.state.first, keep)

    def evaluator(self):
        """An evaluator for Problem.run that reuses the output at (0, 0), without its graph."""

        def evaluate(problem: Problem, n: int, i: int, t: float, xi: torch.Tensor) -> torch.Tensor:
            if n == 0 and i == 0 and self.k is not None:
                return self.take().detach()
            return problem.evaluate(t, xi)

        return evaluate


def first_evaluation(problem: Problem, x: torch.Tensor, params: Sequence[torch.Tensor]) -> Optional[FirstEvaluation]:
    """Evaluation (0, 0) of `problem` from x, with a graph back to a stage-input leaf and to
    whatever the velocity reads. None for a solve without steps."""
    if problem.steps == 0:
        return None
    # c[0] = 0 for every explicit tableau (checked in ButcherTableau): stage 0 reads (t_0, x)
    t0 = problem.point(0)
    h = problem.point(1) - t0
    with torch.no_grad():
        xi = problem.stage_input(x.detach().to(problem.state_dtype), [], 0, h)
    leaf = xi.detach().requires_grad_(True)
    tau = problem.stage_time(t0, h, 0)
    if isinstance(t0, torch.Tensor):
        # the times' graph is not this evaluation's business; a leaf when time gradients are wanted
        tau = t0.detach().requires_grad_(bool(problem.times.requires_grad))
    rng = capture_rng(x.device)
    # buffers the velocity writes (BatchNorm in train mode, spectral_norm): see module_state
    state = ModuleState.of(problem.modules)
    if state is not None:
        state.before_first_evaluation()
    with torch.enable_grad():
        sequence_nr = (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()
        # a non-leaf copy, so a model writing into its input meets the solver's own check
        inp = leaf.clone()
        counter = SavedBytes(exclude=list(params) + [leaf, inp])
        with counter.hooks():
            k = problem.evaluate(tau, inp)
    nbytes = counter.nbytes + (k.numel() * k.element_size() if k.requires_grad else 0)
    if state is not None:
        # kept even when the first evaluation wrote nothing: the end of the forward checks that no
        # later evaluation wrote a buffer either
        state.after_first_evaluation()
    problem.module_state = state
    problem.reentrant = uses_reentrant_checkpoint(k)
    return FirstEvaluation(leaf=leaf, tau=tau, k=k, rng=rng, nbytes=nbytes, sequence_nr=sequence_nr, state=state)


@dataclass
class Strategy:
    """The adjoint's options, checked: what AdjointSolve receives besides the problem."""

    preserve_rng: bool = True
    memory_budget: Optional[float] = None
    store: str = "stages"
    first: Optional[FirstEvaluation] = None


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and ((a[1] is None and b[1] is None) or (a[1] is not None and b[1] is not None and torch.equal(a[1], b[1])))


class EvaluationGraphs:
    """For one adjoint solve: runs the forward's evaluations (keeping the graphs the budget allows,
    capturing random states) and gives the backward each evaluation with its graph."""

    def __init__(self, problem: Problem, strategy: Strategy, device: torch.device, time_grad: bool = False):
        self.problem, self.device = problem, device
        # kept graphs then read their time through a leaf requiring grad, so the backward can take
        # dL/dtau from them as from a recomputation
        self.time_grad = time_grad
        self.store = strategy.store
        s = problem.tableau.stages
        total = problem.steps * s
        first = strategy.first
        budget = strategy.memory_budget
        if budget is None or first is None:
            keep = 0
        elif math.isinf(budget):
            keep = total
        else:
            keep = min(total, int(budget // max(first.nbytes, 1)))
        self.keep_from = total - keep  # evaluations e = n * s + i >= keep_from keep their graphs
        self.kept: Dict[int, Tuple[torch.Tensor, object, torch.Tensor]] = {}  # e -> (leaf, tau, k)
        self.first = first
        self.graph_bytes = first.nbytes if first is not None else None  # of one evaluation
        self.rng: Optional[list] = [] if strategy.preserve_rng else None
        # the buffers the velocity reaches (problem.module_state); for the written ones, their values
        # before each evaluation (for the backward's reruns)
        self.watch: Optional[ModuleState] = problem.module_state
        self.cannot_rerun: Optional[str] = None  # why a rerun would not be exact (see finish_forward)
        self.snapshots: list = []
        # The backward recomputes each evaluation under the autocast state of the forward (as
        # torch.utils.checkpoint does), so a network run in bf16 autocast is differentiated as run.
        self.autocast = autocast_state(device.type)

    @property
    def state(self) -> Optional[ModuleState]:
        """The watched buffers when the first evaluation wrote some (else None: nothing to keep)."""
        return self.watch if self.watch is not None and self.watch.written else None

    @property
    def kept_count(self) -> int:
        return self.problem.steps * self.problem.tableau.stages - self.keep_from

    # -- forward ------------------------------------------------------------------------------

    def forward_evaluate(self, problem: Problem, n: int, i: int, t: float, xi: torch.Tensor) -> torch.Tensor:
        """The forward's evaluation (n, i) (an evaluator for Problem.run)."""
        e = n * problem.tableau.stages + i
        reuse = e == 0 and self.first is not None and self.first.k is not None
        if self.rng is not None:
            self.rng.append(self.first.rng if reuse else capture_rng(self.device))
        if self.state is not None:
            # kept evaluations too: a second backward (retain_graph) reruns what the first consumed
            self.snapshots.append(self.state.first if reuse else self.state.snapshot())
        if reuse:
            k = self.first.take()
            if e >= self.keep_from:
                self.kept[e] = (self.first.leaf, self.first.tau, k)
            return k.detach()
        if e >= self.keep_from:
            leaf = xi.detach().requires_grad_(True)
            if self.time_grad and isinstance(t, torch.Tensor):
                t = t.detach().requires_grad_(True)
            with torch.enable_grad():
                k = problem.evaluate(t, leaf)
            self.kept[e] = (leaf, t, k)
            return k.detach()
        return problem.evaluate(t, xi)

    def finish_forward(self) -> None:
        # Generators that did not move over the whole forward: nothing random ran, nothing to replay.
        if self.rng and _same_rng(self.rng[0], capture_rng(self.device)):
            self.rng = None
        if self.watch is not None:
            why = self.watch.untracked()
            if why is not None and self.keep_from > 0:  # something will be rerun: refuse now
                raise RuntimeError(why)
            # every graph kept: a first backward reruns nothing; a second one (retain_graph) would
            self.cannot_rerun = why

    # -- backward -----------------------------------------------------------------------------

    def _recompute(self, e: int, t: float, xi: torch.Tensor, rng_state) -> torch.Tensor:
        if self.cannot_rerun is not None:
            raise RuntimeError(self.cannot_rerun)
        if self.state is not None:
            self.state.load(self.snapshots[e])
        on, dtype = self.autocast
        with torch.autocast(self.device.type, dtype=dtype, enabled=on):
            if rng_state is not None:
                with restore_rng(rng_state, self.device):
                    return self.problem.evaluate(t, xi)
            return self.problem.evaluate(t, xi)

    def with_graph(self, n: int, i: int, t, xi: torch.Tensor, rng_state) -> Tuple[torch.Tensor, torch.Tensor, object]:
        """(k, leaf, tau): evaluation (n, i) with its graph from the stage-input leaf (and from the
        time tau, when it is a leaf requiring grad) -- the forward's kept graph (handed over once:
        its VJP frees it; a second backward recomputes), else recomputed from the stored stage
        input `xi` at time `t`."""
        got = self.kept.pop(n * self.problem.tableau.stages + i, None)
        if got is not None:
            leaf, tau, k = got
            return k, leaf, tau
        leaf = xi.detach().requires_grad_(True)
        with torch.enable_grad():
            return self._recompute(n * self.problem.tableau.stages + i, t, leaf, rng_state), leaf, t

    def step_stage_inputs(self, n: int, x: torch.Tensor, rng_states: Optional[list]) -> List[torch.Tensor]:
        """store="steps": the stage inputs of step n from its start state x, recomputed exactly as
        the forward made them (s-1 evaluations without a graph; kept outputs are reused)."""
        p = self.problem
        tab = p.tableau
        t = p.point(n)
        h = p.point(n + 1) - t
        ks: List[torch.Tensor] = []
        inputs: List[torch.Tensor] = []
        with torch.no_grad():
            for i in range(tab.stages):
                xi = p.stage_input(x, ks, i, h)
                inputs.append(xi)
                if i == tab.stages - 1:
                    break
                kept = self.kept.get(n * tab.stages + i)
                if kept is not None:
                    ks.append(kept[2].detach())
                else:
                    ks.append(self._recompute(n * tab.stages + i, p.stage_time(t, h, i, p.point(n + 1)), xi,
                                              rng_states[i] if rng_states else None))
        return inputs

