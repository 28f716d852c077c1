"""StoredAdjoint at work: which evaluation graphs the forward keeps, and what it stores.

The exact adjoint (prg_fast.ode.adjoint) needs, for every evaluation k = f(t, X) of the forward,
the vector-Jacobian product g^T df/d(X, theta). `EvaluationGraphs` hands it the evaluation *with its
autograd graph*, from one of two sources:

- kept: the forward ran that evaluation with grad enabled and kept its graph (and its stage-input
  leaf); the backward takes the VJP directly -- no recomputation. Costs the graph's memory from the
  forward until the backward reaches it (the VJP frees it).
- recomputed: the forward ran it without a graph; the backward runs it again, with a graph, from the
  stored stage input (one extra evaluation per stage, one graph alive at a time).

`memory_budget` (bytes; "auto": half the memory free at the call, StoredAdjoint.budget_bytes)
keeps floor(budget / bytes of one evaluation's graph) graphs (StoredAdjoint.graphs_to_keep): the
*last* evaluations', which the backward needs first -- each is freed by its VJP, so the peak never
exceeds budget + one evaluation. Kept evaluations that make up whole steps at the end (the tail)
run as one plain autograd graph from a leaf at the tail's first state, and the backward takes one
VJP through all of it (`Tail`): per evaluation, that spares the leaf, the VJP call and the
cotangent arithmetic in Python, which cost a small network ~1.35x plain backprop; its arithmetic
is plain backprop's. When every graph fits (and no time gradient is asked for), the whole solve
is plain backprop instead (`EvaluationGraphs.as_backprop`): one graph from x itself, with no
autograd Function of ours and its nested VJP around it. A step kept only in part, a tensor grid
whose times require grad (the time leaves are per evaluation) and a reentrant checkpoint keep one
graph per evaluation. No graph is
kept when the first evaluation's graph saves a buffer that it writes in place (its version moves:
every later evaluation's write would invalidate the earlier graphs, as in plain backprop, where
rerunning from the buffer's snapshot is exact; `FirstEvaluation.unkeepable`).

An allocation failure while graphs are kept (`EvaluationGraphs.run_forward`) frees them and runs
the forward again keeping none, from the random state and written buffers it started with.

Bytes of one evaluation's graph: measured on the first evaluation of the solve (which is run with a
graph anyway, for parameter discovery), by `SavedBytes`: saved-tensor hooks sum the nbytes of the
unique storages autograd saves during that evaluation, excluding storages that exist anyway (the
parameters, frozen or not, closed-over leaves requiring grad, and the stage input; a closed-over
plain tensor that does not require grad is counted, erring on the side of the budget), plus the
output k (which a kept graph holds): what a kept graph keeps alive, on CPU and CUDA alike.

`store`: "stages" (every stage input, K*s buffers) or "steps" (each step's start state, K
buffers; the backward recomputes the step's stage inputs, s-1 evaluations without graph, reusing
kept outputs), for the steps before the tail: the tail stores nothing (its graph holds what its
backward reads, and a second backward reruns it from its start state).

What a rerun needs to be exact (random states, written buffers, autocast, train/eval flags,
parameter versions) is recorded by prg_fast.ode.replay.ReplayRecord.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..compat import next_sequence_nr, version, view_base
from .description import StoredAdjoint
from .free_memory import is_out_of_memory
from .integrate import Problem
from .module_state import ModuleState
from .parametrize_cache import SharedParametrizations
from .replay import ReplayRecord, capture_rng, set_rng

log = logging.getLogger(__name__)


@dataclass
class Tail:
    """The whole steps start .. K-1 (start > 0) of a forward, run as one graph from the leaf `leaf`
    (the state at grid point `start`): `states` are its states at the output points after `start`,
    with their graph."""

    start: int
    leaf: torch.Tensor
    states: Dict[int, torch.Tensor]

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
    storage and the version counter but has no grad_fn.

    Autograd skips its in-place check (saved version against the tensor's version now) for a tensor
    saved through hooks, and this graph is the user's own when the solve runs as plain backprop (or
    a kept evaluation 0): pack records the version and unpack makes the check itself, with
    autograd's message, so a tensor the first evaluation saved and something wrote in place before
    the backward (a closed-over tensor, a parameter stepped too early) is backprop's error, not a
    gradient from the new values. `stand_in` (copy, original): the copy is saved in the original's
    place, so its check is the original's version (the first evaluation reads a copy of x's stage
    input; backprop saves that input itself, and writing x in place before the backward is its error)."""

    def __init__(self, exclude: Sequence[torch.Tensor] = (),
                 stand_in: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        # a lazy module's parameters have no storage before the first evaluation materialises them
        # (they are parameters: pack excludes them as such)
        self.exclude = {_storage_key(t)[0] for t in exclude if not torch.nn.parameter.is_lazy(t)}
        self.stand_in = None if stand_in is None else (_storage_key(stand_in[0])[0], stand_in[1].detach())
        self.seen: set = set()
        self.nbytes = 0

    def pack(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        # parameters (frozen ones too) and closed-over leaves exist whether or not a graph is kept
        # (autograd often saves a view of them, e.g. a Linear's transposed weight: look at the base)
        base = view_base(t)
        base = t if base is None else base
        ptr, nbytes = _storage_key(t)
        alive_anyway = isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)
        if not alive_anyway and ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.nbytes += nbytes
        alias = t.detach()  # shares t's version counter
        versioned = self.stand_in[1] if self.stand_in is not None and ptr == self.stand_in[0] else alias
        # a tensor made under inference mode has no version counter (nothing to check)
        return alias, versioned, version(versioned)

    def saved(self, t: torch.Tensor) -> bool:
        """Whether autograd saved (a view of) `t`'s storage, among the storages counted."""
        return _storage_key(t)[0] in self.seen

    @staticmethod
    def unpack(packed: Tuple[torch.Tensor, torch.Tensor, Optional[int]]) -> torch.Tensor:
        t, versioned, expected = packed
        if expected is not None and version(versioned) != expected:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{versioned.type()} {list(versioned.shape)}] is at version {version(versioned)}; "
                f"expected version {expected} instead (it was saved by the solve's first evaluation of the "
                "model; a tensor the model reads must not be written in place between the solve and its backward)"
            )
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@dataclass
class FirstEvaluation:
    """The solve's first evaluation, run with a graph before the solve: parameter discovery walks
    it, its graph's bytes size the memory budget, and the solve reuses its output (so discovery
    costs no extra evaluation)."""

    # the stage input: a view of x's stage input with x's graph when the solve may run as plain
    # backprop (EvaluationGraphs.as_backprop), else a leaf (requiring grad under time gradients)
    leaf: torch.Tensor
    tau: object  # the time it read: a float, or a tensor (a leaf requiring grad for time gradients)
    k: Optional[torch.Tensor]  # its output with graph; None once handed over or released
    rng: tuple  # generator state before the evaluation
    nbytes: Optional[int]  # bytes its graph keeps alive (SavedBytes + the output); None: not measured
    sequence_nr: int  # autograd nodes made by the evaluation have sequence numbers >= this
    state: Optional[ModuleState] = None  # the buffers the velocity reaches (problem.module_state)
    # why no evaluation's graph can be kept for the backward (ModuleState.rewritten), or None
    unkeepable: Optional[str] = None

    def take(self) -> Optional[torch.Tensor]:
        k, self.k = self.k, None
        return k

    def discard(self, keep: Sequence[torch.nn.Module] = ()) -> None:
        """Drop the output and put the random generators back to before the evaluation, for a
        solver that does not reuse it (the reversible scheme): its draws are then its own. So are
        the buffers it wrote, except those of the modules in `keep` (whose work is not redone: a
        parametrization whose cached value the solve goes on reading)."""
        self.k = None
        set_rng(self.rng, self.leaf.device)
        if self.state is not None:
            self.state.load(self.state.first, keep)

    def evaluator(self, with_graph: bool = False):
        """An evaluator for Problem.run that reuses the output at (0, 0), without its graph (or with
        it: a solve run as plain backprop)."""

        def evaluate(problem: Problem, n: int, i: int, t: float, xi: torch.Tensor) -> torch.Tensor:
            if n == 0 and i == 0 and self.k is not None:
                k = self.take()
                return k if with_graph else k.detach()
            return problem.evaluate(t, xi)

        return evaluate


