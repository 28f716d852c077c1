"""Discovery: what a velocity reads, found for an adjoint by running the solve's first evaluation.

`discover` runs evaluation (0, 0) with a graph before the solve and returns a new Problem whose
`Reads` hold everything the adjoint needs (prg_fast.ode.integrate.Reads): the tensors requiring grad
the velocity reads -- its model's parameters, what the callable reaches (prg_fast.ode.reach: what it
may read only later) and what the evaluation's graph reads -- checked for computed inputs, the
modules it reaches and their written buffers (prg_fast.ode.module_state), a reentrant checkpoint
in the graph, and the parametrized tensors cached around the solve (prg_fast.ode.parametrize_cache).
The solve then reuses the evaluation's output (`FirstEvaluation`), so discovery costs no extra
network evaluation (the reversible scheme, which runs its own, discards it).

Bytes of one evaluation's graph, which size the stored adjoint's memory budget, are measured on
that evaluation by `SavedBytes`: saved-tensor hooks sum the nbytes of the unique storages autograd
saves during it, excluding storages that exist anyway (the parameters, frozen or not, closed-over
leaves requiring grad, and the stage input; a closed-over plain tensor that does not require grad
is counted, erring on the side of the budget), plus the output k (which a kept graph holds): what a
kept graph keeps alive, on CPU and CUDA alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from ..compat import next_sequence_nr, version, view_base
from .integrate import Problem, Reads, capture_rng, set_rng
from .module_state import ModuleState
from .parametrize_cache import SharedParametrizations
from .reach import check_computed_inputs, collect_params, discover_params, has_reentrant_checkpoint, reachable


class Discovered(NamedTuple):
    problem: Problem  # with what the velocity reads (`reads`), its grid read without graph
    first: Optional["FirstEvaluation"]  # None for a solve without steps
    time_grad: bool  # the grid's times require grad (the first evaluation reads a time leaf)
    differentiated: bool  # anything the solve reads requires grad: x, the times, an input found


def discover(problem: Problem, x: torch.Tensor) -> Discovered:
    """What an adjoint needs before its forward, under grad mode: a new Problem with what the
    velocity reads, and its first evaluation. The adjoints' Functions take the time grid as an
    input and return its gradient, so the problem reads it without its graph."""
    times = problem.grid.times
    time_grad = times is not None and times.requires_grad
    grid = problem.grid if times is None else dataclasses.replace(problem.grid, times=times.detach())
    reads, first = _reads(problem.on(grid), x, time_grad)
    differentiated = time_grad or x.requires_grad or any(p.requires_grad for p in reads.params)
    return Discovered(dataclasses.replace(problem, grid=grid, reads=reads), first, time_grad, differentiated)


def _reads(problem: Problem, x: torch.Tensor, time_grad: bool) -> Tuple[Reads, Optional["FirstEvaluation"]]:
    func = problem.velocity.func
    reach = reachable(func)
    params = collect_params(func, problem.adjoint_params, reach)
    unlisted = tuple(t for t in reach.computed if all(t is not p for p in params))
    state = ModuleState(reach.buffers) if reach.buffers else None  # nothing to keep without buffers
    first = first_evaluation(problem, x, time_grad, params, state)
    if first is None:
        return Reads(tuple(params), unlisted, tuple(reach.modules), state), None
    # parametrizations cached around the solve (parametrize.cached()): their shared tensors are
    # inputs of the solve, the originals reached only through them (prg_fast.ode.parametrize_cache)
    shared = SharedParametrizations.of_now(reach.modules)
    if shared is not None:
        params += [w for w in shared.tensors() if all(w is not q for q in params)]
    direct: set = set()
    node_types: set = set()
    params = discover_params(first, params, direct, node_types)
    params = check_computed_inputs(params, {id(p) for p in problem.adjoint_params or ()}, direct)
    return Reads(tuple(params), unlisted, tuple(reach.modules), state, has_reentrant_checkpoint(node_types),
                 shared), first


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
    """The solve's first evaluation, run with a graph before the solve: discovery walks it, its
    graph's bytes size the memory budget, and the solve reuses its output."""

    # the stage input: a view of x's stage input with x's graph when the solve may run as plain
    # backprop (the stored adjoint keeping every graph), else a leaf (requiring grad under time gradients)
    leaf: torch.Tensor
    tau: object  # the time it read: a float, or a tensor (a leaf requiring grad for time gradients)
    k: Optional[torch.Tensor]  # its output with graph; None once handed over or released
    rng: tuple  # generator state before the evaluation
    nbytes: Optional[int]  # bytes its graph keeps alive (SavedBytes + the output); None: not measured
    sequence_nr: int  # autograd nodes made by the evaluation have sequence numbers >= this
    state: Optional[ModuleState] = None  # the buffers the velocity reaches (problem.reads.module_state)
    # why no evaluation's graph can be kept for the backward (ModuleState.rewritten), or None
    unkeepable: Optional[str] = None

    def take(self) -> Optional[torch.Tensor]:
        k, self.k = self.k, None
        return k

    def discard(self, problem: Problem) -> None:
        """Drop the output and put the random generators back to before the evaluation, for a
        solve that does not reuse it (the reversible scheme; the stored adjoint starting over): its
        draws are then its own. So are the buffers it wrote, except those of the parametrizations
        whose cached value the solve goes on reading (their work is not redone)."""
        self.k = None
        set_rng(self.rng, self.leaf.device)
        if self.state is not None:
            reads = problem.reads
            keep = SharedParametrizations.computing_modules(reads.modules) if reads.shared is not None else ()
            self.state.load(self.state.first, keep)

    def evaluator(self, with_graph: bool = False):
        """An evaluator for integrate.walk that reuses the output at (0, 0), without its graph (or
        with it: a solve run as plain backprop)."""

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


