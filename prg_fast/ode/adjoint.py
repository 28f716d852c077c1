"""Exact discrete adjoint: the gradient of the fixed-step solve itself, not of the ODE.

Forward: the loop of prg_fast.ode.integrate without a graph, keeping only each network input
(K steps x s stages state-sized buffers). Backward, for step n with output cotangent lam:

    for i = s-1 .. 0:   g_i  = h b_i lam + h sum_{m>i} a_mi mu_m     (cotangent of k_i; fused)
                        mu_i = g_i^T df/dX (t_i, X_i)                 (one recomputed evaluation)
                        params.grad += g_i^T df/dtheta
    lam <- lam + sum_i mu_i                                           (fused)

which is reverse-mode differentiation of exactly the forward's arithmetic, so gradients equal plain
backprop through the same solver to rounding. Only one evaluation's activations are alive at a time:
peak memory = one network evaluation + K*s state-sized buffers, flat in K beyond those buffers.

Strategies (prg_fast.ode.strategies): with `memory_budget` the forward keeps the graphs of its last
evaluations and the backward takes their VJPs without recomputing; with store="steps" the forward
keeps one state per step and the backward recomputes that step's stage inputs first. The one place
in the loop below that differs between strategies is where the evaluation with its graph is
obtained (EvaluationGraphs.with_graph).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .integrate import Problem
from .strategies import EvaluationGraphs, Strategy


def accumulate(acc: List[Optional[torch.Tensor]], grads, acc_dtype: List[torch.dtype]) -> None:
    """acc[q] += grads[q] for every parameter gradient present, in one fused foreach call where
    the accumulators exist (a per-parameter Python loop costs ~1 ms per evaluation for a UNet)."""
    into, add = [], []
    for q, gq in enumerate(grads):
        if gq is None:
            continue
        # Autograd may hand back one tensor for several inputs (x and a parameter, two
        # parameters): the accumulator is a buffer of our own, never a returned tensor.
        if acc[q] is None:
            acc[q] = gq.to(acc_dtype[q], copy=True)
        elif acc[q].dtype == gq.dtype:
            into.append(acc[q])
            add.append(gq)
        else:
            acc[q].add_(gq)
    if into:
        torch._foreach_add_(into, add)


class AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, strategy: Strategy, x: torch.Tensor, *params: torch.Tensor):
        # Which evaluations keep their graphs, the random states, the first evaluation's reuse:
        # prg_fast.ode.strategies.
        evals = EvaluationGraphs(problem, strategy, x.device)
        stored: list = []
        if strategy.store == "steps":
            outs = problem.run(x.to(problem.state_dtype), states=stored, evaluator=evals.forward_evaluate)
        else:
            outs = problem.run(x.to(problem.state_dtype), stage_inputs=stored, evaluator=evals.forward_evaluate)
        evals.finish_forward()
        # Saved through autograd (not as ctx attributes) so they are freed right after the backward,
        # retain_graph works, and saved-tensor hooks (e.g. torch.autograd.graph.save_on_cpu) apply.
        ctx.save_for_backward(*stored)
        ctx.problem, ctx.rng, ctx.evals = problem, evals.rng, evals
        ctx.x_dtype = x.dtype
        return torch.stack(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        p: Problem = ctx.problem
        tab, combine = p.tableau, p.combine
        stage_inputs = list(ctx.saved_tensors)
        # store="steps": the saved tensors are step start states; each step's stage inputs are
        # recomputed when the backward reaches it.
        step_states = stage_inputs if ctx.evals.store == "steps" else None
        rng = list(ctx.rng) if ctx.rng is not None else None
        params = list(p.params)
        # Cotangent arriving at each grid index from the outputs (an index may be output twice).
        arriving = {}
        for pos, idx in enumerate(p.out_index):
            g = grad_out[pos]
            arriving[idx] = g if idx not in arriving else arriving[idx] + g
        shape = grad_out.shape[1:]
        lam = torch.zeros(shape, dtype=p.state_dtype, device=grad_out.device)
        # Parameter gradients accumulate in float32 (float64 for float64 parameters).
        acc_dtype = [torch.float64 if q.dtype == torch.float64 else torch.float32 for q in params]
        param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
        s = tab.stages

        for n in reversed(range(p.steps)):
            if n + 1 in arriving:
                lam = combine(lam, [arriving.pop(n + 1)], [1.0], 1.0, p.state_dtype)
            t, h = p.grid[n], p.grid[n + 1] - p.grid[n]
            if step_states is not None:
                stage_inputs = ctx.evals.step_stage_inputs(n, step_states.pop(), rng[-s:] if rng else None)
            mus: List[Optional[torch.Tensor]] = [None] * s
            for i in reversed(range(s)):
                later = [m for m in range(i + 1, s) if tab.a[m][i] != 0.0 and mus[m] is not None]
                alpha = h * tab.b[i]
                xi = stage_inputs.pop()
                state = rng.pop() if rng is not None else None
                if alpha == 0.0 and not later:
                    continue  # k_i does not influence anything downstream
                g = combine(lam, [mus[m] for m in later], [h * tab.a[m][i] for m in later], alpha, p.net_dtype)
                # ---- the evaluation k of stage (n, i) with its graph from the leaf xi: the graph
                # ---- the forward kept (memory_budget), else recomputed from the stored input
                k, xi = ctx.evals.with_graph(n, i, t + tab.c[i] * h, xi, state)
                with torch.enable_grad():
                    # An evaluation whose output reads neither the state nor a parameter (a zero
                    # velocity, a function of t only) has no graph: it contributes nothing.
                    if k.requires_grad:
                        grads = torch.autograd.grad(k, [xi] + params, g, allow_unused=True)
                    else:
                        grads = [None] * (1 + len(params))
                del k
                mus[i] = grads[0] if grads[0] is not None else torch.zeros_like(xi)
                accumulate(param_grads, grads[1:], acc_dtype)
            live = [mu for mu in mus if mu is not None]
            if live:
                lam = combine(lam, live, [1.0] * len(live), 1.0, p.state_dtype)
        if 0 in arriving:
            lam = combine(lam, [arriving.pop(0)], [1.0], 1.0, p.state_dtype)
        grad_params = [None if g is None else g.to(q.dtype) for g, q in zip(param_grads, params)]
        return (None, None, lam.to(ctx.x_dtype), *grad_params)
