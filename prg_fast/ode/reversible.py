"""Algebraically reversible Runge-Kutta (McCallum & Foster 2024, arXiv 2410.11648): exact gradients
at memory O(1) in the number of steps K.

Any explicit tableau gives a base step x -> x + Psi_h(t, x) (Psi_h = h sum_i b_i k_i). The reversible
scheme carries two states (y, z), both starting at x0, and steps

    y_{n+1} = lam y_n + (1 - lam) z_n + Psi_h(t_n, z_n)
    z_{n+1} = z_n - Psi_{-h}(t_{n+1}, y_{n+1})

whose exact algebraic inverse is

    z_n = z_{n+1} + Psi_{-h}(t_{n+1}, y_{n+1})
    y_n = (y_{n+1} - (1 - lam) z_n - Psi_h(t_n, z_n)) / lam.

The returned solution is y. The scheme has the order of its base tableau (tested). This is the
step of the paper's reference implementation (github.com/sammccallum/reversible-solvers, the
`Reversible` wrapper: y1 = l y0 + (1 - l) z0 + step(h, t0, z0), z1 = z0 - step(-h, t1, y1), with
`step` the increment Psi), read and checked against this module on 2026-11-24.

Coupling `lam` (`reversible_coupling=`, in (0, 1]; the paper recommends 0.999): lam = 1 has an
empty region of linear stability (y and z decouple into a never-decaying leapfrog oscillation);
lam < 1 damps y towards z. The inverse divides by lam, amplifying the reconstruction's rounding by
1/lam per step; lam near 1 keeps it exact to rounding.

Cost, s stages: forward 2s evaluations per step (Psi_h and Psi_{-h}); backward 2s evaluations
recomputed with graph (the inverse step's recomputation doubles as the VJPs') and their 2s VJPs.
Stored: the final pair (y_K, z_K) whatever K, plus the replay record (prg_fast.ode.replay) of each
base step.

Gradients are exact for this scheme's arithmetic up to the rounding of the reconstruction: they
equal plain backprop through the same reversible scheme (`reversible=True, adjoint=False`, which
runs `solve_reversible` below under ordinary autograd) to ~1e-12 relative in float64 (measured
~1e-15 on small MLPs); in float32 the reconstruction's rounding shows, ~5e-7 relative measured.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

import math
import warnings

from ..compat import version
from .adjoint import accumulate
from .description import DEFAULT_COUPLING, ReversibleAdjoint, check_coupling
from .integrate import Problem, accumulator_dtype
from .replay import ReplayRecord
from .vjp import evaluation_vjp, once_differentiable

# the rebuilt initial state's largest relative error the backward accepts (check_reconstruction)
RECONSTRUCTION_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def reconstruction_error(y0: torch.Tensor, z0: torch.Tensor, x: torch.Tensor) -> float:
    """max(|y0 - x|, |z0 - x|) / |x| (norms over the whole state): how far the inverse steps'
    rebuilt initial pair lies from the initial state both y and z started from."""
    x = x.detach().to(y0.dtype)
    scale = x.norm().clamp_min(torch.finfo(y0.dtype).tiny)
    return (torch.maximum((y0 - x).norm(), (z0 - x).norm()) / scale).item()


def check_reconstruction(error: float, dtype: torch.dtype, mode: str) -> None:
    """The gradients are exact only as far as the inverse steps rebuild the forward's states; each
    amplifies the rounding of the next by up to the local Lipschitz constant times h (and 1/lam),
    so a sharp velocity (BatchNorm in train mode with large weights) can drift by orders of
    magnitude. The rebuilt initial state against the one passed, above RECONSTRUCTION_TOL[state
    dtype]: "error" raises, "warn" warns with the figure, "off" does nothing."""
    tol = RECONSTRUCTION_TOL.get(dtype, RECONSTRUCTION_TOL[torch.float32])
    if mode == "off" or (error <= tol and math.isfinite(error)):
        return
    message = (
        f"reversible=True: the backward rebuilt the initial state by the inverse steps with a relative error of "
        f"{error:.3g} (tolerance {tol:g} for {dtype}), so its gradients are not those of the forward. The velocity "
        "amplifies rounding too much for the algebraically reversible scheme (large Lipschitz constant x step size): "
        "use more steps, a float64 state, or reversible=False (the stored adjoint is exact for any network); "
        "reversible_check='warn' continues with a warning"
    )
    if mode == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise RuntimeError(message)


def _base_step(p: Problem, t, h, x: torch.Tensor, end) -> torch.Tensor:
    """x + Psi_h(t, x): one step of the base tableau from t towards `end` (state dtype)."""
    ks = p.stages(x, h, p.stage_times(t, h, end), lambda i, tau, xi: p.evaluate(tau, xi))
    return p.step_output(x, ks, h)


def _forward_step(p, lam, n, y, z, replay: Optional[ReplayRecord]):
    t0, t1 = p.point(n), p.point(n + 1)
    h = t1 - t0
    if replay is not None:  # random state and written buffers before each base step
        replay.record()
    fz = _base_step(p, t0, h, z, t1)  # z + Psi_h(t0, z)
    # lam y + (1 - lam) z + (fz - z) = lam y - lam z + fz
    y = p.combine(fz, [y, z], [lam, -lam], 1.0, p.state_dtype)
    if replay is not None:
        replay.record()
    gy = _base_step(p, t1, -h, y, t0)  # y + Psi_{-h}(t1, y)
    z = p.combine(z, [y, gy], [1.0, -1.0], 1.0, p.state_dtype)
    return y, z


def _run(p: Problem, x: torch.Tensor, lam: float,
         replay: Optional[ReplayRecord] = None) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    want = p.output_points()
    y = z = x
    saved = {0: x} if 0 in want else {}
    for n in range(p.steps):
        y, z = _forward_step(p, lam, n, y, z, replay)
        p.check(y, n)
        if n + 1 in want:
            saved[n + 1] = y
    return p.gather_outputs(saved), y, z


def solve_reversible(problem: Problem, x: torch.Tensor, coupling: float = DEFAULT_COUPLING) -> torch.Tensor:
    """The reversible scheme under ordinary autograd (or no_grad): the oracle for ReversibleSolve.
    Returns the y states at problem.out_index stacked on dim 0."""
    outs, _, _ = _run(problem, x.to(problem.state_dtype), check_coupling(coupling))
    return torch.stack(outs)


def final_pair(problem: Problem, x: torch.Tensor, coupling: float = DEFAULT_COUPLING) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_K, z_K) of the reversible scheme from x, no graph (what ReversibleSolve keeps)."""
    with torch.no_grad():
        _, y, z = _run(problem, x.to(problem.state_dtype), check_coupling(coupling))
    return y, z


