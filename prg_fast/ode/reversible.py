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

Coupling `lam` (`reversible_coupling=`, in (0, 1]): the paper recommends lam = 0.999. lam = 1 makes
the inverse free of division but the scheme then has an empty region of linear stability (y and z
decouple into a leapfrog-like oscillation that never decays); lam < 1 damps y towards z and gives a
nonzero stability region. The inverse divides by lam, so a small lam amplifies the rounding error of
the reconstruction by 1/lam per step; lam close to 1 keeps the reconstruction exact to rounding
(in float64 the initial state is recovered to ~1e-12 after tens of steps).

Cost, with s the number of stages: forward 2s evaluations per step (Psi_h and Psi_{-h}), twice the
base solver; backward 2s evaluations recomputed with graph plus their 2s vector-Jacobian products
per step (the recomputation of the inverse step doubles as the recomputation for the VJPs). Stored
for the backward: only the final pair (y_K, z_K) -- two state-sized tensors whatever K and whatever
outputs are requested -- plus, with preserve_rng_state, two small random-generator states per step
so dropout is replayed exactly.

Gradients are exact for this scheme's arithmetic up to the rounding of the reconstruction: they
equal plain backprop through the same reversible scheme (`reversible=True, adjoint=False`, which
runs `solve_reversible` below under ordinary autograd) to ~1e-12 relative in float64 (measured
~1e-15 on small MLPs); in float32 the reconstruction's rounding shows, ~5e-7 relative measured.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch

from . import parametrize_cache
from .adjoint import accumulate
from .integrate import (Problem, accumulator_dtype, autocast_state, capture_rng, ParamVersions, param_versions,
                        restore_rng)
from .module_state import TrainingModes, left_as_found
from .vjp import evaluation_vjp

DEFAULT_COUPLING = 0.999

# What the backward does when the initial state it rebuilds by the inverse steps differs from the
# one the user passed by more than RECONSTRUCTION_TOL (relative, in the state's norm): see
# check_reconstruction.
RECONSTRUCTION_CHECKS = ("error", "warn", "off")
RECONSTRUCTION_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def check_coupling(coupling) -> float:
    if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0.0 < float(coupling) <= 1.0:
        raise ValueError(f"reversible_coupling must be a number in (0, 1], got {coupling!r}")
    return float(coupling)


def check_reconstruction_mode(value) -> str:
    if not isinstance(value, str) or value not in RECONSTRUCTION_CHECKS:
        raise ValueError(f'reversible_check must be "error", "warn" or "off", got {value!r}')
    return value


def reconstruction_error(y0: torch.Tensor, z0: torch.Tensor, x: torch.Tensor) -> float:
    """max(|y0 - x|, |z0 - x|) / |x| (norms over the whole state): how far the inverse steps'
    rebuilt initial pair lies from the initial state both y and z started from."""
    x = x.detach().to(y0.dtype)
    scale = x.norm().clamp_min(torch.finfo(y0.dtype).tiny)
    return (torch.maximum((y0 - x).norm(), (z0 - x).norm()) / scale).item()


def check_reconstruction(error: float, dtype: torch.dtype, mode: str) -> None:
    """The reversible adjoint's gradients are exact only as far as the inverse steps rebuild the
    forward's states. In floating point each inverse step amplifies the rounding of the one after
    it by up to the network's local Lipschitz constant times h (and 1/lam): for a smooth velocity
    the rebuilt initial state matches to rounding, for one with a large Lipschitz constant
    (BatchNorm in train mode with large weights, sharp attention) it can drift by orders of
    magnitude, and the gradient with it. The rebuilt initial state is compared with the one
    passed (kept at no cost) and, above RECONSTRUCTION_TOL[state dtype], "error" raises, "warn"
    warns with the figure, "off" does nothing."""
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


def _base_step(p: Problem, t: float, h: float, x: torch.Tensor, end=None) -> torch.Tensor:
    """x + Psi_h(t, x): one step of the base tableau (state dtype)."""
    ks: List[torch.Tensor] = []
    tab = p.tableau
    for i in range(tab.stages):
        ks.append(p.evaluate(p.stage_time(t, h, i, end), p.stage_input(x, ks, i, h)))
    return p.step_output(x, ks, h)


