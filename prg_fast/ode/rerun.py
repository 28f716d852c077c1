"""An evaluation rerun in the backward: what it must see to be the forward's (`ReplayRecord`) and
its one VJP (`graph_vjp`). Why so: docs/engine.md, "Inside the engine": rerun."""
from __future__ import annotations

import functools
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..compat import foreach_add_, gradient_hooks, tensor_hook_dicts, version, view_base
from .graph_walk import graph_nodes, leaf_of
from .integrate import autocast_state, capture_rng, restore_rng
from .module_state import ModuleState, ParamVersions, left_as_found, training_modes


def _same_rng(a, b) -> bool:
    """Two capture_rng states (CPU, CUDA or None) are equal."""
    return all(u is v or u is not None and v is not None and torch.equal(u, v) for u, v in zip(a, b))


class ReplayRecord:
    """Recorded by a forward (`record` before each rerunnable evaluation, `finish` at its end),
    read by its backward (`backward` runs it, `rerun(e)` is around each rerun of evaluation e)."""

    def __init__(self, problem, device: torch.device, preserve_rng: bool):
        self.device = device
        # evaluation e -> its record (an adaptive forward records out of order and retries rejected steps)
        self.rng: Optional[dict] = {} if preserve_rng else None
        # the buffers the velocity reaches; for the written ones, their values before each evaluation
        self.watch: Optional[ModuleState] = problem.reads.module_state
        self.snapshots: dict = {}
        self.recorded = 0
        self.cannot_rerun: Optional[str] = None  # why a rerun would not be exact (see finish)
        self.autocast = autocast_state(device.type)
        self.modules = problem.reads.modules
        self.modes = [m.training for m in self.modules]  # as the forward runs them
        self.shared = problem.reads.shared
        self.params = problem.reads.params
        self.at_start = [version(q) for q in self.params]  # a model may write its own
        self.versions: Optional[ParamVersions] = None

    @property
    def state(self) -> Optional[ModuleState]:
        """The watched buffers when the first evaluation wrote some (else None: nothing to keep)."""
        return self.watch if self.watch is not None and self.watch.written else None

    def record(self, e: Optional[int] = None, rng=None, buffers=None, chained: bool = False) -> None:
        """Before a rerunnable evaluation: its random state and written buffers (given when already
        captured); `chained`: none captured (docs/engine.md, "Inside the engine": rerun)."""
        e = self.recorded if e is None else e  # by default, the evaluations in their order
        self.recorded = e + 1
        if self.rng is not None:
            self.rng[e] = None if chained else capture_rng(self.device) if rng is None else rng
        if self.state is not None:
            self.snapshots[e] = self.state.snapshot() if buffers is None else buffers

    def alias(self, e: int, same: int) -> None:
        """Evaluation e is evaluation `same` (a step's first stage, its previous step's last: FSAL)."""
        if self.rng is not None:
            self.rng[e] = self.rng[same]
        if self.state is not None:
            self.snapshots[e] = self.snapshots[same]

    def clear(self) -> None:
        """Forget every evaluation recorded: the forward starts over (kept_graphs.EvaluationGraphs)."""
        if self.rng is not None:
            self.rng = {}
        self.snapshots, self.recorded = {}, 0

    def finish(self, reruns: bool) -> None:
        """After the forward: no replay when the generators did not move; a buffer written after the first
        evaluation only is refused now if the backward reruns something (`reruns`), else when one tries."""
        self.versions = ParamVersions(self.params, self.at_start)
        if self.rng and _same_rng(self.rng[0], capture_rng(self.device)):
            self.rng = None
        if self.watch is not None:
            why = self.watch.untracked()
            if why is not None and reruns:
                raise RuntimeError(why)
            self.cannot_rerun = why

    def backward(self, compute: Callable[[], tuple]) -> tuple:
        """A whole backward, `compute()` (None, None, the grid's, x's, then the parameters' gradients),
        under the forward's buffers, train flags and cached parametrizations, checked by ParamVersions."""
        self.versions.before_backward()
        self.hidden = HiddenLeaves()  # what this backward's VJPs owe plain leaves no input holds
        with left_as_found(self.state), training_modes(self.modules, self.modes), \
                self.shared.kept() if self.shared is not None else nullcontext():
            grads = compute()
        self.hidden.accumulate()
        self.versions.after_backward(grads[4:])
        return grads

    @contextmanager
    def chain(self, e: int) -> Iterator[None]:
        """Around the reruns of evaluation e and the chained ones after it: e's random state, set once."""
        with restore_rng(self.rng[e], self.device) if self.rng is not None else nullcontext():
            yield

    @contextmanager
    def rerun(self, e: int, chained: bool = False) -> Iterator[None]:
        """Around the rerun of evaluation e: its buffers, random state (inside `chain`: the chain's), autocast."""
        if self.cannot_rerun is not None:
            raise RuntimeError(self.cannot_rerun)
        if self.state is not None:
            self.state.load(self.snapshots[e])
        on, dtype = self.autocast
        # autocast off in the forward and now: nothing to enter (~15 us per rerun of a tiny network)
        off = not on and not autocast_state(self.device.type)[0]
        with nullcontext() if off else torch.autocast(self.device.type, dtype=dtype, enabled=on), \
                restore_rng(self.rng[e], self.device) if self.rng is not None and not chained else nullcontext():
            yield