def _saved_tensors_hooks_allowed() -> bool:
    """False inside torch.autograd.graph.disable_saved_tensors_hooks, which refuses any hooks."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            return True
    except RuntimeError:
        return False


def _same(t):
    return t


def _measured_evaluation(problem: Problem, tau, inp: torch.Tensor, exclude: list, rng,
                         state: Optional[ModuleState],
                         stand_in: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                         ) -> Tuple[torch.Tensor, Optional[SavedBytes]]:
    """The first evaluation under SavedBytes' hooks, and the counter. A velocity that refuses
    saved-tensor hooks (torch.func.grad / vjp / jacrev inside it, or a caller's
    torch.autograd.graph.disable_saved_tensors_hooks) is run again without them, from the random
    state and buffers it started with: (k, None), its graph's size unknown (nothing is kept)."""
    if not _saved_tensors_hooks_allowed():  # the caller disabled them
        return problem.evaluate(tau, inp), None
    counter = SavedBytes(exclude=exclude, stand_in=stand_in)
    try:
        with counter.hooks():
            return problem.evaluate(tau, inp), counter
    except RuntimeError as error:  # torch.func's message: "... don't yet support saved tensor hooks"
        if "saved tensor hooks" not in str(error):
            raise
    set_rng(rng, inp.device)
    if state is not None:
        state.restore_before_first()
    return problem.evaluate(tau, inp), None


