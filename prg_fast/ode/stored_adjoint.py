"""The stored adjoint (StoredAdjoint, the default): AdjointSolve and its backward walk. The backward's
arithmetic (time gradients included): docs/engine.md, "Inside the engine": stored_adjoint."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from .discovery import discover
from .free_memory import AUTO_FRACTION, free_bytes
from .integrate import Problem, check_choice, check_flag, run, solve
from .kept_graphs import EvaluationGraphs, Tail, log, unless_out_of_memory
from .rerun import GradientSum, StateHooks, graph_vjp, once_differentiable, refuse_unknown_reads

AUTO = "auto"  # memory_budget: what fits in AUTO_FRACTION of the free memory (the default)
STORES = ("stages", "steps")


def check_memory_budget(value) -> Union[None, float, str]:
    if value is None or (isinstance(value, str) and value == AUTO):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ValueError(f'memory_budget must be "auto" (what fits in {AUTO_FRACTION:g} of the free memory), None '
                         "(recompute every evaluation) or a number of bytes >= 0 (float('inf') keeps every "
                         f"evaluation's graph), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StoredAdjoint:
    """The exact discrete adjoint from stored stage inputs (or step states), keeping the graphs of the last
    evaluations that fit in `memory_budget` bytes ("auto": a share of the free memory; None: none)."""

    memory_budget: Union[None, float, str] = AUTO
    store: str = "stages"
    preserve_rng_state: bool = True

    def __post_init__(self):
        object.__setattr__(self, "memory_budget", check_memory_budget(self.memory_budget))
        check_choice(self.store, "store", STORES)
        check_flag(self.preserve_rng_state, "preserve_rng_state")

    def budget_bytes(self, device: torch.device) -> Optional[float]:
        """The budget in bytes for a solve on `device` starting now (None when unknown: keep nothing)."""
        if self.memory_budget != AUTO:
            return self.memory_budget
        free = free_bytes(device)
        return None if free is None else AUTO_FRACTION * free

    def graphs_to_keep(self, evaluations: int, graph_bytes: Optional[int], budget: Optional[float]) -> int:
        """How many of `evaluations` keep their graphs, each `graph_bytes` (None: unmeasured), within `budget`."""
        if budget is None or graph_bytes is None:
            return 0
        if math.isinf(budget):
            return evaluations
        return min(evaluations, int(budget // max(graph_bytes, 1)))

    def run(self, problem: Problem, x: torch.Tensor) -> torch.Tensor:
        """The states at the grid's outputs, stacked, differentiated by this adjoint."""
        if not torch.is_grad_enabled():
            return solve(problem, x)
        times, (problem, first, time_grad, differentiated) = problem.grid.times, discover(problem, x)
        if not differentiated:  # nothing to differentiate: the first evaluation is reused all the same
            return solve(problem, x, first.evaluator() if first is not None else None)
        # an adaptive solve's forward is its controller's (prg_fast.ode.adaptive.AcceptedGraphs)
        graphs = (problem.controller.graphs if problem.controller else EvaluationGraphs)(problem, self, first,
                                                                                         x.device, time_grad)
        log.debug("adjoint: %s of %s evaluation graphs kept (%s bytes each, budget %s bytes, memory_budget=%r%s)",
                  graphs.kept_count, graphs.total, graphs.graph_bytes, graphs.budget, self.memory_budget,
                  "" if graphs.unkeepable is None else f"; none can be kept: {graphs.unkeepable}")
        if graphs.as_backprop:
            outs = _as_backprop(graphs, x, times)
            if outs is not None:
                # the times the solve reads (an adaptive one its output times, as the controller's shifts)
                moving = problem.controller.shifts if problem.controller is not None else times
                return AdjointSolveKept.apply(graphs, x, moving, *outs)
        return AdjointSolve.apply(problem, graphs, times, x, *problem.reads.params)


def _as_backprop(graphs: EvaluationGraphs, x: torch.Tensor, times) -> Optional[List[torch.Tensor]]:
    """The solve's outputs with their graph by plain backprop (its first evaluation discovery's, except under
    time gradients: discovery read the `times` without their graph, and a time leaf of its own, so the first
    evaluation runs again); None after an allocation failure, to run the adjoint's forward instead."""
    p, first = graphs.problem, graphs.first
    if graphs.time_grad:
        p = p.on(dataclasses.replace(p.grid, times=times))

    def attempt() -> List[torch.Tensor]:
        with torch.enable_grad():
            if first is None:
                return run(p, x.to(p.state_dtype))
            if graphs.time_grad:
                first.discard(p)
            return run(p, first.start if first.start is not None else x.to(p.state_dtype),
                       evaluator=first.evaluator(with_graph=True))

    return unless_out_of_memory(graphs, attempt)