@contextmanager
def hooks_muted(dicts: Sequence[dict]) -> Iterator[None]:
    """The tensor hooks these dicts hold (compat.tensor_hook_dicts) off inside the block, back in order after."""
    saved = [(d, list(d.items())) for d in dicts]
    for d, _ in saved:
        d.clear()
    try:
        yield
    finally:
        for d, items in saved:
            d.update(items)


class StateHooks:
    """Hooks the velocity registers on its input x, run as plain backprop runs them: in the VJP, or taken
    (`take`) and run on the state's whole cotangent (`run`). Why: docs/engine.md, "Inside the engine": rerun."""

    def __init__(self, skip_x: bool):
        self.skip_x, self.at = skip_x, {}

    @staticmethod
    def reads_state(p, i: int) -> bool:
        """Whether stage i's input is the state itself (Problem.stage_input returns it)."""
        return not any(a != 0.0 for a in p.tableau.a[i]) and p.net_dtype == p.state_dtype

    def take(self, m: int, leaf: torch.Tensor, is_state: bool = True) -> None:
        """Take the hooks on `leaf` when it is the state at grid point m, to run at `run(m)`."""
        hooks = gradient_hooks(leaf) if is_state else None
        if hooks:
            self.at.setdefault(m, []).extend(hooks.values())
            hooks.clear()

    def run(self, m: int, grad: torch.Tensor) -> torch.Tensor:
        """The state's whole cotangent at grid point m, through the hooks taken there, in order."""
        for hook in self.at.pop(m, ()) if m or not self.skip_x else ():
            out = hook(grad)
            grad = grad if out is None else out
        return grad


def refuse_input_hooks(hooks: Sequence[Callable], where: str) -> None:
    """An error naming a hook the velocity registered on its input (the reversible scheme's base steps)."""
    if hooks:
        hook = hooks[0]
        raise RuntimeError(
            f"the velocity registers a hook on its input x ({getattr(hook, '__qualname__', repr(hook))}) {where}; "
            "the reversible adjoint cannot run it on the gradient plain backprop gives x. Use reversible=False "
            "(the stored adjoint runs it exactly) or adjoint=False")


def graph_vjp(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
              reads, hidden: "HiddenLeaves", hooked: Sequence[torch.Tensor] = ()) -> List[Optional[torch.Tensor]]:
    """sum_j cotangents[j]^T d outputs[j] / d inputs (None for an input they do not read), one backward
    through the graph they share, the inputs' hooks muted but `hooked`'s; unknown reads refused, plain
    leaves' shares into `hidden`. Why: docs/engine.md, "Inside the engine": rerun."""
    inputs = list(inputs)
    # an output that reads neither the state nor a parameter (a function of t only) contributes nothing
    live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not live:
        return [None] * len(inputs)
    outs, cots = [o for o, _ in live], [c for _, c in live]
    leaves = refuse_unknown_reads([o.grad_fn for o in outs], inputs, reads.unlisted)
    every = inputs + leaves
    hooked_ids = {id(h) for h in hooked}
    muted = tensor_hook_dicts([q for q in every if id(q) not in hooked_ids])
    with hooks_muted(muted) if muted else nullcontext(), torch.enable_grad():
        if reads.reentrant:
            grads = _backward_into_fresh(outs, every, cots)
        else:
            grads = list(torch.autograd.grad(outs, every, cots, allow_unused=True))
    hidden.add(leaves, grads[len(inputs):])
    return grads[:len(inputs)]


