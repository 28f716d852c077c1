"""Exact discrete adjoint: the gradient of the fixed-step solve itself, not of the ODE.

Forward: the loop of prg_fast.ode.integrate without a graph, keeping only each network input
(K steps x s stages state-sized buffers). Backward, for step n with output cotangent lam:

    for i = s-1 .. 0:   g_i  = h b_i lam + h sum_{m>i} a_mi mu_m     (cotangent of k_i; fused)
                        mu_i = g_i^T df/dX (t_i, X_i)                 (one recomputed evaluation)
                        params.grad += g_i^T df/dtheta
    lam <- lam + sum_i mu_i                                           (fused)

which is reverse-mode differentiation of exactly the forward's arithmetic, so gradients equal plain
backprop through the same solver to rounding. Recomputing every evaluation (memory_budget=0), only
one evaluation's activations are alive at a time: peak memory = one network evaluation + K*s
state-sized buffers, flat in K beyond those buffers. Graphs the budget keeps skip their
recomputation; whole kept steps at the end are one graph, one VJP (BackwardWalk.tail).

Time gradients (the grid is a tensor input `times` that requires grad): with e_i = b_i lam +
sum_{m>i} a_mi mu_m (so g_i = h e_i) and tau_i = t_n + c_i h the time the network reads,

    dL/dtau_i = g_i^T df/dtau (t_i, X_i)        (the same VJP, one more input)
    dL/dh    += c_i dL/dtau_i + <e_i, k_i>       (k_i: the (recomputed or kept) evaluation itself)
    dL/dt_n  += dL/dtau_i

and dL/dG[n] += dL/dt_n - dL/dh, dL/dG[n+1] += dL/dh. Nothing divides by h, so zero-length steps
(save_at points on a per-sample grid) are differentiated exactly too. On a per-sample grid every
quantity here is per sample ((B,)), on a shared grid summed over the batch.

Strategies (StoredAdjoint's memory_budget and store: prg_fast.ode.strategies) differ only in where
the evaluation with its graph comes from (EvaluationGraphs.with_graph) and the stage inputs
(EvaluationGraphs.step_stage_inputs). A solve that keeps every evaluation's graph is not
differentiated here at all: it runs as plain backprop from x (adjoint_solve, AdjointSolveKept).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..compat import foreach_add_, view_base
from .integrate import Problem, accumulator_dtype
from .description import StoredAdjoint
from .strategies import EvaluationGraphs, FirstEvaluation, Tail
from .vjp import evaluation_vjp, graph_vjp, once_differentiable


def accumulate(acc: List[Optional[torch.Tensor]], grads, acc_dtype: List[torch.dtype], returned=(),
               given=()) -> None:
    """acc[q] += grads[q] for every parameter gradient present, in one fused foreach call where
    the accumulators exist (a per-parameter Python loop costs ~1 ms per evaluation for a UNet).

    The accumulator is a buffer of our own, never a tensor someone else holds: autograd may hand
    back one tensor for several inputs (x and a parameter), a view, or a tensor it was given (the
    cotangent, passed through). A first gradient that is none of these -- not a view, returned
    once among everything the VJP returned (`returned`), not one of the tensors given to it
    (`given`) -- is fresh, and becomes the accumulator as it is (a copy per parameter per solve
    otherwise: ~10% of a small network's step)."""
    counts: dict = {}
    for r in returned:
        if r is not None:
            counts[id(r)] = counts.get(id(r), 0) + 1
    given_ids = {id(t) for t in given}
    into, add = [], []
    for q, gq in enumerate(grads):
        if gq is None:
            continue
        if acc[q] is None:
            fresh = (gq.dtype == acc_dtype[q] and view_base(gq) is None and counts.get(id(gq)) == 1
                     and id(gq) not in given_ids)
            acc[q] = gq if fresh else gq.to(acc_dtype[q], copy=True)
        elif acc[q].dtype == gq.dtype:
            into.append(acc[q])
            add.append(gq)
        else:
            acc[q].add_(gq)
    if into:
        foreach_add_(into, add)


def adjoint_solve(problem: Problem, strategy: StoredAdjoint, first: Optional[FirstEvaluation],
                  times: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The states at problem.out_index, stacked, differentiated by the exact adjoint. `times`:
    problem.times as an input (so its gradient is returned), or None on a float grid. Which
    evaluations keep their graphs, the first evaluation's reuse: prg_fast.ode.strategies; when all
    of them do, the solve is plain backprop (AdjointSolveKept)."""
    evals = EvaluationGraphs(problem, strategy, first, x.device, problem.params,
                             time_grad=times is not None and times.requires_grad)
    if evals.as_backprop:
        outs = evals.run_as_backprop(x)
        if outs is not None:
            return AdjointSolveKept.apply(evals, *outs)
    return AdjointSolve.apply(problem, evals, times, x, *problem.params)


class AdjointSolveKept(torch.autograd.Function):
    """The outputs of a solve that kept every evaluation's graph: they were computed by plain
    autograd from x (EvaluationGraphs.run_as_backprop), so their backward is plain backprop's, with
    no nested VJP. This node only stacks them and carries `.evals` (what the strategy chose, as
    AdjointSolve's does). Its backward (unbind) is differentiable, so a second derivative
    (create_graph=True) is plain backprop's too: once_differentiable here cut the path through the
    cotangent silently under torch.autograd.grad(..., inputs), which prunes its DelayedError node
    while the graph around it still reaches the inputs."""

    @staticmethod
    def forward(ctx, evals: EvaluationGraphs, *outs: torch.Tensor):
        ctx.evals = evals
        return torch.stack(outs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return (None, *grad_out.unbind(0))


class AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, evals: EvaluationGraphs, times: Optional[torch.Tensor], x: torch.Tensor,
                *params: torch.Tensor):
        # what a rerun needs (random states, buffers, flags, versions): prg_fast.ode.replay.
        stored: list = []
        outs = evals.run_forward(x.to(problem.state_dtype), stored)
        evals.finish_forward()
        # Saved through autograd (not as ctx attributes) so they are freed right after the backward,
        # retain_graph works, and saved-tensor hooks (e.g. torch.autograd.graph.save_on_cpu) apply.
        ctx.save_for_backward(*stored)
        ctx.problem, ctx.evals, ctx.rng = problem, evals, evals.replay.rng
        ctx.x_dtype = x.dtype
        ctx.differentiated = (x, *params)  # what a second derivative would reach (once_differentiable)
        return torch.stack(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        replay = ctx.evals.replay
        with replay.backward():
            grads = _backward(ctx, grad_out)
        replay.check_versions(grads[4:])
        return grads


def _backward(ctx, grad_out: torch.Tensor):
    p: Problem = ctx.problem
    s = p.tableau.stages
    walk = BackwardWalk(p, ctx.evals, grad_out, want_tgrad=p.times is not None and ctx.needs_input_grad[2])
    stored = list(ctx.saved_tensors)  # the steps before the tail's
    start = p.steps
    tail = ctx.evals.take_tail()
    if tail is not None:
        # the whole steps kept as one graph: one VJP
        walk.tail(tail)
        start = tail.start
    for n in reversed(range(start)):
        walk.arrive(n + 1)
        if ctx.evals.store == "steps":
            # the saved tensors are step start states: the step's stage inputs are recomputed now
            inputs = ctx.evals.step_stage_inputs(n, stored.pop())
        else:
            inputs, stored = stored[-s:], stored[:-s]
        walk.step(n, inputs)
    walk.arrive(0)
    grad_params = [None if g is None else g.to(q.dtype) for g, q in zip(walk.acc, walk.params)]
    return (None, None, walk.gtimes, walk.lam.to(ctx.x_dtype), *grad_params)


class BackwardWalk:
    """The backward's running cotangents, walked step by step in reverse: lam (the state's), the
    parameters' (accumulated in float32, float64 / complex for such parameters) and the grid's."""

    def __init__(self, p: Problem, evals, grad_out: torch.Tensor, want_tgrad: bool):
        self.p, self.evals, self.want_tgrad = p, evals, want_tgrad
        # cotangent arriving at each grid index from the outputs (an index may be output twice)
        self.arriving = p.output_cotangents(grad_out)
        self.lam = torch.zeros(grad_out.shape[1:], dtype=p.state_dtype, device=grad_out.device)
        self.gtimes = torch.zeros_like(p.times) if want_tgrad else None
        self.params = list(p.params)
        self.acc_dtype = [accumulator_dtype(q) for q in self.params]
        self.acc: List[Optional[torch.Tensor]] = [None] * len(self.params)
        self.gt = self.gh = None

    def arrive(self, m: int) -> None:
        if m in self.arriving:
            self.lam = self.p.combine(self.lam, [self.arriving.pop(m)], [1.0], 1.0, self.p.state_dtype)

    def tail(self, tail: Tail) -> None:
        """The VJP of the forward's tail (steps tail.start .. K-1, one graph): from the cotangents
        arriving at its output points to lam at tail.start and the parameters' gradients."""
        outputs, cotangents = [], []
        for m, state in tail.states.items():
            g = self.arriving.pop(m, None)
            if g is not None:
                outputs.append(state)
                cotangents.append(g.to(state.dtype))
        grads = graph_vjp(outputs, [tail.leaf] + self.params, cotangents, self.p.reentrant, self.p.unlisted)
        if grads[0] is not None:
            self.lam = self.lam + grads[0].to(self.lam.dtype)
        accumulate(self.acc, grads[1:], self.acc_dtype, returned=grads, given=cotangents)

    def step(self, n: int, inputs: List[torch.Tensor]) -> None:
        p = self.p
        t, h, taus = p.step_at(n)
        mus: List[Optional[torch.Tensor]] = [None] * p.tableau.stages
        if self.want_tgrad:
            self.gt, self.gh = torch.zeros_like(t), torch.zeros_like(t)
        for i in reversed(range(p.tableau.stages)):
            self.stage(n, i, h, taus[i], inputs[i], mus)
        if self.want_tgrad:
            self.gtimes[n] += self.gt - self.gh
            self.gtimes[n + 1] += self.gh
        live = [mu for mu in mus if mu is not None]
        if live:
            self.lam = p.combine(self.lam, live, [1.0] * len(live), 1.0, p.state_dtype)

    def cotangent(self, i: int, h, mus: list):
        """(g_i, e_i): the cotangent of k_i, g_i = h e_i with e_i = b_i lam + sum_m a_mi mu_m (e_i
        is kept on a tensor grid, where g_i is formed per row and h may be 0), or (None, None)
        when k_i influences nothing downstream."""
        p, tab = self.p, self.p.tableau
        later = [m for m in range(i + 1, tab.stages) if tab.a[m][i] != 0.0 and mus[m] is not None]
        if tab.b[i] == 0.0 and not later:
            return None, None
        return p.backend.scaled(self.lam, [mus[m] for m in later], [tab.a[m][i] for m in later], tab.b[i], h,
                                p.net_dtype, p.state_dtype)

    def stage(self, n: int, i: int, h, tau, xi: torch.Tensor, mus: list) -> None:
        """mu_i = g_i^T df/dX (and the parameters' and the time's shares) for evaluation (n, i)."""
        g, e = self.cotangent(i, h, mus)
        if g is None:
            return
        if isinstance(tau, torch.Tensor):
            tau = tau.requires_grad_(self.want_tgrad)
        # the evaluation with its graph from the leaves xi (and tau): kept by the forward, or recomputed
        k, xi, tau = self.evals.with_graph(n, i, tau, xi)
        timed_leaf = self.want_tgrad and isinstance(tau, torch.Tensor) and tau.requires_grad
        inputs = [xi] + ([tau] if timed_leaf else []) + self.params
        # the parameters' hooks do not run here: autograd runs them once on the returned total
        grads = evaluation_vjp(k, inputs, g, self.p.reentrant, self.p.unlisted)
        if not timed_leaf:
            grads.insert(1, None)
        if self.want_tgrad:
            # k_i enters x_{n+1} and the later stage inputs through h e_i: <e_i, k_i> per row
            self.gh += self.p.row_dot(e, k.detach())
            if grads[1] is not None:
                self.gt += grads[1]
                self.gh += self.p.tableau.c[i] * grads[1]
        del k
        mus[i] = grads[0] if grads[0] is not None else torch.zeros_like(xi)
        accumulate(self.acc, grads[2:], self.acc_dtype, returned=grads, given=(g,))
