"""The one vector-Jacobian product every adjoint takes of a recomputed or kept evaluation.

Both adjoints (prg_fast.ode.adjoint, prg_fast.ode.reversible) differentiate each evaluation on its
own and return the *sum* over evaluations as the parameters' gradient, through their autograd
Function; autograd then runs the parameters' hooks on that total, once, as plain backprop does.
So the per-evaluation VJPs here must not run them:

- tensor hooks (`p.register_hook`) run on every gradient autograd captures for `p`, also inside
  `torch.autograd.grad(..., inputs=[p])`: they are muted for the duration of the VJP (the hooks'
  dict is emptied and refilled in order; autograd reads it through the same object);
- post-accumulate-grad hooks run only when a gradient is accumulated into `.grad`, which
  `torch.autograd.grad` never does -- except through a reentrant checkpoint inside the velocity
  (below), so they are muted as well.

Reentrant checkpoint (`torch.utils.checkpoint(..., use_reentrant=True)`) refuses
`torch.autograd.grad` and `backward(inputs=...)`, and inside its own backward accumulates the
parameters' gradients into their `.grad` with a nested `torch.autograd.backward`. When the
velocity's graph holds one (`has_reentrant_checkpoint`), the VJP is a plain
`torch.autograd.backward` into fresh accumulators: every input's `.grad` is set aside, the VJP
accumulates into empty ones, they are read off as this evaluation's share and the user's `.grad`
is put back. (Every leaf the graph reaches is an input of the solve: the model's parameters, what
prg_fast.ode.reach finds and what graph discovery adds.)
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

from ..compat import tensor_hook_dicts

REENTRANT_NODE = "CheckpointFunctionBackward"


def has_reentrant_checkpoint(node_types: Iterable[type]) -> bool:
    """Whether a graph whose autograd nodes have these types runs a reentrant checkpoint (the types
    are collected by the one walk of the first evaluation's graph, prg_fast.ode.reach.discover_params:
    a Python Function's node type is named after it)."""
    return any(t.__name__ == REENTRANT_NODE for t in node_types)


@contextmanager
def hooks_muted(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """The tensor hooks of `tensors` do not run inside the block; they are back, in their order,
    after it (however it ends)."""
    saved = [(d, list(d.items())) for d in tensor_hook_dicts(tensors)]
    for d, _ in saved:
        d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            d.update(items)


def evaluation_vjp(output: torch.Tensor, inputs: Sequence[torch.Tensor], cotangent: torch.Tensor,
                   reentrant: bool = False, unlisted: Sequence[torch.Tensor] = ()) -> List[Optional[torch.Tensor]]:
    """cotangent^T d output / d inputs (None for an input the output does not read), with the
    inputs' hooks muted (see the module docstring)."""
    return graph_vjp([output], inputs, [cotangent], reentrant, unlisted)


def graph_vjp(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
              reentrant: bool = False, unlisted: Sequence[torch.Tensor] = ()) -> List[Optional[torch.Tensor]]:
    """sum_j cotangents[j]^T d outputs[j] / d inputs, one backward through the graph they share (the
    kept tail of a solve: prg_fast.ode.strategies), with the inputs' hooks muted.

    `unlisted`: computed tensors requiring grad that the velocity holds but the solve does not take
    as inputs (prg_fast.ode.reach.Reach.computed; discovery refuses one its first evaluation reads).
    One read by a later evaluation would get no gradient from the solve -- silently, since the
    adjoint returns gradients only for its inputs -- so the VJP asks for theirs too: one that is
    not None is an error naming the fix (it costs nothing when there is none)."""
    inputs = list(inputs)
    # an output that reads neither the state nor a parameter (a zero velocity, a function of t
    # only) has no graph: it contributes nothing
    live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not live:
        return [None] * len(inputs)
    outs, cots = [o for o, _ in live], [c for _, c in live]
    watched = [] if reentrant else list(unlisted)  # (backward() cannot stop at a computed tensor)
    with hooks_muted(inputs + watched), torch.enable_grad():
        if reentrant:
            return _backward_into_fresh(outs, inputs, cots)
        grads = list(torch.autograd.grad(outs, inputs + watched, cots, allow_unused=True))
    for w, g in zip(watched, grads[len(inputs):]):
        if g is not None:
            raise RuntimeError(
                f"model reads a tensor that requires grad and was computed outside it (shape {tuple(w.shape)}, "
                f"from {w.grad_fn.name()}) in an evaluation after its first, where the solve did not see it: the "
                "adjoint differentiates only its inputs, so that tensor's gradient would be missing. Pass it as "
                "adjoint_params, compute it inside the model, or use adjoint=False"
            )
    return grads[:len(inputs)]


def _backward_into_fresh(outputs: List[torch.Tensor], inputs: List[torch.Tensor], cotangents: List[torch.Tensor]):
    """The VJP through torch.autograd.backward, for graphs with a reentrant checkpoint (which
    refuses torch.autograd.grad and backward(inputs=...)): every input's .grad is set aside, the
    backward accumulates into empty ones, they are this evaluation's share, and the user's .grad
    is put back."""
    computed = [i for i, q in enumerate(inputs) if not q.is_leaf]
    if computed:
        # backward without inputs= would run on through such an input's own graph
        raise RuntimeError(
            "the velocity runs torch.utils.checkpoint(..., use_reentrant=True) and the solve's input "
            f"{computed[0]} (adjoint_params) is computed outside the model: use use_reentrant=False in the "
            "checkpoint, or adjoint=False"
        )
    stash = [q.grad for q in inputs]
    for q in inputs:
        q.grad = None
    try:
        torch.autograd.backward(outputs, cotangents)
        return [q.grad for q in inputs]
    finally:
        for q, g in zip(inputs, stash):
            q.grad = g


ONCE_DIFFERENTIABLE = "trying to differentiate twice a function that was marked with @once_differentiable"


class _SecondDerivativeError(torch.autograd.Function):
    """The identity, whose backward is torch's once_differentiable error (as its DelayedError node)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(ONCE_DIFFERENTIABLE)


def once_differentiable(backward):
    """torch's once_differentiable for an adjoint's backward, whose second derivative error cannot
    be missed: ctx.differentiated holds the Function's tensor inputs (x, the parameters).

    torch's error node (its DelayedError) sits only on the path through the incoming cotangent, and
    torch.autograd.grad(..., inputs) prunes it when that path does not lead to the inputs asked
    for: gx = grad(out.square().sum(), x, create_graph=True) then grad(gx.square().sum() +
    x.square().sum(), x) silently lacked the solve's second-order term. Under create_graph every
    gradient returned here also reaches the inputs through one error node (an added exact zero:
    the sum of an empty slice of each input), so any second derivative through them is the error."""
    once = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads_out):
        grads = once(ctx, *grads_out)
        if not torch.is_grad_enabled():  # no create_graph: nothing to guard (the common case, free)
            return grads
        reach = [q for q in ctx.differentiated if q.requires_grad]
        if not reach:
            return grads
        # real, 0-dim: adding it changes no gradient's value or dtype (a 0-dim operand does not promote)
        empty = [q.reshape(-1)[:0].sum() for q in reach]
        zero = _SecondDerivativeError.apply(sum(e.real if e.is_complex() else e for e in empty))
        return tuple(g + zero if isinstance(g, torch.Tensor) and (g.is_floating_point() or g.is_complex()) else g
                     for g in grads)

    return wrapper
