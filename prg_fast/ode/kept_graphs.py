"""The stored adjoint's forward: which evaluation graphs it keeps (the last ones, which the
backward needs first), the tail run as one graph, plain backprop when all fit, and the fall back on
an allocation failure. Why so: docs/engine.md, "Inside the engine"; costs: "Adjoint strategies"."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch

from .discovery import FirstEvaluation
from .free_memory import is_out_of_memory
from .integrate import Problem, walk
from .rerun import ReplayRecord

# the strategies' log (docs/engine.md): what the stored adjoint keeps, at DEBUG for every solve
log = logging.getLogger("prg_fast.ode.strategies")
T = TypeVar("T")


@dataclass
class Tail:
    """The whole steps start .. K-1 (start > 0) of a forward, run as one graph from the leaf `leaf`
    (the state at grid point `start`): `states` are its states at the output points after `start`,
    with their graph."""

    start: int
    leaf: torch.Tensor
    states: Dict[int, torch.Tensor]

    @classmethod
    def run(cls, p: Problem, state: torch.Tensor, start: int, evaluator) -> "Tail":
        """Steps start .. K-1 from `state` with a graph from a leaf there, by `evaluator` (the
        forward's tail_evaluate, or a backward's rerun: EvaluationGraphs.take_tail)."""
        leaf = state.detach().requires_grad_(True)
        with torch.enable_grad():
            _, states = walk(p, leaf, start, p.steps, evaluator=evaluator)
        return cls(start, leaf, {m: v for m, v in states.items() if m > start})


def unless_out_of_memory(graphs: "EvaluationGraphs", attempt: Callable[[], T]) -> Optional[T]:
    """attempt(), which keeps graphs; an allocation failure there is not the run's end: everything
    kept is freed, the forward is put back to its start keeping nothing (graphs.fall_back: exact,
    the random state and the written buffers are restored) and None says to run it again."""
    try:
        return attempt()
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if graphs.kept_count == 0 or not is_out_of_memory(error):
            raise
        message = str(error).splitlines()[0]
    # outside the except block: the failed attempt's frames (and the graphs they hold) are gone
    graphs.fall_back(message)
    return None


class EvaluationGraphs:
    """For one stored-adjoint solve: runs the forward's evaluations, keeping the graphs the budget
    allows and recording what their reruns need; the backward (stored_adjoint.BackwardWalk) takes
    them from `kept` and `take_tail`. Observable as the backward node's `.evals` and in the debug
    log (`budget`, `graph_bytes`, `kept_count`, ...: docs/engine.md, "Adjoint strategies")."""

    def __init__(self, problem: Problem, strategy, first: Optional[FirstEvaluation], device: torch.device,
                 time_grad: bool):
        # time_grad: kept graphs then read their time through a leaf requiring grad, so the backward
        # can take dL/dtau from them as from a recomputation
        self.problem, self.first, self.store, self.time_grad = problem, first, strategy.store, time_grad
        self.graph_bytes = first.nbytes if first is not None else None  # of one evaluation
        self.budget = strategy.budget_bytes(device)
        self.total = problem.evaluations  # (unbounded while an adaptive controller picks the grid)
        # a graph that a later evaluation invalidates is recomputed instead (FirstEvaluation.unkeepable)
        self.unkeepable = first.unkeepable if first is not None else None
        self._keep(strategy.graphs_to_keep(self.total, self.graph_bytes, self.budget) if self.unkeepable is None else 0)
        self.fell_back = False
        self.replay = ReplayRecord(problem, device, strategy.preserve_rng_state)

    def _keep(self, count: int) -> None:
        """Keep the graphs of the last `count` evaluations: those of whole steps at the end run as one
        graph (the tail, plain autograd: one VJP for all of them), those of a step partly kept one
        graph each; a tensor grid's time leaves and reentrant checkpoints take one graph each."""
        p, s = self.problem, self.problem.tableau.stages
        self.kept_count = count
        self.keep_from = p.steps * s - count  # evaluations e = n * s + i >= keep_from keep their graphs
        whole = not self.time_grad and not p.reads.reentrant
        # the tail's first step; never 0: a solve keeping every graph runs as plain backprop instead
        # (as_backprop), whose graph reaches x itself
        self.tail_from = max(1, -(-self.keep_from // s)) if whole else p.steps
        self.kept: Dict[int, Tuple[torch.Tensor, object, torch.Tensor]] = {}  # e -> (leaf, tau, k)
        self.tail: Optional[Tail] = None
        self.tail_start: Optional[torch.Tensor] = None  # the state at the tail's start (a rerun's)

    @property
    def as_backprop(self) -> bool:
        """Every evaluation's graph fits (none is invalidated by a later one) and no time gradient
        is asked for: the solve is plain backprop, one autograd graph from x, and no Function of
        the adjoint stands between it and autograd."""
        return self.keep_from == 0 and self.unkeepable is None and not self.time_grad

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
        or each step's start state of the steps before the tail (unless_out_of_memory runs it)."""
        p = self.problem
        where = dict(states=stored) if self.store == "steps" else dict(stage_inputs=stored)
        x, saved = walk(p, x, 0, self.tail_from, evaluator=self.forward_evaluate, **where)
        if self.tail_from < p.steps:
            # the tail stores nothing: its backward is one VJP through its graph, a second backward
            # reruns it whole from its start state (take_tail); its stage inputs live in its graph
            self.tail_start = x.detach()
            self.tail = Tail.run(p, self.tail_start, self.tail_from, self.tail_evaluate)
            saved.update({m: v.detach() for m, v in self.tail.states.items()})
        self.replay.finish(reruns=self.keep_from > 0)  # every graph kept: a first backward reruns nothing
        return p.grid.gather_outputs(saved)

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
            if e >= self.keep_from and first.start is None and first.leaf.requires_grad:
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
            return Tail.run(self.problem, self.tail_start, self.tail_from, rerun)