def refuse_unknown_reads(roots, inputs: Sequence[torch.Tensor], unlisted: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The plain leaves (HiddenLeaves) the graph under `roots` reads beside `inputs`; an error for a
    parameter or a computed tensor read there (docs/engine.md, "Inside the engine": rerun)."""
    read, leaves = unknown_reads(roots, inputs, unlisted)
    if read is None:
        return leaves
    if read.grad_fn is not None:
        raise RuntimeError(
            f"model reads a tensor that requires grad and was computed outside it (shape {tuple(read.shape)}, "
            f"from {read.grad_fn.name()}) in an evaluation after its first, where the solve did not see it: the "
            "adjoint differentiates only its inputs, so that tensor's gradient would be missing. Pass it as "
            "adjoint_params, compute it inside the model, or use adjoint=False")
    raise RuntimeError(
        f"model reads a parameter that requires grad (shape {tuple(read.shape)}, {read.dtype}) in an evaluation "
        "after its first, and the solve did not find it among its inputs (it looked through the model, its "
        "modules and their hooks, closures and globals): its gradient would be missing. Pass it in "
        "adjoint_params=[...] (with the model's parameters), or use adjoint=False")


def unknown_reads(roots, inputs, unlisted=()) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """(The first read to refuse -- an nn.Parameter none of `inputs`, a computed tensor of `unlisted` -- or
    None; the plain leaves) of the graph under the autograd nodes `roots`, walked down to the inputs."""
    known = {id(q) for q in inputs}
    stops = {q.grad_fn for q in inputs if q.grad_fn is not None}
    computed = {q.grad_fn: q for q in unlisted if q.grad_fn not in stops}
    leaves: List[torch.Tensor] = []
    for node in graph_nodes(roots, stops=stops):
        if node in computed:
            return computed[node], leaves
        leaf = leaf_of(node)
        if leaf is not None and id(leaf) not in known:
            if isinstance(leaf, torch.nn.Parameter):
                return leaf, leaves
            leaves.append(leaf)
    return None, leaves


class HiddenLeaves:
    """What a backward's VJPs owe plain leaf tensors no input of the solve holds, accumulated into .grad
    once, on their sum (docs/engine.md, "What you get over torchdiffeq.odeint_adjoint")."""

    def __init__(self):
        self.sums: dict = {}  # id -> [weak reference to the leaf, its summed gradient]

    def add(self, leaves: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> None:
        for leaf, g in zip(leaves, grads):
            if g is None:
                continue
            got = self.sums.get(id(leaf))
            if got is not None:
                got[1] = got[1] + g.detach()
                continue
            # held weakly: a leaf only its evaluation's graph held (one the velocity made, as for an
            # energy's gradient) dies with that graph and its share with it -- no one can read its .grad,
            # and the backward's memory stays flat in the number of steps
            forget = functools.partial(self.sums.pop, id(leaf), None)
            self.sums[id(leaf)] = [weakref.ref(leaf, lambda _, forget=forget: forget()), g.detach().clone()]

    def accumulate(self) -> None:
        """Into each living leaf's .grad through its own AccumulateGrad, hooks and all, once."""
        live = [(ref(), g) for ref, g in self.sums.values()]
        self.sums = {}
        live = [(q, g) for q, g in live if q is not None]
        if live:
            torch.autograd.backward([q for q, _ in live], [g.to(q.dtype) for q, g in live])


def _backward_into_fresh(outputs: List[torch.Tensor], inputs: List[torch.Tensor], cotangents: List[torch.Tensor]):
    """The VJP through torch.autograd.backward into fresh .grad, for graphs with a reentrant checkpoint
    (docs/engine.md, "Inside the engine": rerun)."""
    computed = [i for i, q in enumerate(inputs) if not q.is_leaf]
    if computed:
        # backward without inputs= would run on through such an input's own graph
        raise RuntimeError(
            "the velocity runs torch.utils.checkpoint(..., use_reentrant=True) and the solve's input "
            f"{computed[0]} (adjoint_params) is computed outside the model: use use_reentrant=False in the "
            "checkpoint, or adjoint=False")
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
    """torch's once_differentiable for an adjoint's backward, whose second derivative error cannot be
    missed (ctx.differentiated: x, the parameters). Why: docs/engine.md, "Inside the engine": rerun."""
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


class GradientSum:
    """The parameters' gradients summed over the evaluations' VJPs (None until one reads the parameter), in
    float32 whatever the network's dtype (float64, complex64 and complex128 parameters in their own)."""

    def __init__(self, params):
        self.params = list(params)
        self.acc: List[Optional[torch.Tensor]] = [None] * len(self.params)
        wide = (torch.float64, torch.complex64, torch.complex128)
        self.dtypes = [q.dtype if q.dtype in wide else torch.float32 for q in self.params]

    def add(self, grads, returned=(), given=()) -> None:
        """acc[q] += grads[q] for every gradient present, in one foreach call; a fresh first gradient becomes
        the accumulator as it is. Why, and what is fresh: docs/engine.md, "Inside the engine": rerun."""
        if not self.params:
            return
        counts = Counter(id(r) for r in returned if r is not None)
        given_ids = {id(t) for t in given}
        into, add = [], []
        for q, gq in enumerate(grads):
            if gq is None:
                continue
            acc = self.acc[q]
            if acc is None:
                fresh = (gq.dtype == self.dtypes[q] and view_base(gq) is None and counts.get(id(gq)) == 1
                         and id(gq) not in given_ids)
                self.acc[q] = gq if fresh else gq.to(self.dtypes[q], copy=True)
            elif acc.dtype == gq.dtype:
                into.append(acc)
                add.append(gq)
            else:
                acc.add_(gq)
        if into:
            foreach_add_(into, add)

    def totals(self) -> List[Optional[torch.Tensor]]:
        """Each parameter's summed gradient in its own dtype (None for one no evaluation read)."""
        return [None if g is None else g.to(q.dtype) for g, q in zip(self.acc, self.params)]