def invert(problem: Problem, y: torch.Tensor, z: torch.Tensor, coupling: float = DEFAULT_COUPLING) -> Tuple[torch.Tensor, torch.Tensor]:
    """Walk the exact inverse step from the final pair (y_K, z_K) back to (y_0, z_0), no graph."""
    lam = check_coupling(coupling)
    with torch.no_grad():
        for n in reversed(range(problem.steps)):
            y, z = _inverse_step(problem, lam, n, y, z)
    return y, z


def _inverse_step(p, lam, n, y, z):
    t0, t1 = p.point(n), p.point(n + 1)
    h = t1 - t0
    gy = _base_step(p, t1, -h, y, t0)
    z = p.combine(z, [gy, y], [1.0, -1.0], 1.0, p.state_dtype)
    fz = _base_step(p, t0, h, z, t1)
    # y_n = (y_{n+1} + lam z_n - F(z_n)) / lam
    y = p.combine(y, [z, fz], [1.0, -1.0 / lam], 1.0 / lam, p.state_dtype)
    return y, z


class ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, strategy: ReversibleAdjoint, times: Optional[torch.Tensor],
                x: torch.Tensor, *params: torch.Tensor):
        # what each base step's rerun needs (random state, written buffers; autocast, train/eval
        # flags, parameter versions): prg_fast.ode.replay
        replay = ReplayRecord(problem, x.device, strategy.preserve_rng_state, params)
        outs, y, z = _run(problem, x.to(problem.state_dtype), strategy.coupling, replay)
        replay.finish(reruns=True)
        # The final pair is all the backward needs: every earlier state is reconstructed by the
        # exact inverse step. Saved through autograd so saved-tensor hooks apply and it is freed.
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
        with ctx.replay.backward():
            grads = _backward(ctx, grad_out)
        ctx.replay.check_versions(grads[4:])
        # after the version check: parameters changed in place also spoil the reconstruction, and
        # that error names the cause
        if getattr(ctx, "reconstruction_error", None) is not None:
            check_reconstruction(ctx.reconstruction_error, ctx.problem.state_dtype, ctx.strategy.check)
        return grads


