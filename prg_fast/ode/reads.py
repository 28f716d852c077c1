"""What the velocity reads: everything requiring grad that the adjoint must differentiate.

Three sources, merged in order: the model's own parameters; what the callable reaches (modules,
leaf tensors: prg_fast.ode.reach, for what it may read only after its first evaluation); and what
its first evaluation's graph actually reads (graph discovery). Then the computed-input check:
a tensor computed from another input of the solve is not differentiated twice.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .reach import Reach
from .strategies import FirstEvaluation


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


def discover_params(first: Optional[FirstEvaluation], params: List[torch.Tensor],
                     direct: Optional[set] = None) -> List[torch.Tensor]:
    """Everything the velocity reads that requires grad, so the adjoint differentiates it exactly:
    module parameters, tensors closed over by a plain function, modules inside wrappers such as
    time_reversed(lambda ...), the rest of a partial adjoint_params list. (What the callable holds
    but reads only later is in `params` already: collect_params adds what prg_fast.ode.reach finds.)

    The solve's first evaluation is run with a graph (strategies.first_evaluation, under the
    caller's random state; the solve then reuses its output, so discovery costs no extra network
    evaluation) and its graph is walked: every leaf that requires grad is added. A non-leaf tensor
    requiring grad that was made outside the velocity (say W = A @ B closed over) cannot be added as
    a leaf, and differentiating through its graph once per evaluation would be wrong, so it is an
    error that says to pass it as adjoint_params (then the walk stops at its node, and
    check_computed_inputs refuses it if its graph reaches another input)."""
    found = list(params)
    found_ids = {id(p) for p in found}
    if first is None or first.k is None or not first.k.requires_grad:
        return found
    known_nodes = {p.grad_fn for p in params if p.grad_fn is not None}
    seen, stack = set(), [first.k.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in known_nodes:
            continue
        seen.add(node)
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
        if node._sequence_nr() < first.sequence_nr and node.name() != "ToCopyBackward0":
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
