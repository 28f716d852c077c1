"""The stored adjoint's forward: which evaluation graphs it keeps, the tail run as one graph, and the fall back
on an allocation failure. Why so: docs/engine.md, "Inside the engine": kept_graphs; costs: "Adjoint strategies"."""
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
    """The whole steps start .. K-1 (start > 0) of a forward, one graph from `leaf` (the state at grid point
    `start`); `states`: its states at the output points after `start`, with their graph."""

    start: int
    leaf: torch.Tensor
    states: Dict[int, torch.Tensor]

    @classmethod
    def run(cls, p: Problem, state: torch.Tensor, start: int, evaluator) -> "Tail":
        """Steps start .. K-1 from `state` with a graph from a leaf there, by `evaluator`."""
        leaf = state.detach().requires_grad_(True)
        with torch.enable_grad():
            _, states = walk(p, leaf, start, p.steps, evaluator=evaluator)
        return cls(start, leaf, {m: v for m, v in states.items() if m > start})


def unless_out_of_memory(graphs: "EvaluationGraphs", attempt: Callable[[], T]) -> Optional[T]:
    """attempt(), which keeps graphs; after an allocation failure there None, to run it again keeping
    nothing (graphs.fall_back: everything kept freed, the random state and written buffers restored)."""
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
    """For one stored-adjoint solve: runs the forward's evaluations, keeping the graphs the budget allows
    (`kept`, `take_tail`) and recording what their reruns need. Observable: docs/engine.md, "Adjoint strategies"."""

    def __init__(self, problem: Problem, strategy, first: Optional[FirstEvaluation], device: torch.device,
                 time_grad: bool):
        self.problem, self.first, self.store, self.time_grad = problem, first, strategy.store, time_grad
        self.graph_bytes = first.nbytes if first is not None else None  # of one evaluation
        self.budget = strategy.budget_bytes(device)
        self.total = problem.evaluations  # (unbounded while an adaptive controller picks the grid)
        self.unkeepable = first.unkeepable if first is not None else None
        self._keep(strategy.graphs_to_keep(self.total, self.graph_bytes, self.budget) if self.unkeepable is None else 0)
        self.fell_back = False
        self.replay = ReplayRecord(problem, device, strategy.preserve_rng_state)

    def _keep(self, count: int) -> None:
        """Keep the graphs of the last `count` evaluations: whole steps at the end as one graph (the tail)."""
        p, s = self.problem, self.problem.tableau.stages
        self.kept_count = count
        self.keep_from = p.steps * s - count  # evaluations e = n * s + i >= keep_from keep their graphs
        whole = not self.time_grad and not p.reads.reentrant
        # the tail's first step; never 0: a solve keeping every graph runs as_backprop instead
        self.tail_from = max(1, -(-self.keep_from // s)) if whole else p.steps
        self.kept: Dict[int, Tuple[torch.Tensor, object, torch.Tensor]] = {}  # e -> (leaf, tau, k)
        self.tail: Optional[Tail] = None
        self.tail_start: Optional[torch.Tensor] = None  # the state at the tail's start (a rerun's)

    @property
    def as_backprop(self) -> bool:
        """Every evaluation's graph fits: the solve is plain backprop."""
        return self.keep_from == 0 and self.unkeepable is None

    def fall_back(self, message: str) -> None:
        """Back to the start of the forward keeping no graph (the first evaluation undone, the records cleared)."""
        log.warning("adjoint: out of memory while keeping %d evaluation graphs (%s); recomputing them in the "
                    "backward instead", self.kept_count, message)
        self._keep(0)
        self.fell_back = True
        if self.first is not None:
            self.first.discard(self.problem)
        self.replay.clear()

    def run_forward(self, x: torch.Tensor, stored: list) -> List[torch.Tensor]:
        """The forward's outputs (without graph); `stored` receives the steps' stage inputs before the
        tail (or with store="steps" their start states)."""
        p = self.problem
        where = dict(states=stored) if self.store == "steps" else dict(stage_inputs=stored)
        x, saved = walk(p, x, 0, self.tail_from, evaluator=self.forward_evaluate, **where)
        if self.tail_from < p.steps:  # the tail stores nothing (a second backward reruns it: take_tail)
            self.tail_start = x.detach()
            self.tail = Tail.run(p, self.tail_start, self.tail_from, self.tail_evaluate)
            saved.update({m: v.detach() for m, v in self.tail.states.items()})
        self.replay.finish(reruns=self.keep_from > 0)  # every graph kept: a first backward reruns nothing
        return p.grid.gather_outputs(saved)

    def forward_evaluate(self, problem: Problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
        """The forward's evaluation (n, i) before the tail: for (0, 0) the first evaluation's output, else
        run, its graph kept from a leaf of ours when the budget keeps it."""
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
        """The tail's graph for a backward: the forward's, handed over once; for a later one recomputed the
        same way (bit for bit the first's gradients: docs/engine.md, "Adjoint strategies")."""
        tail, self.tail = self.tail, None
        if tail is not None or self.tail_from >= self.problem.steps:
            return tail

        def rerun(problem: Problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
            with self.replay.rerun(n * problem.tableau.stages + i, chained=True):
                return problem.evaluate(t, xi)

        with self.replay.chain(self.tail_from * self.problem.tableau.stages):
            return Tail.run(self.problem, self.tail_start, self.tail_from, rerun)
