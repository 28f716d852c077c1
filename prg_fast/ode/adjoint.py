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

    dL/dtau_i = g_i^T df/dtau (t_i, X_i)        (the same recomputed VJP, one more input)
    dL/dh    += c_i dL/dtau_i + <e_i, k_i>       (k_i: the recomputed evaluation itself)
    dL/dt_n  += dL/dtau_i

and dL/dG[n] += dL/dt_n - dL/dh, dL/dG[n+1] += dL/dh. Nothing divides by h, so zero-length steps
(save_at points on a per-sample grid) are differentiated exactly too. On a per-sample grid every
quantity here is per sample ((B,)), on a shared grid summed over the batch.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .integrate import Problem, autocast_state, capture_rng, restore_rng  # noqa: F401


def stage_vjp(ctx, p: Problem, tau, xi: torch.Tensor, state, g: torch.Tensor, params: List[torch.Tensor]):
    """The per-stage work of the backward: recompute k = f(tau, X_i) with its graph (under the
    forward's random and autocast state) and take its VJP with cotangent g.

    `tau` is a float, or a tensor leaf (requiring grad when the time gradient is wanted).
    Returns (k without graph, [dL/dX_i, dL/dtau, *dL/dparams]) with None where nothing flows."""
    xi = xi.detach().requires_grad_(True)
    timed = isinstance(tau, torch.Tensor) and tau.requires_grad
    inputs = [xi] + ([tau] if timed else []) + params
    autocast_on, autocast_dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=autocast_dtype, enabled=autocast_on):
        if state is not None:
            with restore_rng(state, ctx.device):
                k = p.evaluate(tau, xi)
        else:
            k = p.evaluate(tau, xi)
        # An evaluation whose output reads neither the state nor a parameter (a zero
        # velocity, a function of t only) has no graph: it contributes nothing.
        if k.requires_grad:
            grads = list(torch.autograd.grad(k, inputs, g, allow_unused=True))
        else:
            grads = [None] * len(inputs)
    if not timed:
        grads.insert(1, None)
    return k.detach(), grads


class AdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, preserve_rng: bool, times: Optional[torch.Tensor], x: torch.Tensor,
                *params: torch.Tensor):
        # `times`: problem.times as an input (so its gradient is returned), or None on a float grid.
        stage_inputs: list = []
        rng: Optional[list] = [] if preserve_rng else None
        outs = problem.run(x.to(problem.state_dtype), stage_inputs=stage_inputs, rng=rng)
        # Saved through autograd (not as ctx attributes) so they are freed right after the backward,
        # retain_graph works, and saved-tensor hooks (e.g. torch.autograd.graph.save_on_cpu) apply.
        ctx.save_for_backward(*stage_inputs)
        ctx.problem, ctx.rng = problem, rng
        ctx.x_dtype, ctx.device = x.dtype, x.device
        # The backward recomputes each evaluation under the autocast state of the forward (as
        # torch.utils.checkpoint does), so a network run in bf16 autocast is differentiated as run.
        ctx.autocast = autocast_state(x.device.type)
        return torch.stack(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        p: Problem = ctx.problem
        tab, combine = p.tableau, p.combine
        timed = p.times is not None  # tensor grid: per-row step sizes
        want_tgrad = timed and ctx.needs_input_grad[2]
        gtimes = torch.zeros_like(p.times) if want_tgrad else None
        stage_inputs = list(ctx.saved_tensors)
        rng = list(ctx.rng) if ctx.rng is not None else None
        params = list(p.params)
        # Cotangent arriving at each grid index from the outputs (an index may be output twice).
        arriving = p.output_cotangents(grad_out)
        shape = grad_out.shape[1:]
        lam = torch.zeros(shape, dtype=p.state_dtype, device=grad_out.device)
        # Parameter gradients accumulate in float32 (float64 for float64 parameters).
        acc_dtype = [torch.float64 if q.dtype == torch.float64 else torch.float32 for q in params]
        param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
        s = tab.stages

        for n in reversed(range(p.steps)):
            if n + 1 in arriving:
                lam = combine(lam, [arriving.pop(n + 1)], [1.0], 1.0, p.state_dtype)
            t = p.point(n)
            h = p.point(n + 1) - t
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
                    tau = t + tab.c[i] * h
                k, grads = stage_vjp(ctx, p, tau, xi, state, g, params)
                if want_tgrad:
                    # k_i enters x_{n+1} and the later stage inputs through h e_i: <e_i, k_i> per row
                    gh += p.row_dot(e, k)
                    if grads[1] is not None:
                        gt += grads[1]
                        gh += tab.c[i] * grads[1]
                del k
                mus[i] = grads[0] if grads[0] is not None else torch.zeros_like(xi)
                for q, gq in enumerate(grads[2:]):
                    if gq is None:
                        continue
                    # Autograd may hand back one tensor for several inputs (x and a parameter, two
                    # parameters): the accumulator is a buffer of our own, never a returned tensor.
                    if param_grads[q] is None:
                        param_grads[q] = gq.to(acc_dtype[q], copy=True)
                    else:
                        param_grads[q].add_(gq)
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
