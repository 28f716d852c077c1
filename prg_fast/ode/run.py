"""A described solve, run: the one path from (model, x, Grid, SolveDescription) to the states.
The Problem of the call (integrate); under an adjoint with grad mode the first evaluation with its
graph (strategies.first_evaluation: discovers what the velocity reads, sizes a memory budget, and
the solve reuses its output); then the strategy's loop: StoredAdjoint -> adjoint.adjoint_solve,
ReversibleAdjoint -> reversible.ReversibleSolve, Backprop -> plain autograd through integrate.solve
or reversible.solve_reversible."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import backends
from .adjoint import adjoint_solve
from .description import FLOAT_DTYPES, Backprop, ReversibleAdjoint, SolveDescription
from .grids import Grid
from .integrate import Problem, solve
from .module_state import ModuleState
from .parametrize_cache import SharedParametrizations
from .reach import check_computed_inputs, collect_params, discover_params, reachable
from .reversible import ReversibleSolve, solve_reversible
from .strategies import FirstEvaluation, first_evaluation
from .vjp import has_reentrant_checkpoint


def dtypes(model, x: torch.Tensor, model_dtype: Optional[torch.dtype]) -> Tuple[torch.dtype, torch.dtype]:
    """(state dtype, network dtype). The state and every accumulation are float32 (float64 for a
    float64 x); the network reads its own dtype: its parameters' for an nn.Module, else x's."""
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    if model_dtype is None:
        model_dtype = x.dtype
        if isinstance(model, torch.nn.Module):
            for p in model.parameters():
                if p.is_floating_point():
                    model_dtype = p.dtype
                    break
    if model_dtype not in FLOAT_DTYPES:
        raise TypeError(f"model_dtype must be a floating dtype, got {model_dtype}")
    return state, model_dtype


def build_problem(func, x: torch.Tensor, grid: Grid, spec: SolveDescription, tracked: bool) -> Problem:
    """The Problem of this call. Under an adjoint (`tracked`) the Functions take the tensor grid
    as an input and return its gradient, so the problem reads it without its graph; plain
    backprop differentiates through the graph it carries."""
    if grid.out_rows is not None and spec.reversible_coupling is not None:
        # the per-sample save_at grid may hold zero-length steps, which only the RK step maps to the identity
        raise ValueError(
            "reversible=True cannot be combined with save_at on per-sample times (t, t0 or save_at per sample): "
            "a zero-length step of the reversible scheme is not the identity (its coupling mixes the two states); "
            "use reversible=False, or shared times"
        )
    chosen = backends.select(spec.backend, x.device)
    state_dtype, net_dtype = dtypes(func, x, spec.model_dtype)
    # what the velocity reaches (modules, tensors): its parameters and buffers beyond the first evaluation
    reach = reachable(func) if tracked else None
    modules = reach.modules if reach is not None else []
    times = grid.times
    # a velocity that declares jumps at the grid points (a piecewise time map whose knots are the grid's,
    # as prg_fast.diffusion's) is read from inside each step, as with torchdiffeq's perturb (float grids)
    perturb = spec.perturb or (times is None and getattr(func, "jumps_at_grid_points", False) is True)
    params = collect_params(func, spec.adjoint_params, reach)
    unlisted = [t for t in reach.computed if all(t is not p for p in params)] if reach is not None else []
    return Problem(
        func=func, tableau=spec.tableau, grid=grid.points, out_index=grid.out_index, combine=chosen.combine,
        state_dtype=state_dtype, net_dtype=net_dtype, batch_time=spec.batch_time, check_finite=spec.check_finite,
        params=params, unlisted=unlisted, perturb=perturb, modules=modules,
        times=times.detach() if tracked and times is not None else times, out_rows=grid.out_rows,
        combine_rows=chosen.combine_rows, combine_into=backends.into_function(chosen.name),
        module_state=ModuleState.of(modules) if tracked else None,
    )


def discover(problem: Problem, x: torch.Tensor, spec: SolveDescription,
             time_grad: bool) -> Tuple[Problem, Optional[FirstEvaluation]]:
    """The first evaluation, and the problem with every input it reads (prg_fast.ode.reach) and
    what its graph holds (a reentrant checkpoint, parametrizations cached around the solve)."""
    first = first_evaluation(problem, x, problem.params, time_grad)
    params = list(problem.params)
    # parametrizations cached around the solve (parametrize.cached()): their shared tensors are
    # inputs of the solve, the originals reached only through them (prg_fast.ode.parametrize_cache)
    shared = SharedParametrizations.of_now(problem.modules) if first is not None else None
    if shared is not None:
        params += [w for w in shared.tensors() if all(w is not q for q in params)]
    direct: set = set()
    node_types: set = set()
    params = discover_params(first, params, direct, node_types)
    explicit = {id(p) for p in spec.adjoint_params} if spec.adjoint_params is not None else set()
    params = check_computed_inputs(params, explicit, direct)
    reentrant = has_reentrant_checkpoint(node_types)
    # the problem is this call's own (build_problem): completed in place, not copied (~20 us a call)
    problem.params, problem.reentrant, problem.shared_parametrizations = params, reentrant, shared
    return problem, first


def run(func, x: torch.Tensor, grid: Grid, spec: SolveDescription) -> torch.Tensor:
    """The states at grid.out_index stacked on dim 0, in x's dtype."""
    strategy = spec.strategy
    # an adjoint differentiates this call: it needs everything the velocity reads and writes
    tracked = not isinstance(strategy, Backprop) and torch.is_grad_enabled()
    problem = build_problem(func, x, grid, spec, tracked)
    times = grid.times
    time_grad = times is not None and times.requires_grad and torch.is_grad_enabled()
    first = None
    if tracked:
        problem, first = discover(problem, x, spec, time_grad)
    differentiate = time_grad or torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in problem.params))
    coupling = spec.reversible_coupling
    if isinstance(strategy, ReversibleAdjoint):
        if first is not None:
            # the reversible scheme runs its own evaluations: discovery costs one (a cached
            # parametrization is computed once per cache, and stays as the first evaluation left it)
            shared = problem.shared_parametrizations
            first.discard(SharedParametrizations.computing_modules(problem.modules) if shared is not None else ())
        if differentiate:
            out = ReversibleSolve.apply(problem, strategy, times, x, *problem.params)
        else:
            out = solve_reversible(problem, x, coupling)
    elif coupling is not None:
        out = solve_reversible(problem, x, coupling)
    elif tracked and differentiate:
        out = adjoint_solve(problem, strategy, first, times, x)
    else:
        out = solve(problem, x, first.evaluator() if first is not None else None)
    return out if out.dtype == x.dtype else out.to(x.dtype)
