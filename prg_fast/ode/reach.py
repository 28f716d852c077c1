"""What a velocity reads: everything requiring grad that the adjoint must differentiate, and the
modules whose buffers it may write. Three sources, merged in order (collect_params,
discover_params): the model's own parameters; what the callable reaches (`reachable`: modules,
leaf tensors, for what it may read only after its first evaluation); and what its first
evaluation's graph actually reads (graph discovery). Then the computed-input check: a tensor
computed from another input of the solve is not differentiated twice (check_computed_inputs).

Why search: a velocity may read more after its first evaluation (an expert chosen by time), so
the callable is searched the way cloudpickle finds what a function needs: an nn.Module and its
submodules (with what user-written modules hold as plain attributes, and the globals their forward
names), what functools.partial, bound methods, closures and callable objects hold, the globals a function
names, defaults, the functions hooked on its modules (and on every module), and the items of
small containers. Depth and container sizes are bounded, so a
velocity that closes over a dataset or a trainer costs a bounded walk, not a scan of everything.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..compat import global_module_hooks, module_hooks, sequence_nr

MAX_DEPTH = 6
MAX_ITEMS = 256  # larger containers (datasets, caches) are not searched


@dataclass
class Reach:
    modules: List[torch.nn.Module] = field(default_factory=list)  # each once, submodules included
    tensors: List[torch.Tensor] = field(default_factory=list)  # leaves requiring grad held outside modules
    # non-leaf tensors requiring grad it holds (W = 2 * A): not inputs of the solve (see visit), but
    # an adjoint's VJPs watch them (prg_fast.ode.rerun: read after the first evaluation, an error)
    computed: List[torch.Tensor] = field(default_factory=list)
    # (module, name) of every buffer of those modules: the state it may write (prg_fast.ode.module_state)
    buffers: List[Tuple[torch.nn.Module, str]] = field(default_factory=list)


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
        self.out = Reach()
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
                (self.out.tensors if o.is_leaf else self.out.computed).append(o)
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
    out = search.out
    out.modules = list(search.modules.values())
    out.buffers = [(m, name) for m in out.modules for name, b in m.named_buffers(recurse=False) if b is not None]
    return out


def collect_params(model, adjoint_params, reach: Optional[Reach] = None) -> List[torch.Tensor]:
    """The model's parameters, then those of every module and every leaf tensor requiring grad the
    model reaches (prg_fast.ode.reach: what it may read after its first evaluation, which graph
    discovery cannot see), then adjoint_params."""
    params: List[torch.Tensor] = []
    seen: set = set()

    def add(p: torch.Tensor) -> None:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)

    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            add(p)
    if reach is not None:
        for m in reach.modules:
            for p in m.parameters(recurse=False):
                add(p)
        for p in reach.tensors:
            add(p)
    if adjoint_params is not None:
        for p in adjoint_params:  # checked by prg_fast.ode.description.describe
            add(p)
    return params


REENTRANT_NODE = "CheckpointFunctionBackward"


def has_reentrant_checkpoint(node_types) -> bool:
    """Whether a graph whose autograd nodes have these types runs a reentrant checkpoint
    (torch.utils.checkpoint(..., use_reentrant=True): its adjoint VJPs then go through
    torch.autograd.backward, prg_fast.ode.rerun). The types are collected by the one walk of the first
    evaluation's graph (discover_params); a Python Function's node type is named after it."""
    return any(t.__name__ == REENTRANT_NODE for t in node_types)


def discover_params(first, params: List[torch.Tensor], direct: Optional[set] = None,
                    node_types: Optional[set] = None) -> List[torch.Tensor]:
    """Everything the velocity reads that requires grad, so the adjoint differentiates it exactly:
    module parameters, tensors closed over by a plain function, modules inside wrappers such as
    time_reversed(lambda ...), the rest of a partial adjoint_params list. (What the callable holds
    but reads only later is in `params` already: collect_params adds what prg_fast.ode.reach finds.)

    `first`, the solve's first evaluation, is run with a graph (discovery.first_evaluation, under the
    caller's random state; the solve then reuses its output, so discovery costs no extra network
    evaluation) and its graph is walked: every leaf that requires grad is added. A non-leaf tensor
    requiring grad that was made outside the velocity (say W = A @ B closed over) cannot be added as
    a leaf, and differentiating through its graph once per evaluation would be wrong, so it is an
    error that says to pass it as adjoint_params (then the walk stops at its node, and
    check_computed_inputs refuses it if its graph reaches another input). `node_types` receives the
    types of the nodes walked: every node the evaluation made (the one walk of its graph)."""
    found = list(params)
    found_ids = {id(p) for p in found}
    if first is None or first.k is None or not first.k.requires_grad:
        return found
    known_nodes = {p.grad_fn for p in params if p.grad_fn is not None}
    if first.leaf.grad_fn is not None:  # the stage input with x's graph: x's history is not the velocity's
        known_nodes.add(first.leaf.grad_fn)
    seen, stack = set(), [first.k.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in known_nodes:
            continue
        seen.add(node)
        if node_types is not None:
            node_types.add(type(node))
        leaf = getattr(node, "variable", None)
        if leaf is not None:  # AccumulateGrad: a leaf that requires grad
            if direct is not None:
                direct.add(id(leaf))  # read by the first evaluation itself, not through a computed input
            if leaf is not first.leaf and id(leaf) not in found_ids:
                found.append(leaf)
                found_ids.add(id(leaf))
            continue
        # A dtype cast made earlier is what autocast's weight cache hands back inside one autocast
        # region; it saves no tensors, so walking through it once per evaluation is exact.
        if sequence_nr(node) < first.sequence_nr and node.name() != "ToCopyBackward0":
            raise ValueError(
                f"model reads a tensor that requires grad and was computed outside it (from {node.name()}); "
                "its exact gradient needs it as an input of the solve: pass it as adjoint_params=[...] "
                "(or compute it inside the model, or use adjoint=False)"
            )
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def check_computed_inputs(params: List[torch.Tensor], explicit: set, direct: set) -> List[torch.Tensor]:
    """A tensor computed from others (adjoint_params=[W], W = A @ B) is differentiated by the solve
    and then, through its own graph, by autograd. If that graph reaches another input A of the
    solve, the solve's VJP for A would run through W too and A would be counted twice. When A was
    only found implicitly (a parameter of the model, reached by the search) and the first
    evaluation does not read it directly -- MAML-style fast weights `p - lr * g` through
    functional_call, a hypernetwork's output -- A is dropped from the solve's inputs: its gradient
    arrives through W's graph, as in plain backprop. Otherwise (A passed explicitly, or read
    directly as well) it is refused, rather than silently doubled. Returns the inputs to keep."""
    computed = [(i, p) for i, p in enumerate(params) if p.grad_fn is not None]
    if not computed:
        return params
    leaves = {id(p): i for i, p in enumerate(params) if p.grad_fn is None}
    nodes = {p.grad_fn: i for i, p in computed}
    drop: set = set()
    for i, p in computed:
        seen, stack = set(), [fn for fn, _ in p.grad_fn.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            j = leaves.get(id(var)) if var is not None else nodes.get(node)
            if j is not None:
                a = params[j]
                if id(a) in explicit or id(a) in direct or a.grad_fn is not None:
                    raise ValueError(
                        f"the solve's input {i} (shape {tuple(p.shape)}, computed by {p.grad_fn.name()}) is computed "
                        f"from its input {j} (shape {tuple(a.shape)}), which the solve also differentiates directly: "
                        "its gradient would be counted twice. Compute the tensor inside the model from what it is "
                        "made of, or use adjoint=False"
                    )
                drop.add(j)
                continue
            if var is None:
                stack.extend(fn for fn, _ in node.next_functions)
    return [p for j, p in enumerate(params) if j not in drop]


def unknown_read(roots, inputs, unlisted=()) -> Optional[torch.Tensor]:
    """What the graph under the autograd nodes `roots` (an evaluation rerun or kept for the backward,
    or a whole solve run as plain backprop) reads that the solve does not take as an input, or None:
    an nn.Parameter that is none of `inputs`, or one of the computed tensors the velocity holds
    (`unlisted`, whose node the walk reaches). The adjoint differentiates only its inputs, so such a
    tensor -- read by a later evaluation through something the search could not see -- would
    silently get no gradient (prg_fast.ode.rerun.refuse_unknown_reads makes it an error, under every
    budget). Plain leaf tensors are not asked about: a velocity may make its own
    (x.detach().requires_grad_() for an energy's gradient), which no gradient is owed to. The walk
    stops at the inputs; one pass over the graph's nodes, no tensor is touched."""
    known = {id(q) for q in inputs}
    stops = {q.grad_fn for q in inputs if q.grad_fn is not None}
    computed = {q.grad_fn: q for q in unlisted if q.grad_fn not in stops}
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        if node in computed:
            return computed[node]
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if id(leaf) not in known and isinstance(leaf, torch.nn.Parameter):
                return leaf
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return None