class AdjointSolveKept(torch.autograd.Function):
    """The outputs of a solve run as plain backprop (_as_backprop), stacked, carrying `.evals`; its backward
    (unbind) is differentiable. Why: docs/engine.md, "Inside the engine": stored_adjoint."""

    @staticmethod
    def forward(ctx, evals: EvaluationGraphs, x: torch.Tensor, times: Optional[torch.Tensor], *outs: torch.Tensor):
        # what the graph may read: x and the times (where the walk stops) and the solve's inputs
        # (refuse_unknown_reads)
        ctx.evals, ctx.roots = evals, [o.grad_fn for o in outs]
        ctx.inputs = (x, *evals.problem.reads.params) + (() if times is None else (times,))
        return torch.stack(outs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        refuse_unknown_reads(ctx.roots, ctx.inputs, ctx.evals.problem.reads.unlisted)
        return (None, None, None, *grad_out.unbind(0))


class AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, evals: EvaluationGraphs, times: Optional[torch.Tensor], x: torch.Tensor,
                *params: torch.Tensor):
        stored: list = []
        x0 = x.detach().to(problem.state_dtype)  # no evaluation of the forward sees x's requires_grad
        outs = unless_out_of_memory(evals, lambda: evals.run_forward(x0, stored))
        if outs is None:  # the kept graphs met an allocation failure: again, keeping none
            stored.clear()
            outs = evals.run_forward(x0, stored)
        ctx.save_for_backward(*stored)  # not as ctx attributes: docs/engine.md, "Inside the engine": stored_adjoint
        # the problem the forward walked (an adaptive controller's accepted grid: kept_graphs)
        ctx.problem, ctx.evals, ctx.rng = evals.problem, evals, evals.replay.rng
        ctx.x_dtype = x.dtype
        ctx.differentiated = (x, *params)  # what a second derivative would reach (once_differentiable)
        return torch.stack(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        return ctx.evals.replay.backward(lambda: _backward(ctx, grad_out))


def _backward(ctx, grad_out: torch.Tensor):
    p: Problem = ctx.problem
    s = p.tableau.stages
    walk = BackwardWalk(p, ctx.evals, grad_out, want_tgrad=p.grid.times is not None and ctx.needs_input_grad[2],
                        x_grad=ctx.needs_input_grad[3])
    stored = list(ctx.saved_tensors)  # the steps before the tail's
    tail = ctx.evals.take_tail()
    if tail is not None:  # the whole steps kept as one graph: one VJP
        walk.tail(tail)
    for n in reversed(range(p.steps if tail is None else tail.start)):
        walk.arrive(n + 1)
        if ctx.evals.store == "steps":  # the saved tensors are step start states: stage inputs recomputed now
            inputs = walk.step_stage_inputs(n, stored.pop())
        else:
            inputs, stored = stored[-s:], stored[:-s]
        walk.step(n, inputs)
    walk.arrive(0)
    gtimes = walk.gtimes
    if gtimes is not None and p.controller is not None:  # an adaptive grid moves with its placeholder's start
        gtimes = torch.stack([gtimes.sum(), gtimes.new_zeros(())])
    return (None, None, gtimes, walk.lam.to(ctx.x_dtype), *walk.grads.totals())


def dense_cotangents(p: Problem, grad_out: torch.Tensor) -> dict:
    """An adaptive solve's dense outputs y_n + h sum_i b_i(theta) k_i: step n -> [(b(theta), the
    output's cotangent)]."""
    dense: dict = {}
    for pos, place in enumerate(p.grid.dense or ()):
        if place is not None:
            dense.setdefault(place[0], []).append((p.tableau.weights(place[1]), grad_out[pos].to(p.state_dtype)))
    return dense


class BackwardWalk:
    """The backward's running cotangents, walked step by step in reverse: lam (the state's), the
    parameters' (GradientSum) and the grid's; each evaluation kept (kept_graphs) or recomputed."""

    def __init__(self, p: Problem, evals: EvaluationGraphs, grad_out: torch.Tensor, want_tgrad: bool, x_grad: bool):
        self.p, self.evals, self.want_tgrad = p, evals, want_tgrad
        # cotangent arriving at each grid index from the outputs (an index may be output twice)
        self.arriving = p.grid.output_cotangents(grad_out)
        self.lam = torch.zeros(grad_out.shape[1:], dtype=p.state_dtype, device=grad_out.device)
        self.gtimes = torch.zeros_like(p.grid.times) if want_tgrad else None
        self.params = list(p.reads.params)
        self.grads = GradientSum(self.params)
        self.gt = self.gh = None
        self.hooks = StateHooks(skip_x=not x_grad or (evals.first is not None and evals.first.read_x))
        self.dense = dense_cotangents(p, grad_out)

    def arrive(self, m: int) -> None:
        if m in self.arriving:
            self.lam = self.p.backend.combine(self.lam, [self.arriving.pop(m)], [1.0], 1.0, self.p.state_dtype)
        self.lam = self.hooks.run(m, self.lam)  # the state's whole cotangent: its hooks run now

    def tail(self, tail: Tail) -> None:
        """The VJP of the forward's tail: from the cotangents at its output points to lam at tail.start."""
        arrived = [(state, self.arriving.pop(m)) for m, state in tail.states.items() if m in self.arriving]
        outputs, cotangents = [state for state, _ in arrived], [g.to(state.dtype) for state, g in arrived]
        self.hooks.take(tail.start, tail.leaf)
        grads = graph_vjp(outputs, [tail.leaf] + self.params, cotangents, self.p.reads, self.evals.replay.hidden)
        if grads[0] is not None:
            self.lam = self.lam + grads[0].to(self.lam.dtype)
        self.grads.add(grads[1:], returned=grads, given=cotangents)

    def step(self, n: int, inputs: List[torch.Tensor]) -> None:
        p = self.p
        t, h, taus = p.step_at(n)
        mus, self.now = [None] * p.tableau.stages, self.dense.pop(n, [])  # (the step's dense outputs)
        if self.want_tgrad:
            self.gt, self.gh = torch.zeros_like(t), torch.zeros_like(t)
        for i in reversed(range(p.tableau.stages)):
            self.stage(n, i, h, taus[i], inputs[i], mus)
        if self.want_tgrad:
            self.gtimes[n] += self.gt - self.gh
            self.gtimes[n + 1] += self.gh
        live = [mu for mu in mus if mu is not None] + [g for _, g in self.now]
        if live:
            self.lam = p.backend.combine(self.lam, live, [1.0] * len(live), 1.0, p.state_dtype)

    def cotangent(self, i: int, h, mus: list):
        """(g_i, e_i): the cotangent of k_i, g_i = h e_i with e_i = b_i lam + sum_m a_mi mu_m (e_i on a tensor
        grid, where h may be 0); (None, None) if k_i influences nothing."""
        p, tab = self.p, self.p.tableau
        terms = [(mus[m], tab.a[m][i]) for m in range(i + 1, tab.stages) if tab.a[m][i] != 0.0 and mus[m] is not None]
        terms += [(g, w[i]) for w, g in self.now if w[i] != 0.0]  # the step's dense outputs read k_i too
        if tab.b[i] == 0.0 and not terms:
            return None, None
        return p.backend.scaled(self.lam, [g for g, _ in terms], [w for _, w in terms], tab.b[i], h, p.net_dtype,
                                p.state_dtype)

    def evaluation(self, n: int, i: int, tau, xi: torch.Tensor):
        """(leaf, tau, k): evaluation (n, i) with its graph, kept (handed over once) or recomputed from `xi`."""
        e = n * self.p.tableau.stages + i
        got = self.evals.kept.pop(e, None)
        if got is not None:
            return got
        leaf = xi.detach().requires_grad_(True)
        with torch.enable_grad(), self.evals.replay.rerun(e):
            return leaf, tau, self.p.evaluate(tau, leaf)

    def stage(self, n: int, i: int, h, tau, xi: torch.Tensor, mus: list) -> None:
        """mu_i = g_i^T df/dX (and the parameters' and the time's shares) for evaluation (n, i)."""
        g, e = self.cotangent(i, h, mus)
        if g is None:
            return
        if isinstance(tau, torch.Tensor):
            tau = tau.requires_grad_(self.want_tgrad)
        xi, tau, k = self.evaluation(n, i, tau, xi)
        timed_leaf = self.want_tgrad and isinstance(tau, torch.Tensor) and tau.requires_grad
        inputs = [xi] + ([tau] if timed_leaf else []) + self.params
        # the parameters' hooks run once on the returned total (autograd), the velocity's on x: StateHooks
        self.hooks.take(n, xi, StateHooks.reads_state(self.p, i))
        grads = graph_vjp([k], inputs, [g], self.p.reads, self.evals.replay.hidden, hooked=[xi])
        if not timed_leaf:
            grads.insert(1, None)
        if self.want_tgrad:
            # k_i enters x_{n+1} and the later stage inputs through h e_i: <e_i, k_i> per row (a float h, an
            # adaptive solve's, does not move)
            if e is not None:
                self.gh += self.p.row_dot(e, k.detach())
            if grads[1] is not None:
                self.gt += grads[1]
                self.gh += self.p.tableau.c[i] * grads[1]
        del k
        mus[i] = grads[0] if grads[0] is not None else torch.zeros_like(xi)
        self.grads.add(grads[2:], returned=grads, given=(g,))

    def step_stage_inputs(self, n: int, x: torch.Tensor) -> List[torch.Tensor]:
        """store="steps": the stage inputs of step n recomputed from its start state x (kept outputs reused)."""
        p, s = self.p, self.p.tableau.stages
        _, h, taus = p.step_at(n)
        inputs: List[torch.Tensor] = []

        def evaluate(i: int, tau, xi: torch.Tensor) -> Optional[torch.Tensor]:
            inputs.append(xi)
            if i == s - 1:
                return None  # the last stage's output is not needed for any input
            kept = self.evals.kept.get(n * s + i)
            if kept is not None:
                return kept[2].detach()
            with self.evals.replay.rerun(n * s + i):
                return p.evaluate(tau, xi)

        with torch.no_grad():
            p.stages(x, h, taus, evaluate)
        return inputs