def _measured_evaluation(problem: Problem, tau, inp: torch.Tensor, exclude: list, rng, state: Optional[ModuleState],
                         stand_in: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, Optional[SavedBytes]]:
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


def _first_inputs(problem: Problem, x: torch.Tensor, time_grad: bool):
    """(stage-input leaf, time) of evaluation (0, 0). c[0] = 0 for every explicit tableau (checked in
    ButcherTableau): stage 0 reads (t_0, x). X_0 has x's graph (a solve whose graphs all fit runs as
    plain backprop and reaches x through this evaluation), a view so that it is never x itself;
    without grad for an x without grad (backprop computes no gradient for it either); under time
    gradients (always the adjoint's Function, which keeps this graph only then) a leaf."""
    t0, h, taus = problem.step_at(0)
    with torch.set_grad_enabled(not time_grad):
        xi = problem.stage_input(x.to(problem.state_dtype), [], 0, h)
    leaf = xi.view_as(xi) if xi.requires_grad else xi.detach().requires_grad_(time_grad)
    # the times' graph is not this evaluation's business; a leaf when time gradients are wanted
    tau = t0.detach().requires_grad_(time_grad) if isinstance(t0, torch.Tensor) else taus[0]
    return leaf, tau


def first_evaluation(problem: Problem, x: torch.Tensor, time_grad: bool, params: Sequence[torch.Tensor],
                     state: Optional[ModuleState]) -> Optional[FirstEvaluation]:
    """Evaluation (0, 0) of `problem` from x, with a graph back to a stage-input leaf and to
    whatever the velocity reads (and to its time, a leaf, with `time_grad`); `params`, what the
    search found, and `state`, the buffers the velocity reaches. None for a solve without steps."""
    if problem.steps == 0:
        return None
    leaf, tau = _first_inputs(problem, x, time_grad)
    rng = capture_rng(x.device)
    # buffers the velocity writes (BatchNorm in train mode, spectral_norm): see module_state
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
