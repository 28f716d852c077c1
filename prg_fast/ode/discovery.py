"""Discovery: what a velocity reads, found for an adjoint before its forward -- the search of the
callable (`reachable`), the first evaluation and the walks of its graph, the bytes of its graph
(`SavedBytes`); `discover` returns a new Problem with its `Reads`. Why so: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import types
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..compat import (gradient_hooks, global_module_hooks, module_hooks, next_sequence_nr, sequence_nr, version,
                      view_base)
from .graph_walk import graph_nodes, leaf_of
from .integrate import Problem, Reads, capture_rng, set_rng
from .module_state import ModuleState
from .parametrize_cache import SharedParametrizations


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
    problem = problem if times is None else problem.on(dataclasses.replace(problem.grid, times=times.detach()))
    reach = reachable(problem.velocity.func)
    params = collect_params(problem.velocity.func, problem.adjoint_params, reach)
    unlisted = tuple(t for t in reach.computed if all(t is not p for p in params))
    state = ModuleState(reach.buffers) if reach.buffers else None  # nothing to keep without buffers
    first = first_evaluation(problem, x, time_grad, params, state)
    shared, reentrant = None, False
    if first is not None:
        # cached parametrizations are inputs of the solve: docs/engine.md, "Inside the engine": parametrize_cache
        shared = SharedParametrizations.of_now(reach.modules)
        params, direct, reentrant = discover_params(first, params + (shared.tensors() if shared is not None else []))
        params = check_computed_inputs(params, {id(p) for p in problem.adjoint_params or ()}, direct)
    reads = Reads(tuple(params), unlisted, tuple(reach.modules), state, reentrant, shared)
    differentiated = time_grad or x.requires_grad or any(p.requires_grad for p in reads.params)
    return Discovered(dataclasses.replace(problem, reads=reads), first, time_grad, differentiated)


def _unique(tensors) -> List[torch.Tensor]:
    """Each tensor once (by identity), in order of first appearance."""
    seen: set = set()
    return [t for t in tensors if id(t) not in seen and not seen.add(id(t))]


# -- what the callable reaches ------------------------------------------------------------

MAX_DEPTH = 6
MAX_ITEMS = 256  # larger containers (datasets, caches) are not searched


class Reach(NamedTuple):
    modules: List[torch.nn.Module]  # each once, submodules included
    tensors: List[torch.Tensor]  # leaves requiring grad held outside modules
    # non-leaf tensors requiring grad it holds (W = 2 * A): not inputs of the solve (see visit), but
    # an adjoint's VJPs watch them (prg_fast.ode.rerun: read after the first evaluation, an error)
    computed: List[torch.Tensor]
    # (module, name) of every buffer of those modules: the state it may write (prg_fast.ode.module_state)
    buffers: List[Tuple[torch.nn.Module, str]]


def _global_names(code: types.CodeType) -> List[str]:
    names = list(code.co_names)
    for const in code.co_consts:  # nested functions and lambdas
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return names


def _globals_of(fn: types.FunctionType) -> list:
    g = fn.__globals__
    return [g[name] for name in _global_names(fn.__code__) if name in g]


def _cells_of(fn: types.FunctionType) -> list:
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


def _held(o) -> list:
    """What a non-module object holds that calling it may read."""
    if isinstance(o, functools.partial):
        return [o.func, *o.args, *o.keywords.values()]
    if inspect.ismethod(o):
        return [o.__self__, o.__func__]
    if isinstance(o, types.FunctionType):
        return _cells_of(o) + _globals_of(o) + list(o.__defaults__ or ()) + [getattr(o, "__wrapped__", None)]
    if isinstance(o, (list, tuple, set, frozenset)):
        return list(o) if len(o) <= MAX_ITEMS else []
    if isinstance(o, dict):
        return list(o.values()) if len(o) <= MAX_ITEMS else []
    # a callable object (or any object) that is not a module: what it holds
    attrs = getattr(o, "__dict__", None)
    return list(attrs.values()) if isinstance(attrs, dict) and len(attrs) <= MAX_ITEMS else []


class _Search:
    def __init__(self):
        self.tensors: List[torch.Tensor] = []
        self.computed: List[torch.Tensor] = []
        self.seen: set = set()
        self.seen_classes: set = set()
        self.modules: dict = {}

    def visit(self, o, depth: int) -> None:
        if o is None or depth > MAX_DEPTH or id(o) in self.seen:
            return
        self.seen.add(id(o))
        if isinstance(o, torch.nn.Module):
            self.visit_module(o, depth)
        elif isinstance(o, torch.Tensor):
            # leaves are inputs; a non-leaf (W = A @ B, a loss kept from an earlier step) made an
            # input would be differentiated through its own graph as well as by the solve, and may
            # belong to a graph long freed: one the first evaluation reads is discovery's error, one
            # read later the adjoints' VJPs' (Reach.computed, prg_fast.ode.rerun.graph_vjp)
            if o.requires_grad:
                (self.tensors if o.is_leaf else self.computed).append(o)
        elif not isinstance(o, (types.ModuleType, type, str, bytes, int, float, bool, complex)):
            for a in _held(o):
                self.visit(a, depth + 1)

    def visit_module(self, o: torch.nn.Module, depth: int) -> None:
        for m in o.modules():
            if id(m) in self.modules:
                continue
            self.modules[id(m)] = m
            for hook in module_hooks(m):  # run with the module: what they hold, they may read
                self.visit(hook, depth + 1)
            cls = type(m)
            if cls.__module__.startswith("torch."):
                continue  # PyTorch's own modules hold nothing else that matters here
            # what a user-written module holds besides submodules (a function or a network
            # kept as a plain attribute: time_reversed(lambda ...)), and what its forward names
            for key, a in vars(m).items():
                if not key.startswith("_") and not isinstance(a, (bool, int, float, str)):
                    self.visit(a, depth + 1)
            if cls not in self.seen_classes:
                self.seen_classes.add(cls)
                forward = getattr(cls, "forward", None)
                if isinstance(forward, types.FunctionType):
                    for a in _globals_of(forward):
                        self.visit(a, depth + 1)


def reachable(obj) -> Reach:
    search = _Search()
    search.visit(obj, 0)
    if search.modules:  # hooks on every module run with the velocity's modules
        search.visit(global_module_hooks(), 1)
    modules = list(search.modules.values())
    buffers = [(m, name) for m in modules for name, b in m.named_buffers(recurse=False) if b is not None]
    return Reach(modules, search.tensors, search.computed, buffers)


def collect_params(model, adjoint_params, reach: Reach) -> List[torch.Tensor]:
    """The model's parameters, then those of every module and every leaf tensor requiring grad the
    model reaches (`reachable`: what it may read after its first evaluation, which graph
    discovery cannot see), then adjoint_params (checked by prg_fast.ode.description.describe)."""
    own = model.parameters() if isinstance(model, torch.nn.Module) else ()
    reached = [p for m in reach.modules for p in m.parameters(recurse=False)] + reach.tensors
    return _unique(p for p in itertools.chain(own, reached, adjoint_params or ()) if p.requires_grad)


def has_reentrant_checkpoint(node_types) -> bool:
    """Whether a graph with autograd nodes of these types runs a reentrant checkpoint (a Python
    Function's node type is named after it). Why it matters: docs/engine.md, "Inside the engine": rerun."""
    return any(t.__name__ == "CheckpointFunctionBackward" for t in node_types)


def discover_params(first: "FirstEvaluation", params: List[torch.Tensor]) -> Tuple[List[torch.Tensor], set, bool]:
    """(`params` and every leaf requiring grad that the first evaluation's graph reads, each once, the
    ids of the leaves it reads, whether it runs a reentrant checkpoint); a non-leaf made outside the
    velocity is an error. Why: docs/engine.md, "Inside the engine": discovery."""
    read: List[torch.Tensor] = []
    direct: set = set()
    node_types: set = set()
    if not first.k.requires_grad:
        return _unique(params), direct, False
    known_nodes = {p.grad_fn for p in params if p.grad_fn is not None}
    if first.leaf.grad_fn is not None:  # the stage input with x's graph: x's history is not the velocity's
        known_nodes.add(first.leaf.grad_fn)
    for node in graph_nodes([first.k.grad_fn], stops=known_nodes):
        node_types.add(type(node))
        leaf = leaf_of(node)
        if leaf is not None:  # AccumulateGrad: a leaf that requires grad
            direct.add(id(leaf))  # read by the first evaluation itself, not through a computed input
            if leaf is not first.leaf:
                read.append(leaf)
        # A dtype cast made earlier is what autocast's weight cache hands back inside one autocast
        # region; it saves no tensors, so walking through it once per evaluation is exact.
        elif sequence_nr(node) < first.sequence_nr and node.name() != "ToCopyBackward0":
            raise ValueError(
                f"model reads a tensor that requires grad and was computed outside it (from {node.name()}); "
                "its exact gradient needs it as an input of the solve: pass it as adjoint_params=[...] "
                "(or compute it inside the model, or use adjoint=False)"
            )
    return _unique(params + read), direct, has_reentrant_checkpoint(node_types)


def check_computed_inputs(params: List[torch.Tensor], explicit: set, direct: set) -> List[torch.Tensor]:
    """The inputs to keep when one is computed from another (adjoint_params=[W], W = A @ B, its graph
    reaching the input A): A dropped when only found implicitly and not read directly by the first
    evaluation, else an error (A would be counted twice). Why: docs/engine.md, "Inside the engine"."""
    computed = [(i, p) for i, p in enumerate(params) if p.grad_fn is not None]
    if not computed:
        return params
    leaves = {id(p): i for i, p in enumerate(params) if p.grad_fn is None}
    nodes = {p.grad_fn: i for i, p in computed}
    drop: set = set()
    for i, p in computed:
        for node in graph_nodes([fn for fn, _ in p.grad_fn.next_functions], ends=nodes):
            var = leaf_of(node)
            j = leaves.get(id(var)) if var is not None else nodes.get(node)
            if j is None:
                continue
            a = params[j]
            if id(a) in explicit or id(a) in direct or a.grad_fn is not None:
                raise ValueError(
                    f"the solve's input {i} (shape {tuple(p.shape)}, computed by {p.grad_fn.name()}) is computed "
                    f"from its input {j} (shape {tuple(a.shape)}), which the solve also differentiates directly: "
                    "its gradient would be counted twice. Compute the tensor inside the model from what it is "
                    "made of, or use adjoint=False"
                )
            drop.add(j)
    return [p for j, p in enumerate(params) if j not in drop]


# -- the first evaluation ----------------------------------------------------------------

def _storage_key(t: torch.Tensor) -> Tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses, sparse)
        return id(t), t.numel() * t.element_size()


