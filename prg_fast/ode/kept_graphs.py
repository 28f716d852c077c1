"""The stored adjoint's forward: which evaluation graphs it keeps, and what it stores.

The exact adjoint (prg_fast.ode.stored_adjoint) needs, for every evaluation k = f(t, X) of the
forward, the vector-Jacobian product g^T df/d(X, theta), from the evaluation *with its autograd
graph*, from one of two sources:

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
graph per evaluation. No graph is kept when the first evaluation's graph saves a buffer that it
writes in place (its version moves: every later evaluation's write would invalidate the earlier
graphs, as in plain backprop, where rerunning from the buffer's snapshot is exact;
`FirstEvaluation.unkeepable`).

An allocation failure while graphs are kept (`EvaluationGraphs.run_forward`) frees them and runs
the forward again keeping none, from the random state and written buffers it started with.

`store`: "stages" (every stage input, K*s buffers) or "steps" (each step's start state, K
buffers; the backward recomputes the step's stage inputs, s-1 evaluations without graph, reusing
kept outputs), for the steps before the tail: the tail stores nothing (its graph holds what its
backward reads, and a second backward reruns it from its start state). What a rerun needs to be
exact is recorded by prg_fast.ode.rerun.ReplayRecord.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .discovery import FirstEvaluation
from .free_memory import is_out_of_memory
from .integrate import Problem, walk
from .rerun import ReplayRecord

# the strategies' log (docs/engine.md): what the stored adjoint keeps, at DEBUG for every solve
log = logging.getLogger("prg_fast.ode.strategies")


@dataclass
class Tail:
    """The whole steps start .. K-1 (start > 0) of a forward, run as one graph from the leaf `leaf`
    (the state at grid point `start`): `states` are its states at the output points after `start`,
    with their graph."""

    start: int
    leaf: torch.Tensor
    states: Dict[int, torch.Tensor]


class EvaluationGraphs:
    """For one stored-adjoint solve: runs the forward's evaluations, keeping the graphs the budget
    allows and recording what their reruns need; the backward (stored_adjoint.BackwardWalk) takes
    them from `kept` and `take_tail`.

    Observable on the solve's backward node (`out.grad_fn`, AdjointSolveBackward, `.evals`) and in
    the debug log "prg_fast.ode.strategies": `budget` (the bytes assumed, "auto" resolved),
    `graph_bytes`, `kept_count`, `as_backprop`, `fell_back` (an allocation failure made the forward
    start over keeping none), `unkeepable` (why no graph could be kept, or None)."""

    def __init__(self, problem: Problem, strategy, first: Optional[FirstEvaluation], device: torch.device,
                 time_grad: bool):
        self.problem, self.first, self.store = problem, first, strategy.store
        # kept graphs then read their time through a leaf requiring grad, so the backward can take
        # dL/dtau from them as from a recomputation
        self.time_grad = time_grad
        self.graph_bytes = first.nbytes if first is not None else None  # of one evaluation
        self.budget = strategy.budget_bytes(device)
        # an adaptive solve's count is unknown: "auto" runs it as plain backprop while its graphs fit the
        # budget (past it the controller raises an allocation failure: the fallback below, recomputing all),
        # a budget in bytes keeps the last graphs that fit (a window), 0 none (prg_fast.ode.adaptive)
        total = problem.steps * problem.tableau.stages if problem.controller is None else math.inf
        self.auto = problem.controller is not None and strategy.memory_budget == "auto"
        # a graph that a later evaluation invalidates is recomputed instead (FirstEvaluation.unkeepable)
        self.unkeepable = first.unkeepable if first is not None else None
        self._keep(strategy.graphs_to_keep(total, self.graph_bytes, self.budget) if self.unkeepable is None else 0)
        self.fell_back = False
        self.replay = ReplayRecord(problem, device, strategy.preserve_rng_state)
        log.debug("adjoint: %s of %s evaluation graphs kept (%s bytes each, budget %s bytes, memory_budget=%r%s)",
                  self.kept_count, total, self.graph_bytes, self.budget, strategy.memory_budget,
                  "" if self.unkeepable is None else f"; none can be kept: {self.unkeepable}")

    def _keep(self, count: int) -> None:
        """Keep the graphs of the last `count` evaluations: those of whole steps at the end run as one
        graph (the tail, plain autograd: one VJP for all of them), those of a step partly kept one
        graph each; a tensor grid's time leaves and reentrant checkpoints take one graph each."""
        p, s = self.problem, self.problem.tableau.stages
        self.kept_count = count
        self.keep_from = p.steps * s - count  # evaluations e = n * s + i >= keep_from keep their graphs
        self.window = None  # an adaptive forward keeping the last `window` graphs
        if p.controller is not None:
            self.keep_from = 0 if count > 0 else math.inf
            self.window = count if 0 < count < math.inf and not self.auto else None
            p.controller.limit = count if self.auto else math.inf
        whole = not self.time_grad and not p.reads.reentrant
        # the tail's first step; never 0: a solve keeping every graph runs as plain backprop instead
        # (as_backprop), whose graph reaches x itself
        self.tail_from = max(1, -(-self.keep_from // s)) if whole else p.steps
        self.tail_from = math.inf if p.controller is not None else self.tail_from  # (its grid is picked as it runs)
        self.kept: Dict[int, Tuple[torch.Tensor, object, torch.Tensor]] = {}  # e -> (leaf, tau, k)
        self.tail: Optional[Tail] = None
        self.tail_start: Optional[torch.Tensor] = None  # the state at the tail's start (a rerun's)

    @property
    def as_backprop(self) -> bool:
        """Every evaluation's graph fits (none is invalidated by a later one) and no time gradient
        is asked for: the solve is plain backprop, one autograd graph from x, and no Function of
        the adjoint stands between it and autograd."""
        return self.keep_from == 0 and self.window is None and self.unkeepable is None and not self.time_grad

    def fall_back(self, message: str) -> None:
        """Back to the start of the forward after an allocation failure, keeping no graph: the first
        evaluation's output and its draws and buffer writes are undone (it is rerun without a
        graph), the records cleared."""
        log.warning("adjoint: out of memory while keeping %d evaluation graphs (%s); recomputing them in the "
                    "backward instead", self.kept_count, message)
        self._keep(0)
        self.fell_back = True
        if self.first is not None:
            self.first.discard(self.problem)
        self.replay.clear()

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
        self.fall_back(message)
        stored.clear()
        return self._run_forward(x, stored)

    def _run_forward(self, x: torch.Tensor, stored: list) -> List[torch.Tensor]:
        p = self.problem
        where = dict(states=stored) if self.store == "steps" else dict(stage_inputs=stored)
        if p.controller is not None:  # the controller picks the grid: the backward walks the one it accepted
            outs = p.controller.run(p, x, evaluator=self.forward_evaluate, **where)
            self.problem = p.controller.accepted(p, self)
            self.replay.finish(reruns=True)
            return outs
        x, saved = walk(p, x, 0, self.tail_from, evaluator=self.forward_evaluate, **where)
        if self.tail_from < p.steps:
            # the tail stores nothing: its backward is one VJP through its graph, a second backward
            # reruns it whole from its start state (take_tail); its stage inputs live in its graph
            self.tail_start = x.detach()
            self.tail = self._tail_graph(self.tail_evaluate)
            saved.update({m: v.detach() for m, v in self.tail.states.items()})
        self.replay.finish(reruns=self.keep_from > 0)  # every graph kept: a first backward reruns nothing
        return p.grid.gather_outputs(saved)

    def _tail_graph(self, evaluator) -> Tail:
        """Steps tail_from .. K-1 run with a graph from a leaf at the tail's start state, by
        `evaluator` (the forward's tail_evaluate, or a backward's rerun: take_tail)."""
        p = self.problem
        leaf = self.tail_start.detach().requires_grad_(True)
        with torch.enable_grad():
            _, states = walk(p, leaf, self.tail_from, p.steps, evaluator=evaluator)
        return Tail(self.tail_from, leaf, {m: v for m, v in states.items() if m > self.tail_from})

    def forward_evaluate(self, problem: Problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
        """The forward's evaluation (n, i) before the tail (an evaluator for integrate.walk): the
        first evaluation's output for (0, 0) (recorded as the forward's evaluation 0), else run, with
        its graph kept from a leaf of ours when the budget keeps it."""
        e = n * problem.tableau.stages + i
        first = self.first
        if e == 0 and first is not None and first.k is not None:
            state = self.replay.state  # the written buffers, as they were before it
            self.replay.record(e, first.rng, state.first if state is not None else None)
            k = first.take()
            # its graph is kept only from a leaf of ours (the backward's VJP stops there): under time
            # gradients, the one case that keeps evaluation 0 here (else it runs as_backprop)
            if e >= self.keep_from and first.leaf.requires_grad and first.leaf.grad_fn is None:
                self.kept[e] = (first.leaf, first.tau, k)
            return k.detach()
        self.replay.record(e)
        if e < self.keep_from:
            return problem.evaluate(t, xi)
        leaf = xi.detach().requires_grad_(True)
        if self.time_grad and isinstance(t, torch.Tensor):
            t = t.detach().requires_grad_(True)
        with torch.enable_grad():
            k = problem.evaluate(t, leaf)
        self.kept[e] = (leaf, t, k)
        if self.window is not None and len(self.kept) > self.window:  # an adaptive forward: the last `window`
            del self.kept[min(self.kept)]  # graphs kept; the oldest is dropped, its stage input is stored anyway
        return k.detach()

    def tail_evaluate(self, problem: Problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
        """An evaluation of the tail (grad mode on: its graph joins the tail's)."""
        e = n * problem.tableau.stages + i
        # the tail is rerun as a whole (take_tail): one random state, its first evaluation's
        self.replay.record(e, chained=e > self.tail_from * problem.tableau.stages)
        return problem.evaluate(t, xi)

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