def first_evaluation(problem: Problem, x: torch.Tensor, params: Sequence[torch.Tensor],
                     time_grad: bool = False) -> Optional[FirstEvaluation]:
    """Evaluation (0, 0) of `problem` from x, with a graph back to a stage-input leaf and to
    whatever the velocity reads (and to its time, a leaf, with `time_grad`). None for a solve
    without steps."""
    if problem.steps == 0:
        return None
    # c[0] = 0 for every explicit tableau (checked in ButcherTableau): stage 0 reads (t_0, x)
    t0, h, taus = problem.step_at(0)
    # X_0 with x's graph (a solve whose graphs all fit runs as plain backprop and reaches x through
    # this evaluation: EvaluationGraphs.as_backprop), a view so that it is never x itself; without
    # grad for an x without grad (backprop computes no gradient for it either); under time
    # gradients (always the adjoint's Function, which keeps this graph only then) a leaf
    with torch.set_grad_enabled(not time_grad):
        xi = problem.stage_input(x.to(problem.state_dtype), [], 0, h)
    leaf = xi.view_as(xi) if xi.requires_grad else xi.detach().requires_grad_(time_grad)
    tau = taus[0]
    if isinstance(t0, torch.Tensor):
        # the times' graph is not this evaluation's business; a leaf when time gradients are wanted
        tau = t0.detach().requires_grad_(time_grad)
    rng = capture_rng(x.device)
    # buffers the velocity writes (BatchNorm in train mode, spectral_norm): see module_state
    state = problem.module_state
    if state is not None:
        state.before_first_evaluation()
    with torch.enable_grad():
        sequence_nr = next_sequence_nr()
        # a non-leaf copy, so a model writing into its input meets the solver's own check
        inp = leaf.clone()
        k, counter = _measured_evaluation(problem, tau, inp, list(params) + [leaf, inp], rng, state,
                                          stand_in=(inp, leaf))
    nbytes, unkeepable = None, "the velocity refuses saved-tensor hooks (its graph is not measured)"
    if counter is not None:
        nbytes, unkeepable = counter.nbytes + (k.numel() * k.element_size() if k.requires_grad else 0), None
    if state is not None:
        # kept even when the first evaluation wrote nothing: the end of the forward checks that no
        # later evaluation wrote a buffer either
        state.after_first_evaluation()
        rewritten = state.rewritten(counter.saved) if counter is not None else None
        if rewritten is not None:
            unkeepable = f"the graph saves the buffer {rewritten!r}, which every evaluation writes in place"
    return FirstEvaluation(leaf=leaf, tau=tau, k=k, rng=rng, nbytes=nbytes, sequence_nr=sequence_nr,
                           state=state, unkeepable=unkeepable)