class SavedBytes:
    """Saved-tensor hooks that sum the bytes of the unique storages autograd saves, except those of
    `exclude` (tensors alive anyway); pack keeps a detached alias and its version, unpack checks it
    (`stand_in` (copy, original): the copy checked by the original's version). Why so:
    docs/engine.md, "Inside the engine": discovery."""

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

    # the stage input: x's stage input itself, with x's graph, when it requires grad (what plain
    # backprop's evaluation reads: the stored adjoint keeping every graph runs as it), else a leaf
    # (requiring grad under time gradients)
    leaf: torch.Tensor
    tau: object  # the time it read: a float, or a tensor (a leaf requiring grad for time gradients)
    k: Optional[torch.Tensor]  # its output with graph; None once handed over or released
    rng: tuple  # generator state before the evaluation
    nbytes: Optional[int]  # bytes its graph keeps alive (SavedBytes + the output); None: not measured
    sequence_nr: int  # autograd nodes made by the evaluation have sequence numbers >= this
    state: Optional[ModuleState] = None  # the buffers the velocity reaches (problem.reads.module_state)
    # why no evaluation's graph can be kept for the backward (ModuleState.rewritten), or None
    unkeepable: Optional[str] = None
    # the state x.to(state dtype) with x's graph that `leaf` was made from (None under time
    # gradients): a solve run as plain backprop starts from it, so `leaf` is its stage input
    start: Optional[torch.Tensor] = None
    # the evaluation read x itself: the hooks it registered there run on the solve's gradient for x,
    # as in plain backprop (a rerun of it registers its own, which the backward then drops)
    read_x: bool = False
    input_hooks: tuple = ()  # the hooks the evaluation registered on its input (x.register_hook)

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
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return True
    except RuntimeError:
        return False


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
    """(stage-input leaf, time, start state) of evaluation (0, 0): stage 0 reads (t_0, x) (c[0] = 0,
    checked in ButcherTableau). Which tensor the leaf is, and why: docs/engine.md, "Inside the
    engine": discovery."""
    t0, h, taus = problem.step_at(0)
    with torch.set_grad_enabled(not time_grad):
        start = x.to(problem.state_dtype)
        xi = problem.stage_input(start, [], 0, h)
    leaf = xi if xi.requires_grad and not time_grad else xi.detach().requires_grad_(time_grad)
    # the times' graph is not this evaluation's business; a leaf when time gradients are wanted
    tau = t0.detach().requires_grad_(time_grad) if isinstance(t0, torch.Tensor) else taus[0]
    return leaf, tau, None if time_grad else start