class BaseStepVJP:
    """Base steps x + Psi_h(t, x) rerun with their graphs (under the forward's replay record) for
    their vector-Jacobian products; accumulates the parameters' shares (None until an evaluation
    reads the parameter: an unread one gets None, as in plain backprop)."""

    def __init__(self, p: Problem, replay: ReplayRecord, want_tgrad: bool):
        self.p, self.replay, self.want_tgrad = p, replay, want_tgrad
        self.params = list(p.params)
        self.acc: List[Optional[torch.Tensor]] = [None] * len(self.params)
        self.acc_dtype = [accumulator_dtype(q) for q in self.params]

    def __call__(self, e: int, t, h, end, x: torch.Tensor, cot: Optional[torch.Tensor]):
        """Base step e (2n: F from t_n, 2n+1: G from t_{n+1}): its value, cot^T d/dx, and
        [cot^T d/dt, cot^T d/dh] (a tensor grid whose gradient is wanted; else [None, None]).
        cot None: a cotangent known to be zero (the last step's z, which no output reads): the
        step is only recomputed, without graph, as plain backprop never differentiates it."""
        xg = x.detach().requires_grad_(cot is not None)
        if self.want_tgrad and cot is not None:
            # the base step's time and step size are leaves: their gradients come out of the same VJP
            t, h = t.detach().requires_grad_(True), h.detach().requires_grad_(True)
        inputs = [xg] + ([t, h] if self.want_tgrad else []) + self.params
        with torch.set_grad_enabled(cot is not None), self.replay.rerun(e):
            out = _base_step(self.p, t, h, xg, end)
            # the parameters' hooks do not run here: autograd runs them once on the returned total
            grads = (evaluation_vjp(out, inputs, cot, self.p.reentrant, self.p.unlisted) if cot is not None
                     else [None] * len(inputs))
        tgrads = [None, None]
        if self.want_tgrad:
            tgrads = [g if g is not None else torch.zeros_like(t) for g in grads[1:3]]
            del grads[1:3]
        accumulate(self.acc, grads[1:], self.acc_dtype)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(xg)
        return out.detach(), gx, tgrads


def _backward(ctx, grad_out: torch.Tensor):
    p: Problem = ctx.problem
    lam = ctx.strategy.coupling
    y, z = (v.detach() for v in ctx.saved_tensors)
    arriving = {idx: g.to(p.state_dtype) for idx, g in p.output_cotangents(grad_out).items()}
    ybar, zbar = torch.zeros_like(y), torch.zeros_like(z)
    zbar_zero = True  # nothing has reached z yet: the outputs read only y
    want_tgrad = p.times is not None and ctx.needs_input_grad[2]
    gtimes = torch.zeros_like(p.times) if want_tgrad else None
    vjp = BaseStepVJP(p, ctx.replay, want_tgrad)
    for n in reversed(range(p.steps)):
        if n + 1 in arriving:
            ybar = ybar + arriving.pop(n + 1)
        t0, t1 = p.point(n), p.point(n + 1)
        h = t1 - t0
        # z_{n+1} = z_n + y_{n+1} - G(y_{n+1}),  G = base step of -h from t1
        gy, gbar, (dt1, dmh) = vjp(2 * n + 1, t1, -h, t0, y, None if zbar_zero else -zbar)
        ybar = ybar + zbar + gbar
        z = p.combine(z, [gy, y], [1.0, -1.0], 1.0, p.state_dtype)
        # y_{n+1} = lam y_n - lam z_n + F(z_n),  F = base step of h from t0
        fz, fbar, (dt0, dh) = vjp(2 * n, t0, h, t1, z, ybar)
        if want_tgrad:
            dh = dh - dmh
            gtimes[n] += dt0 - dh
            gtimes[n + 1] += dt1 + dh
        zbar, zbar_zero = zbar - lam * ybar + fbar, False
        y = p.combine(y, [z, fz], [1.0, -1.0 / lam], 1.0 / lam, p.state_dtype)
        ybar = lam * ybar
    if 0 in arriving:
        ybar = ybar + arriving.pop(0)
    if ctx.strategy.check != "off" and version(ctx.x0) == ctx.x0_version:
        ctx.reconstruction_error = reconstruction_error(y, z, ctx.x0)
    grad_params = [None if g is None else g.to(q.dtype) for g, q in zip(vjp.acc, vjp.params)]
    return (None, None, gtimes, (ybar + zbar).to(ctx.x_dtype), *grad_params)
