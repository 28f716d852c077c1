"""A solve, described once: the tableau, the backend, the adjoint strategy and the few switches
every layer reads, built and validated by `describe` (called by reverse / generate / odeint) and
passed down whole; the CUDA-graph cache keys on it. Immutable: nothing below changes it.

Adjoint strategies are documented objects (as diffrax's adjoints), every one exact; the keywords
of reverse / generate / odeint are their short spelling, `strategy_from_keywords` the one place
that maps them and rejects invalid combinations, and `adjoint=` also takes an object. With K
steps, s stages, G one evaluation's graph, S one state:

    StoredAdjoint(memory_budget="auto", store="stages")   the default (adjoint=True). The forward
        stores every stage input (K*s*S; store="steps": one state per step, K*S, the backward then
        recomputes each step's stage inputs with s-1 extra evaluations) and keeps the graphs of its
        last floor(memory_budget / G) evaluations (float("inf"): all; as fast as backprop; None or
        0: none); the backward recomputes the others, one graph alive at a time. "auto": the budget
        is AUTO_FRACTION of the memory free on x's device when the solve starts
        (prg_fast.ode.free_memory), resolved by `budget_bytes`; a forward whose kept graphs meet an
        allocation failure starts over keeping none (prg_fast.ode.strategies).
    ReversibleAdjoint(coupling=0.999)   the algebraically reversible scheme on the tableau
        (prg_fast.ode.reversible): nothing stored, states rebuilt by the exact inverse step.
    Backprop(reversible_coupling=None)   plain autograd through the solver (adjoint=False); through
        the reversible scheme when a coupling is given (reversible=True, adjoint=False).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .free_memory import AUTO_FRACTION, free_bytes
from .solvers import ButcherTableau, get_tableau

AUTO = "auto"  # memory_budget: what fits in AUTO_FRACTION of the free memory (the default)

DEFAULT_COUPLING = 0.999
STORES = ("stages", "steps")
# what the reversible backward does when its rebuilt initial state is off (prg_fast.ode.reversible)
RECONSTRUCTION_CHECKS = ("error", "warn", "off")
BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_memory_budget(value) -> Union[None, float, str]:
    if value is None or (isinstance(value, str) and value == AUTO):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0:
        raise ValueError(
            f'memory_budget must be "auto" (what fits in {AUTO_FRACTION:g} of the free memory), None '
            "(recompute every evaluation) or a number of bytes >= 0 (float('inf') keeps every evaluation's "
            f"graph), got {value!r}"
        )
    return float(value)


def check_store(value) -> str:
    if not isinstance(value, str) or value not in STORES:
        raise ValueError(f'store must be "stages" or "steps", got {value!r}')
    return value


def check_coupling(coupling) -> float:
    if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0.0 < float(coupling) <= 1.0:
        raise ValueError(f"reversible_coupling must be a number in (0, 1], got {coupling!r}")
    return float(coupling)


def check_reconstruction_mode(value) -> str:
    if not isinstance(value, str) or value not in RECONSTRUCTION_CHECKS:
        raise ValueError(f'reversible_check must be "error", "warn" or "off", got {value!r}')
    return value


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class StoredAdjoint:
    """The exact discrete adjoint from stored stage inputs (or step states), keeping the graphs of
    the last evaluations that fit in `memory_budget` bytes ("auto": a share of the free memory,
    see the module docstring; None: recompute all)."""

    memory_budget: Union[None, float, str] = AUTO
    store: str = "stages"
    preserve_rng_state: bool = True

    def __post_init__(self):
        object.__setattr__(self, "memory_budget", check_memory_budget(self.memory_budget))
        check_store(self.store)
        _check_flag(self.preserve_rng_state, "preserve_rng_state")

    def budget_bytes(self, device: torch.device) -> Optional[float]:
        """The budget in bytes for a solve on `device` starting now: "auto" resolved against the
        free memory (None when unknown: keep nothing)."""
        if self.memory_budget != AUTO:
            return self.memory_budget
        free = free_bytes(device)
        return None if free is None else AUTO_FRACTION * free

    def graphs_to_keep(self, evaluations: int, graph_bytes: Optional[int], budget: Optional[float]) -> int:
        """How many of the forward's `evaluations` keep their graphs, each `graph_bytes` (measured
        on the first evaluation; None when it did not run with a graph), within `budget` bytes
        (budget_bytes)."""
        if budget is None or graph_bytes is None:
            return 0
        if math.isinf(budget):
            return evaluations
        return min(evaluations, int(budget // max(graph_bytes, 1)))


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
        _check_flag(self.preserve_rng_state, "preserve_rng_state")
        check_reconstruction_mode(self.check)


@dataclass(frozen=True)
class Backprop:
    """Plain autograd through the solver (through the reversible scheme when a coupling is given)."""

    reversible_coupling: Optional[float] = None

    def __post_init__(self):
        if self.reversible_coupling is not None:
            object.__setattr__(self, "reversible_coupling", check_coupling(self.reversible_coupling))


Strategy = Union[StoredAdjoint, ReversibleAdjoint, Backprop]
STRATEGIES = (StoredAdjoint, ReversibleAdjoint, Backprop)


def strategy_from_keywords(adjoint=True, reversible=False, reversible_coupling=DEFAULT_COUPLING,
                           memory_budget=AUTO, store="stages", preserve_rng_state=True,
                           reversible_check="error") -> Strategy:
    """The strategy the keywords spell; the one place invalid combinations are refused. The
    default memory_budget ("auto") belongs to the stored adjoint: with reversible=True or
    adjoint=False it does not apply."""
    check_reconstruction_mode(reversible_check)
    # None (the default before "auto") asks the same of the other strategies: keep no graph
    unset_budget = memory_budget is None or (isinstance(memory_budget, str) and memory_budget == AUTO)
    if isinstance(adjoint, STRATEGIES):
        if not unset_budget or (reversible, reversible_coupling, store, reversible_check) != (
                False, DEFAULT_COUPLING, "stages", "error"):
            raise ValueError(f"adjoint={adjoint!r} is a strategy object: leave reversible, reversible_coupling, "
                             "reversible_check, memory_budget and store at their defaults (the object says them)")
        return adjoint
    _check_flag(adjoint, "adjoint")
    _check_flag(reversible, "reversible")
    memory_budget, store = check_memory_budget(memory_budget), check_store(store)
    if (not unset_budget or store != "stages") and (reversible or not adjoint):
        raise ValueError(
            f"memory_budget={memory_budget!r} and store={store!r} choose what the stored adjoint keeps "
            "(adjoint=True, reversible=False); "
            + ("reversible=True stores nothing" if reversible else "adjoint=False keeps every graph")
            + ": leave memory_budget and store at their defaults ('auto', 'stages')"
        )
    if not adjoint:
        return Backprop(reversible_coupling if reversible else None)
    if reversible:
        return ReversibleAdjoint(reversible_coupling, preserve_rng_state, reversible_check)
    return StoredAdjoint(memory_budget, store, preserve_rng_state)


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

    @property
    def reversible_coupling(self) -> Optional[float]:
        """lam of the reversible scheme, or None for the plain Runge-Kutta step."""
        if isinstance(self.strategy, ReversibleAdjoint):
            return self.strategy.coupling
        return getattr(self.strategy, "reversible_coupling", None)


def describe(*, method="rk4", backend="auto", adjoint=True, adjoint_params=None, check_finite=False,
             model_dtype=None, preserve_rng_state=True, reversible=False, reversible_coupling=DEFAULT_COUPLING,
             reversible_check="error", memory_budget=AUTO, store="stages", batch_time=True,
             perturb=False) -> SolveDescription:
    """The description of a solve from the public keywords, every one checked here."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if model_dtype is not None and model_dtype not in FLOAT_DTYPES:
        raise TypeError(f"model_dtype must be a floating dtype, got {model_dtype}")
    if adjoint_params is not None:
        adjoint_params = tuple(adjoint_params)
        for i, p in enumerate(adjoint_params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params[{i}] must be a torch.Tensor, got {type(p).__name__}")
    strategy = strategy_from_keywords(adjoint, reversible, reversible_coupling, memory_budget, store,
                                      preserve_rng_state, reversible_check)
    return SolveDescription(tableau=get_tableau(method), backend=backend, strategy=strategy,
                            check_finite=bool(check_finite), model_dtype=model_dtype, batch_time=batch_time,
                            perturb=perturb, adjoint_params=adjoint_params)