def first_evaluation(problem: Problem, x: torch.Tensor, time_grad: bool, params: Sequence[torch.Tensor],
                     state: Optional[ModuleState]) -> Optional[FirstEvaluation]:
    """Evaluation (0, 0) of `problem` from x, with a graph back to a stage-input leaf and to
    whatever the velocity reads (and to its time, a leaf, with `time_grad`); `params`, what the
    search found, and `state`, the buffers the velocity reaches. None for a solve without steps."""
    if problem.steps == 0:
        return None
    leaf, tau, start = _first_inputs(problem, x, time_grad)
    rng = capture_rng(x.device)
    # buffers the velocity writes (BatchNorm in train mode, spectral_norm): see module_state
    if state is not None:
        state.before_first_evaluation()
    with torch.enable_grad():
        sequence_nr = next_sequence_nr()
        # the stage input itself where it requires grad (a write into it is autograd's error, or
        # the solver's own check), else a copy, so that a model writing into it spares the caller's x
        inp = leaf if leaf.requires_grad else leaf.clone()
        hooked = len(gradient_hooks(inp) or ())  # the caller's own hooks on x
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
                           state=state, unkeepable=unkeepable, start=start, read_x=inp is x,
                           input_hooks=tuple(list((gradient_hooks(inp) or {}).values())[hooked:]))
