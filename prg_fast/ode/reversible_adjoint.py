"""The reversible scheme's adjoint (ReversibleAdjoint): gradients at memory O(1) in the number of
steps, from the final pair alone, each base step rerun from the state the exact inverse rebuilds
(its rerun doubles as its VJP). Details: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..compat import gradient_hooks, version
from .discovery import discover
from .integrate import Problem, check_choice, check_flag
from .rerun import GradientSum, ReplayRecord, graph_vjp, once_differentiable, refuse_input_hooks
from .reversible import (DEFAULT_COUPLING, RECONSTRUCTION_CHECKS, base_step, check_coupling, check_reconstruction,
                         inverse_step, reconstruction_error, run, solve_reversible)


@dataclass(frozen=True)
class ReversibleAdjoint:
    """The reversible scheme's adjoint: O(1) memory in the number of steps, 2x the evaluations;
    `check` says what a rebuilt initial state off by more than the tolerance does ("error",
    "warn", "off": prg_fast.ode.reversible.check_reconstruction)."""

    coupling: float = DEFAULT_COUPLING
    preserve_rng_state: bool = True
    check: str = "error"

    def __post_init__(self):
        object.__setattr__(self, "coupling", check_coupling(self.coupling))
        check_flag(self.preserve_rng_state, "preserve_rng_state")
        check_choice(self.check, "reversible_check", RECONSTRUCTION_CHECKS)

    def run(self, problem: Problem, x: torch.Tensor) -> torch.Tensor:
        """The y states at the grid's outputs, stacked, differentiated by this adjoint (every strategy's run)."""
        if torch.is_grad_enabled():
            times, (problem, first, _, differentiated) = problem.grid.times, discover(problem, x)
            if first is not None:
                refuse_input_hooks(first.input_hooks, "in the solve's first evaluation")
                # the scheme runs its own evaluations: discovery costs one (a cached parametrization
                # is computed once per cache, and stays as the first evaluation left it)
                first.discard(problem)
            if differentiated:
                return ReversibleSolve.apply(problem, self, times, x, *problem.reads.params)
        return solve_reversible(problem, x, self.coupling)


class ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, strategy: ReversibleAdjoint, times: Optional[torch.Tensor],
                x: torch.Tensor, *params: torch.Tensor):
        # what each base step's rerun needs: prg_fast.ode.rerun
        replay = ReplayRecord(problem, x.device, strategy.preserve_rng_state)
        outs, y, z = run(problem, x.to(problem.state_dtype), strategy.coupling, replay.record)
        replay.finish(reruns=True)
        # the final pair is all the backward needs (the inverse step rebuilds every earlier state); saved
        # through autograd as the stored adjoint's stage inputs (docs/engine.md, "Inside the engine": stored_adjoint)
        ctx.save_for_backward(y, z)
        # x, which the rebuilt initial state is checked against: an alias of the input (no copy,
        # and not through saved-tensor hooks, which would copy it); if it is modified in place
        # before the backward, the check is skipped (its version tells)
        ctx.x0, ctx.x0_version = x.detach(), version(x)
        ctx.problem, ctx.strategy, ctx.replay, ctx.x_dtype = problem, strategy, replay, x.dtype
        ctx.differentiated = (x, *params)  # what a second derivative would reach (once_differentiable)
        return torch.stack(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grads = ctx.replay.backward(lambda: _backward(ctx, grad_out))
        # after the version check: parameters changed in place also spoil the reconstruction, and
        # that error names the cause
        if getattr(ctx, "reconstruction_error", None) is not None:
            check_reconstruction(ctx.reconstruction_error, ctx.problem.state_dtype, ctx.strategy.check)
        return grads


class BackwardWalk:
    """The reversible backward, walked step by step in reverse as the scheme's inverse step
    (prg_fast.ode.reversible.inverse_step) with this as its base step: each base step x + Psi_h(t, x)
    is rerun with its graph (under the forward's replay record) for its vector-Jacobian product, and
    the cotangents of y and z (ybar, zbar), the grid's and the parameters' (GradientSum) follow:

        G (base step 2n+1, of -h from t_{n+1}):  z_{n+1} = z_n + y_{n+1} - G(y_{n+1})
        F (base step 2n, of h from t_n):         y_{n+1} = lam y_n - lam z_n + F(z_n)"""

    def __init__(self, p: Problem, replay: ReplayRecord, lam: float, like: torch.Tensor, want_tgrad: bool):
        self.p, self.replay, self.lam, self.want_tgrad = p, replay, lam, want_tgrad
        self.params = list(p.reads.params)
        self.grads = GradientSum(self.params)
        self.ybar, self.zbar = torch.zeros_like(like), torch.zeros_like(like)
        self.zbar_zero = True  # nothing has reached z yet: the outputs read only y
        self.gtimes = torch.zeros_like(p.grid.times) if want_tgrad else None
        self.g_times = (None, None)  # G's [d/dt, d/dh], until F's arrive

    def __call__(self, e: int, t, h, end, x: torch.Tensor) -> torch.Tensor:
        """Base step e's value, its VJP taken into the cotangents."""
        n, lam = e // 2, self.lam
        if e % 2:  # G: its cotangent is -zbar (None while zero: no output reads z_K)
            out, gbar, self.g_times = self.vjp(e, t, h, end, x, None if self.zbar_zero else -self.zbar)
            self.ybar = self.ybar + self.zbar + gbar
            return out
        out, fbar, (dt0, dh) = self.vjp(e, t, h, end, x, self.ybar)
        if self.want_tgrad:
            dt1, dmh = self.g_times
            dh = dh - dmh
            self.gtimes[n] += dt0 - dh
            self.gtimes[n + 1] += dt1 + dh
        self.zbar, self.zbar_zero = self.zbar - lam * self.ybar + fbar, False
        self.ybar = lam * self.ybar
        return out

    def vjp(self, e: int, t, h, end, x: torch.Tensor, cot: Optional[torch.Tensor]):
        """Base step e's value, cot^T d/dx, and [cot^T d/dt, cot^T d/dh] (a tensor grid whose
        gradient is wanted; else [None, None]). cot None: a cotangent known to be zero (the last
        step's z, which no output reads): the step is only recomputed, without graph, as plain
        backprop never differentiates it."""
        xg = x.detach().requires_grad_(cot is not None)
        if self.want_tgrad and cot is not None:
            # the base step's time and step size are leaves: their gradients come out of the same VJP
            t, h = t.detach().requires_grad_(True), h.detach().requires_grad_(True)
        inputs = [xg] + ([t, h] if self.want_tgrad else []) + self.params
        with torch.set_grad_enabled(cot is not None), self.replay.rerun(e):
            out = base_step(self.p, t, h, xg, end)
            refuse_input_hooks(list((gradient_hooks(xg) or {}).values()), f"in base step {e}'s rerun")
            # the parameters' hooks do not run here: autograd runs them once on the returned total
            grads = (graph_vjp([out], inputs, [cot], self.p.reads, self.replay.hidden) if cot is not None
                     else [None] * len(inputs))
        tgrads = [None, None]
        if self.want_tgrad:
            tgrads = [g if g is not None else torch.zeros_like(t) for g in grads[1:3]]
            del grads[1:3]
        self.grads.add(grads[1:])
        gx = grads[0] if grads[0] is not None else torch.zeros_like(xg)
        return out.detach(), gx, tgrads


def _backward(ctx, grad_out: torch.Tensor):
    p: Problem = ctx.problem
    y, z = (v.detach() for v in ctx.saved_tensors)
    arriving = {idx: g.to(p.state_dtype) for idx, g in p.grid.output_cotangents(grad_out).items()}
    walk = BackwardWalk(p, ctx.replay, ctx.strategy.coupling, y, p.grid.times is not None and ctx.needs_input_grad[2])
    for n in reversed(range(p.steps)):
        if n + 1 in arriving:
            walk.ybar = walk.ybar + arriving.pop(n + 1)
        y, z = inverse_step(p, walk.lam, n, y, z, walk)
    if 0 in arriving:
        walk.ybar = walk.ybar + arriving.pop(0)
    if ctx.strategy.check != "off" and version(ctx.x0) == ctx.x0_version:
        ctx.reconstruction_error = reconstruction_error(y, z, ctx.x0)
    return (None, None, walk.gtimes, (walk.ybar + walk.zbar).to(ctx.x_dtype), *walk.grads.totals())
