"""A solve, described once (`SolveDescription`, immutable): the tableau, the backend, the adjoint
strategy object and the switches every layer reads, built and validated by `describe`; the solve
options named once, in OPTIONS. Why so: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from . import backends
from .backprop import Backprop
from .integrate import FLOAT_DTYPES, Grid, Problem, Velocity, check_choice, check_flag
from .reversible import DEFAULT_COUPLING, RECONSTRUCTION_CHECKS
from .reversible_adjoint import ReversibleAdjoint
from .solvers import ButcherTableau, get_embedded, get_tableau
from .stored_adjoint import AUTO, STORES, StoredAdjoint, check_memory_budget

# The solve options of reverse / generate / odeint (their **options), with their defaults.
OPTIONS = {
    # bytes of evaluation graphs the stored adjoint keeps to skip their recomputation; "auto": what
    # fits in half the memory free on x's device when the call starts, recomputing them instead when
    # keeping them meets an allocation failure; None or 0: recompute all; float("inf"): keep all
    "memory_budget": AUTO,
    "store": "stages",  # what the stored adjoint's forward stores ("steps": one state per step)
    "reversible": False,  # McCallum & Foster's algebraically reversible scheme on `method`
    "reversible_coupling": DEFAULT_COUPLING,  # its coupling, in (0, 1]
    # what its backward does when the initial state it rebuilds is off: "error", "warn", "off"
    "reversible_check": "error",
    "preserve_rng_state": True,  # replay dropout exactly in recomputed evaluations
    "adjoint_params": None,  # tensors the velocity reads to differentiate besides what is found
    # the dtype the network reads (default: its parameters'); the state stays float32 (float64 for
    # float64 x)
    "model_dtype": None,
    "check_finite": False,  # stop at the first step that produced NaN/Inf, naming it
}
Strategy = Union[StoredAdjoint, ReversibleAdjoint, Backprop]
STRATEGIES = (StoredAdjoint, ReversibleAdjoint, Backprop)


def strategy_from_keywords(adjoint=True, **options) -> Strategy:
    """The strategy the keywords spell (`adjoint` and OPTIONS, of which it reads the strategies'); the
    one place invalid combinations are refused. The default memory_budget ("auto") belongs to the stored adjoint:
    with reversible=True or adjoint=False it does not apply."""
    o = {**OPTIONS, **options}
    check_choice(o["reversible_check"], "reversible_check", RECONSTRUCTION_CHECKS)
    budget, store, reversible = o["memory_budget"], o["store"], o["reversible"]
    # None (the default before "auto") asks the same of the other strategies: keep no graph
    unset_budget = budget is None or (isinstance(budget, str) and budget == AUTO)
    if isinstance(adjoint, STRATEGIES):
        named = ("reversible", "reversible_coupling", "store", "reversible_check")
        if not unset_budget or any(o[k] != OPTIONS[k] for k in named):
            raise ValueError(f"adjoint={adjoint!r} is a strategy object: leave reversible, reversible_coupling, "
                             "reversible_check, memory_budget and store at their defaults (the object says them)")
        return adjoint
    check_flag(adjoint, "adjoint")
    check_flag(reversible, "reversible")
    budget, store = check_memory_budget(budget), check_choice(store, "store", STORES)
    if (not unset_budget or store != "stages") and (reversible or not adjoint):
        raise ValueError(
            f"memory_budget={budget!r} and store={store!r} choose what the stored adjoint keeps "
            "(adjoint=True, reversible=False); "
            + ("reversible=True stores nothing" if reversible else "adjoint=False keeps every graph")
            + ": leave memory_budget and store at their defaults ('auto', 'stages')"
        )
    if not adjoint:
        return Backprop(o["reversible_coupling"] if reversible else None)
    if reversible:
        return ReversibleAdjoint(o["reversible_coupling"], o["preserve_rng_state"], o["reversible_check"])
    return StoredAdjoint(budget, store, o["preserve_rng_state"])


@dataclass(frozen=True)
class SolveDescription:
    """Everything about a solve but its model, state and grid."""

    tableau: ButcherTableau
    backend: str  # as requested ("auto" resolved per device by prg_fast.ode.backends)
    strategy: Strategy
    check_finite: bool = False
    model_dtype: Optional[torch.dtype] = None  # None: the model's parameters' dtype, else x's
    batch_time: bool = True  # t passed as shape (B,) (reverse/generate) or 0-dim (odeint)
    perturb: bool = False  # torchdiffeq's option: stages on grid points read one float step inside
    # the tensors passed as adjoint_params=; no part of a CUDA graph's identity (no grad there)
    adjoint_params: Optional[Tuple[torch.Tensor, ...]] = dataclasses.field(default=None, compare=False)

    def problem(self, func, x: torch.Tensor, grid: Grid) -> Problem:
        """The Problem of a call: this description on `func`, x's device and dtypes, and `grid`.
        The state and every accumulation are float32 (float64 for a float64 x); the network reads
        its own dtype: model_dtype, else its parameters' for an nn.Module, else x's."""
        net_dtype = self.model_dtype
        if net_dtype is None:
            floating = (p.dtype for p in func.parameters() if p.is_floating_point()) \
                if isinstance(func, torch.nn.Module) else iter(())
            net_dtype = next(floating, x.dtype)
        if net_dtype not in FLOAT_DTYPES:
            raise TypeError(f"model_dtype must be a floating dtype, got {net_dtype}")
        state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        per_sample = grid.times is not None and grid.times.dim() == 2
        # a velocity that declares jumps at the grid points (a piecewise time map whose knots are the
        # grid's, as prg_fast.diffusion's) is read from inside each step, as with torchdiffeq's perturb
        jumps = grid.times is None and getattr(func, "jumps_at_grid_points", False) is True
        velocity = Velocity(func, state_dtype, net_dtype, batched_time=self.batch_time or per_sample)
        return Problem(velocity, self.tableau, grid, backends.select(self.backend, x.device),
                       check_finite=self.check_finite, perturb=self.perturb or jumps,
                       adjoint_params=self.adjoint_params)


def describe(*, method="rk4", backend="auto", adjoint=True, caller="describe", **options) -> SolveDescription:
    """The description of a solve from the public keywords (method, backend, adjoint and OPTIONS),
    every one checked here; an unknown one refused as Python would refuse it in `caller`'s call."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}")
    o = {**OPTIONS, **options}
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
    if o["model_dtype"] is not None and o["model_dtype"] not in FLOAT_DTYPES:
        raise TypeError(f"model_dtype must be a floating dtype, got {o['model_dtype']}")
    adjoint_params = o["adjoint_params"]
    if adjoint_params is not None:
        adjoint_params = tuple(adjoint_params)
        for i, p in enumerate(adjoint_params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params[{i}] must be a torch.Tensor, got {type(p).__name__}")
    tableau = get_embedded(method) or get_tableau(method)  # an adaptive pair (odeint), or a fixed-step tableau
    return SolveDescription(tableau=tableau, backend=backend, strategy=strategy_from_keywords(adjoint, **o),
                            check_finite=bool(o["check_finite"]), model_dtype=o["model_dtype"],
                            adjoint_params=adjoint_params)
