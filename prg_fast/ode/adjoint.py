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

Time gradients (the grid is a tensor input `times` that requires grad): with e_i = b_i lam +
sum_{m>i} a_mi mu_m (so g_i = h e_i) and tau_i = t_n + c_i h the time the network reads,

    dL/dtau_i = g_i^T df/dtau (t_i, X_i)        (the same VJP, one more input)
    dL/dh    += c_i dL/dtau_i + <e_i, k_i>       (k_i: the (recomputed or kept) evaluation itself)
    dL/dt_n  += dL/dtau_i

and dL/dG[n] += dL/dt_n - dL/dh, dL/dG[n+1] += dL/dh. Nothing divides by h, so zero-length steps
(save_at points on a per-sample grid) are differentiated exactly too. On a per-sample grid every
quantity here is per sample ((B,)), on a shared grid summed over the batch.

Strategies (prg_fast.ode.strategies): with `memory_budget` the forward keeps the graphs of its last
evaluations and the backward takes their VJPs without recomputing; with store="steps" the forward
keeps one state per step and the backward recomputes that step's stage inputs first. The one place
in the loop below that differs between strategies is where the evaluation with its graph is
obtained (EvaluationGraphs.with_graph).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import parametrize_cache
from .integrate import Problem, accumulator_dtype, ParamVersions, param_versions
from .module_state import TrainingModes, left_as_found
from .strategies import EvaluationGraphs, Strategy
from .vjp import evaluation_vjp


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
    def forward(ctx, problem: Problem, strategy: Strategy, times: Optional[torch.Tensor], x: torch.Tensor,
                *params: torch.Tensor):
        at_start = param_versions(params)  # a model writing its own parameters moves them (ParamVersions)
        # `times`: problem.times as an input (so its gradient is returned), or None on a float grid.
        # Which evaluations keep their graphs, the random states, the first evaluation's reuse:
        # prg_fast.ode.strategies.
        evals = EvaluationGraphs(problem, strategy, x.device, time_grad=times is not None and times.requires_grad)
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
        ctx.versions = ParamVersions(params, at_start)
        ctx.modes = TrainingModes(problem.modules)
        return torch.stack(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # reruns load each evaluation's buffers and run under the forward's train/eval flags; the
        # backward itself leaves both as it found them
        ctx.versions.before_backward()
        with left_as_found(ctx.evals.state), ctx.modes, parametrize_cache.kept(ctx.problem.shared_parametrizations):
            grads = _backward(ctx, grad_out)
        ctx.versions.after_backward(grads[4:])
        return grads


def _backward(ctx, grad_out: torch.Tensor):
    p: Problem = ctx.problem
    tab, combine = p.tableau, p.combine
    timed = p.times is not None  # tensor grid: per-row step sizes
    want_tgrad = timed and ctx.needs_input_grad[2]
    gtimes = torch.zeros_like(p.times) if want_tgrad else None
    stage_inputs = list(ctx.saved_tensors)
    # store="steps": the saved tensors are step start states; each step's stage inputs are
    # recomputed when the backward reaches it.
    step_states = stage_inputs if ctx.evals.store == "steps" else None
    rng = list(ctx.rng) if ctx.rng is not None else None
    params = list(p.params)
    # Cotangent arriving at each grid index from the outputs (an index may be output twice).
    arriving = p.output_cotangents(grad_out)
    shape = grad_out.shape[1:]
    lam = torch.zeros(shape, dtype=p.state_dtype, device=grad_out.device)
    # Parameter gradients accumulate in float32 (float64 / complex for such parameters).
    acc_dtype = [accumulator_dtype(q) for q in params]
    param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
    s = tab.stages

    for n in reversed(range(p.steps)):
        if n + 1 in arriving:
            lam = combine(lam, [arriving.pop(n + 1)], [1.0], 1.0, p.state_dtype)
        t = p.point(n)
        h = p.point(n + 1) - t
        if step_states is not None:
            stage_inputs = ctx.evals.step_stage_inputs(n, step_states.pop(), rng[-s:] if rng else None)
        mus: List[Optional[torch.Tensor]] = [None] * s
        if want_tgrad:
            gt = torch.zeros_like(t)
            gh = torch.zeros_like(t)
        for i in reversed(range(s)):
            later = [m for m in range(i + 1, s) if tab.a[m][i] != 0.0 and mus[m] is not None]
            xi = stage_inputs.pop()
            state = rng.pop() if rng is not None else None
            if timed:
                if tab.b[i] == 0.0 and not later:
                    continue
                # e_i = b_i lam + sum a_mi mu_m; g_i = h e_i per row (h may be 0 on a per-sample grid)
                e = combine(lam, [mus[m] for m in later], [tab.a[m][i] for m in later], tab.b[i], p.state_dtype)
                g = p.combine_rows(e, [], h.reshape(-1, 1).to(p.state_dtype), p.net_dtype)
                tau = (t + tab.c[i] * h).requires_grad_(want_tgrad)
            else:
                alpha = h * tab.b[i]
                if alpha == 0.0 and not later:
                    continue  # k_i does not influence anything downstream
                g = combine(lam, [mus[m] for m in later], [h * tab.a[m][i] for m in later], alpha, p.net_dtype)
                tau = p.stage_time(t, h, i, p.point(n + 1))
            # ---- the evaluation k of stage (n, i) with its graph from the leaves xi (and tau,
            # ---- a leaf requiring grad when time gradients are wanted): the graph the forward
            # ---- kept (memory_budget), else recomputed from the stored input
            k, xi, tau = ctx.evals.with_graph(n, i, tau, xi, state)
            timed_leaf = want_tgrad and isinstance(tau, torch.Tensor) and tau.requires_grad
            inputs = [xi] + ([tau] if timed_leaf else []) + params
            # the parameters' hooks do not run here: autograd runs them once on the returned total
            grads = evaluation_vjp(k, inputs, g, p.reentrant)
            if not timed_leaf:
                grads.insert(1, None)
            if want_tgrad:
                # k_i enters x_{n+1} and the later stage inputs through h e_i: <e_i, k_i> per row
                gh += p.row_dot(e, k.detach())
                if grads[1] is not None:
                    gt += grads[1]
                    gh += tab.c[i] * grads[1]
            del k
            mus[i] = grads[0] if grads[0] is not None else torch.zeros_like(xi)
            accumulate(param_grads, grads[2:], acc_dtype)
        if want_tgrad:
            gtimes[n] += gt - gh
            gtimes[n + 1] += gh
        live = [mu for mu in mus if mu is not None]
        if live:
            lam = combine(lam, live, [1.0] * len(live), 1.0, p.state_dtype)
    if 0 in arriving:
        lam = combine(lam, [arriving.pop(0)], [1.0], 1.0, p.state_dtype)
    grad_params = [None if g is None else g.to(q.dtype) for g, q in zip(param_grads, params)]
    return (None, None, gtimes, lam.to(ctx.x_dtype), *grad_params)