def _forward_step(p, lam, n, y, z, rng: Optional[list], states: Optional[list] = None):
    t0, t1 = p.point(n), p.point(n + 1)
    h = t1 - t0
    if rng is not None:
        rng.append(capture_rng(y.device))
    if states is not None:  # the written buffers before the base step (prg_fast.ode.module_state)
        states.append(p.module_state.snapshot())
    fz = _base_step(p, t0, h, z, t1)  # z + Psi_h(t0, z)
    # lam y + (1 - lam) z + (fz - z) = lam y - lam z + fz
    y = p.combine(fz, [y, z], [lam, -lam], 1.0, p.state_dtype)
    if rng is not None:
        rng.append(capture_rng(y.device))
    if states is not None:
        states.append(p.module_state.snapshot())
    gy = _base_step(p, t1, -h, y, t0)  # y + Psi_{-h}(t1, y)
    z = p.combine(z, [y, gy], [1.0, -1.0], 1.0, p.state_dtype)
    return y, z


def _run(p: Problem, x: torch.Tensor, lam: float, rng: Optional[list],
         states: Optional[list] = None) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    want = p.output_points()
    y = z = x
    saved = {0: x} if 0 in want else {}
    for n in range(p.steps):
        y, z = _forward_step(p, lam, n, y, z, rng, states)
        p.check(y, n)
        if n + 1 in want:
            saved[n + 1] = y
    return p.gather_outputs(saved), y, z


def solve_reversible(problem: Problem, x: torch.Tensor, coupling: float = DEFAULT_COUPLING) -> torch.Tensor:
    """The reversible scheme under ordinary autograd (or no_grad): the oracle for ReversibleSolve.
    Returns the y states at problem.out_index stacked on dim 0."""
    outs, _, _ = _run(problem, x.to(problem.state_dtype), check_coupling(coupling), None)
    return torch.stack(outs)