class EvaluationGraphs:
    """For one adjoint solve: runs the forward's evaluations (keeping the graphs the budget allows,
    recording what their reruns need) and gives the backward each evaluation with its graph.

    Observable on the solve's backward node (`out.grad_fn`, AdjointSolveBackward, `.evals`) and in
    the debug log of this module: `budget` (the bytes assumed, "auto" resolved), `graph_bytes`,
    `kept_count`, `fell_back` (an allocation failure made the forward start over keeping none),
    `unkeepable` (why no graph could be kept, or None)."""

    def __init__(self, problem: Problem, strategy: StoredAdjoint, first: Optional[FirstEvaluation],
                 device: torch.device, params: Sequence[torch.Tensor], time_grad: bool = False):
        self.problem = problem
        # kept graphs then read their time through a leaf requiring grad, so the backward can take
        # dL/dtau from them as from a recomputation
        self.time_grad = time_grad
        self.store = strategy.store
        self.first = first
        self.graph_bytes = first.nbytes if first is not None else None  # of one evaluation
        self.budget = strategy.budget_bytes(device)
        total = problem.steps * problem.tableau.stages
        # a graph that a later evaluation invalidates is recomputed instead (FirstEvaluation.unkeepable)
        self.unkeepable = first.unkeepable if first is not None else None
        keep = strategy.graphs_to_keep(total, self.graph_bytes, self.budget) if self.unkeepable is None else 0
        self._keep(keep)
        self.fell_back = False
        self.replay = ReplayRecord(problem, device, strategy.preserve_rng_state, params)
        log.debug("adjoint: %d of %d evaluation graphs kept (%s bytes each, budget %s bytes, "
                  "memory_budget=%r%s)",
                  self.kept_count, total, self.graph_bytes, self.budget, strategy.memory_budget,
                  "" if self.unkeepable is None else f"; none can be kept: {self.unkeepable}")

    def _keep(self, count: int) -> None:
        """Keep the graphs of the last `count` evaluations: those of whole steps at the end run as one
        graph (the tail, plain autograd: one VJP for all of them), those of a step partly kept one
        graph each; a tensor grid's time leaves and reentrant checkpoints take one graph each."""
        p, s = self.problem, self.problem.tableau.stages
        self.kept_count = count
        self.keep_from = p.steps * s - count  # evaluations e = n * s + i >= keep_from keep their graphs
        whole = not self.time_grad and not p.reentrant
        # the tail's first step; never 0: a solve keeping every graph runs as plain backprop instead
        # (as_backprop), whose graph reaches x itself
        self.tail_from = max(1, -(-self.keep_from // s)) if whole else p.steps
        self.kept: Dict[int, Tuple[torch.Tensor, object, torch.Tensor]] = {}  # e -> (leaf, tau, k)
        self.tail: Optional[Tail] = None
        self.tail_start: Optional[torch.Tensor] = None  # the state at the tail's start (a rerun's)

    # -- forward ------------------------------------------------------------------------------

    @property
    def as_backprop(self) -> bool:
        """Every evaluation's graph fits (none is invalidated by a later one) and no time gradient
        is asked for: the solve is plain backprop, one autograd graph from x (run_as_backprop), and
        no Function of the adjoint stands between it and autograd."""
        return self.keep_from == 0 and self.unkeepable is None and not self.time_grad

    def run_as_backprop(self, x: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """The solve's outputs with their graph, its first evaluation the one discovery ran (its
        input has x's graph: first_evaluation). An allocation failure is not the run's end: the
        graph is freed, the first evaluation's draws and writes undone, nothing is kept any more
        (kept_count 0, fell_back) and None says to run the adjoint's forward instead."""
        p = self.problem
        evaluator = self.first.evaluator(with_graph=True) if self.first is not None else None
        try:
            with torch.enable_grad():
                return p.run(x.to(p.state_dtype), evaluator=evaluator)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            message = str(error).splitlines()[0]
        # outside the except block: the failed attempt's frames (and the graph they hold) are gone
        self._fall_back(message)
        return None

    def run_forward(self, x: torch.Tensor, stored: list) -> List[torch.Tensor]:
        """The forward's outputs (without graph); `stored` receives the stage inputs (store="stages")
        or each step's start state of the steps before the tail. An allocation failure while graphs
        are kept is not the run's end: everything kept is freed and the forward starts over keeping
        nothing (exact: the random state and the written buffers are put back first)."""
        try:
            return self._run_forward(x, stored)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if self.kept_count == 0 or not is_out_of_memory(error):
                raise
            message = str(error).splitlines()[0]
        # outside the except block: the failed attempt's frames (and the graphs they hold) are gone
        self._fall_back(message)
        stored.clear()
        return self._run_forward(x, stored)

    def _run_forward(self, x: torch.Tensor, stored: list) -> List[torch.Tensor]:
        p = self.problem
        where = dict(states=stored) if self.store == "steps" else dict(stage_inputs=stored)
        x, saved = p.walk(x, 0, self.tail_from, evaluator=self.forward_evaluate, **where)
        if self.tail_from < p.steps:
            # the tail stores nothing: its backward is one VJP through its graph, a second backward
            # reruns it whole from its start state (take_tail); its stage inputs live in its graph
            self.tail_start = x.detach()
            self.tail = self._tail_graph(self.tail_evaluate)
            saved.update({m: v.detach() for m, v in self.tail.states.items()})
        return p.gather_outputs(saved)

    def _tail_graph(self, evaluator) -> Tail:
        """Steps tail_from .. K-1 run with a graph from a leaf at the tail's start state, by
        `evaluator` (the forward's tail_evaluate, or a backward's rerun: take_tail)."""
        p = self.problem
        leaf = self.tail_start.detach().requires_grad_(True)
        with torch.enable_grad():
            _, states = p.walk(leaf, self.tail_from, p.steps, evaluator=evaluator)
        return Tail(self.tail_from, leaf, {m: v for m, v in states.items() if m > self.tail_from})

    def _fall_back(self, message: str) -> None:
        """Back to the start of the forward after an allocation failure, keeping no graph: the first
        evaluation's output and its draws and buffer writes are undone (it is rerun without a
        graph), the records cleared."""
        log.warning("adjoint: out of memory while keeping %d evaluation graphs (%s); recomputing them in the "
                    "backward instead", self.kept_count, message)
        self._keep(0)
        self.fell_back = True
        if self.first is not None:
            shared = self.problem.shared_parametrizations
            self.first.discard(SharedParametrizations.computing_modules(self.problem.modules)
                               if shared is not None else ())
        self.replay.clear()

    def _reuse_first(self, e: int) -> Optional[torch.Tensor]:
        """Evaluation 0's output with its graph, from the first evaluation (recorded as the
        forward's evaluation 0), or None when it is not there to reuse."""
        if e != 0 or self.first is None or self.first.k is None:
            return None
        state = self.replay.state
        self.replay.record(self.first.rng, state.first if state is not None else None)
        return self.first.take()

    def forward_evaluate(self, problem: Problem, n: int, i: int, t: float, xi: torch.Tensor) -> torch.Tensor:
        """The forward's evaluation (n, i) before the tail (an evaluator for Problem.walk)."""
        e = n * problem.tableau.stages + i
        # kept evaluations too: a second backward (retain_graph) reruns what the first consumed
        k = self._reuse_first(e)
        if k is not None:
            leaf = self.first.leaf
            # its graph is kept only from a leaf of ours (the backward's VJP stops there): under time
            # gradients, the one case that keeps evaluation 0 here (else it runs as_backprop)
            if e >= self.keep_from and leaf.requires_grad and leaf.grad_fn is None:
                self.kept[e] = (leaf, self.first.tau, k)
            return k.detach()
        self.replay.record()
        if e >= self.keep_from:
            leaf = xi.detach().requires_grad_(True)
            if self.time_grad and isinstance(t, torch.Tensor):
                t = t.detach().requires_grad_(True)
            with torch.enable_grad():
                k = problem.evaluate(t, leaf)
            self.kept[e] = (leaf, t, k)
            return k.detach()
        return problem.evaluate(t, xi)

    def tail_evaluate(self, problem: Problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
        """An evaluation of the tail (grad mode on: its graph joins the tail's)."""
        e = n * problem.tableau.stages + i
        # the tail is rerun as a whole (take_tail): one random state, its first evaluation's
        self.replay.record(chained=e > self.tail_from * problem.tableau.stages)
        return problem.evaluate(t, xi)

    def finish_forward(self) -> None:
        # every graph kept: a first backward reruns nothing; a second one (retain_graph) would
        self.replay.finish(reruns=self.keep_from > 0)

    def take_tail(self) -> Optional[Tail]:
        """The tail's graph for a backward: the forward's, handed over once (its VJP frees it); for
        a later backward (retain_graph=True) recomputed the same way, one graph from the state at
        its start, so its gradients are bit for bit the first's (gradcheck asks for that)."""
        tail, self.tail = self.tail, None
        if tail is not None or self.tail_from >= self.problem.steps:
            return tail

        def rerun(problem: Problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
            with self.replay.rerun(n * problem.tableau.stages + i, chained=True):
                return problem.evaluate(t, xi)

        with self.replay.chain(self.tail_from * self.problem.tableau.stages):
            return self._tail_graph(rerun)

    # -- backward -----------------------------------------------------------------------------

    def _recompute(self, e: int, t: float, xi: torch.Tensor) -> torch.Tensor:
        with self.replay.rerun(e):
            return self.problem.evaluate(t, xi)

    def with_graph(self, n: int, i: int, t, xi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, object]:
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
            return self._recompute(n * self.problem.tableau.stages + i, t, leaf), leaf, t

    def step_stage_inputs(self, n: int, x: torch.Tensor) -> List[torch.Tensor]:
        """store="steps": the stage inputs of step n from its start state x, recomputed exactly as
        the forward made them (s-1 evaluations without a graph; kept outputs are reused)."""
        p = self.problem
        s = p.tableau.stages
        _, h, taus = p.step_at(n)
        inputs: List[torch.Tensor] = []

        def evaluate(i: int, tau, xi: torch.Tensor) -> Optional[torch.Tensor]:
            inputs.append(xi)
            if i == s - 1:
                return None  # the last stage's output is not needed for any input
            kept = self.kept.get(n * s + i)
            return kept[2].detach() if kept is not None else self._recompute(n * s + i, tau, xi)

        with torch.no_grad():
            p.stages(x, h, taus, evaluate)
        return inputs