def final_pair(problem: Problem, x: torch.Tensor, coupling: float = DEFAULT_COUPLING) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_K, z_K) of the reversible scheme from x, no graph (what ReversibleSolve keeps)."""
    with torch.no_grad():
        _, y, z = _run(problem, x.to(problem.state_dtype), check_coupling(coupling), None)
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
    def forward(ctx, problem: Problem, coupling: float, preserve_rng: bool, check: str, times: Optional[torch.Tensor],
                x: torch.Tensor, *params: torch.Tensor):
        at_start = param_versions(params)  # a model writing its own parameters moves them (ParamVersions)
        lam = check_coupling(coupling)
        ctx.check = check_reconstruction_mode(check)
        rng: Optional[list] = [] if preserve_rng else None
        # buffers the velocity writes (BatchNorm in train mode, ...): kept per base step and loaded
        # back before each rerun, as the random states are
        watch = problem.module_state
        states: Optional[list] = [] if watch is not None and watch.written else None
        outs, y, z = _run(problem, x.to(problem.state_dtype), lam, rng, states)
        if watch is not None:
            watch.check_untracked()
        # The final pair is all the backward needs: every earlier state is reconstructed by the
        # exact inverse step. Saved through autograd so saved-tensor hooks apply and it is freed.
        ctx.save_for_backward(y, z)
        # x, which the rebuilt initial state is checked against: an alias of the input (no copy,
        # and not through saved-tensor hooks, which would copy it); if it is modified in place
        # before the backward, the check is skipped (its version tells)
        ctx.x0, ctx.x0_version = x.detach(), x._version
        ctx.problem, ctx.lam, ctx.rng, ctx.states = problem, lam, rng, states
        ctx.versions = ParamVersions(params, at_start)
        ctx.modes = TrainingModes(problem.modules)
        ctx.x_dtype, ctx.device = x.dtype, x.device
        ctx.autocast = autocast_state(x.device.type)
        return torch.stack(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        state = ctx.problem.module_state if ctx.states is not None else None
        # reruns under the forward's train/eval flags; the written buffers end as they were found
        ctx.versions.before_backward()
        with left_as_found(state), ctx.modes, parametrize_cache.kept(ctx.problem.shared_parametrizations):
            grads = _backward(ctx, grad_out)
        ctx.versions.after_backward(grads[6:])
        # after the version check: parameters changed in place also spoil the reconstruction, and
        # that error names the cause
        if getattr(ctx, "reconstruction_error", None) is not None:
            check_reconstruction(ctx.reconstruction_error, ctx.problem.state_dtype, ctx.check)
        return grads


def _backward(ctx, grad_out: torch.Tensor):
    p: Problem = ctx.problem
    lam = ctx.lam
    y, z = ctx.saved_tensors
    y, z = y.detach(), z.detach()
    rng = list(ctx.rng) if ctx.rng is not None else None
    states = list(ctx.states) if ctx.states is not None else None
    params = list(p.params)
    arriving = {idx: g.to(p.state_dtype) for idx, g in p.output_cotangents(grad_out).items()}
    ybar = torch.zeros_like(y)
    zbar = torch.zeros_like(z)
    zbar_zero = True  # nothing has reached z yet: the outputs read only y
    # None until an evaluation reads the parameter: an unread one gets None, as in plain backprop
    acc: List[Optional[torch.Tensor]] = [None] * len(params)
    acc_dtype = [accumulator_dtype(q) for q in params]
    autocast_on, autocast_dtype = ctx.autocast
    # A tensor grid that requires grad: the base step's time and step size are leaves of each
    # recomputed step, so their gradients come out of the same VJP.
    want_tgrad = p.times is not None and ctx.needs_input_grad[4]
    gtimes = torch.zeros_like(p.times) if want_tgrad else None

    def vjp(t, h, end, x, cot, state, buffers):
        """(x + Psi_h(t, x)) recomputed with graph; returns its value, cot^T d/dx, and cot^T
        d/dt, cot^T d/dh (None unless the time gradient is wanted); adds cot^T d/dparams.
        cot None: a cotangent known to be zero (the last step's z, which no output reads): the
        step is only recomputed, without graph, as plain backprop never differentiates it."""
        if buffers is not None:
            p.module_state.load(buffers)
        xg = x.detach().requires_grad_(cot is not None)
        if want_tgrad and cot is not None:
            t, h = t.detach().requires_grad_(True), h.detach().requires_grad_(True)
        inputs = [xg] + ([t, h] if want_tgrad else []) + params
        with torch.set_grad_enabled(cot is not None), \
                torch.autocast(ctx.device.type, dtype=autocast_dtype, enabled=autocast_on):
            if state is not None:
                with restore_rng(state, ctx.device):
                    out = _base_step(p, t, h, xg, end)
            else:
                out = _base_step(p, t, h, xg, end)
            # the parameters' hooks do not run here: autograd runs them once on the returned total
            grads = evaluation_vjp(out, inputs, cot, p.reentrant) if cot is not None else [None] * len(inputs)
        tgrads = [None, None]
        if want_tgrad:
            tgrads = [g if g is not None else torch.zeros_like(t) for g in grads[1:3]]
            del grads[1:3]
        accumulate(acc, grads[1:], acc_dtype)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(xg)
        return out.detach(), gx, tgrads

    for n in reversed(range(p.steps)):
        if n + 1 in arriving:
            ybar = ybar + arriving.pop(n + 1)
        t0, t1 = p.point(n), p.point(n + 1)
        h = t1 - t0
        state_f = state_g = None
        if rng is not None:
            state_g = rng.pop()
            state_f = rng.pop()
        buffers_f = buffers_g = None
        if states is not None:
            buffers_g = states.pop()
            buffers_f = states.pop()
        # z_{n+1} = z_n + y_{n+1} - G(y_{n+1}),  G = base step of -h from t1
        gy, gbar, (dt1, dmh) = vjp(t1, -h, t0, y, None if zbar_zero else -zbar, state_g, buffers_g)
        ybar = ybar + zbar + gbar
        z = p.combine(z, [gy, y], [1.0, -1.0], 1.0, p.state_dtype)
        # y_{n+1} = lam y_n - lam z_n + F(z_n),  F = base step of h from t0
        fz, fbar, (dt0, dh) = vjp(t0, h, t1, z, ybar, state_f, buffers_f)
        if want_tgrad:
            dh = dh - dmh
            gtimes[n] += dt0 - dh
            gtimes[n + 1] += dt1 + dh
        zbar = zbar - lam * ybar + fbar
        zbar_zero = False
        y = p.combine(y, [z, fz], [1.0, -1.0 / lam], 1.0 / lam, p.state_dtype)
        ybar = lam * ybar
    if 0 in arriving:
        ybar = ybar + arriving.pop(0)
    if ctx.check != "off" and ctx.x0._version == ctx.x0_version:
        ctx.reconstruction_error = reconstruction_error(y, z, ctx.x0)
    gx = (ybar + zbar).to(ctx.x_dtype)
    grad_params = [None if g is None else g.to(q.dtype) for g, q in zip(acc, params)]
    return (None, None, None, None, gtimes, gx, *grad_params)
