"""The ODE engine: fixed-step Runge-Kutta solves with fused stage kernels and exact discrete adjoints.

It imports nothing above itself (no paths, models or training), so an engine-only user pays for the
engine alone. A solve is data: api checks the arguments and builds a Grid and a SolveDescription,
the description makes the call's Problem (integrate), and the description's strategy runs it
(stored_adjoint, reversible_adjoint, backprop: each one class that runs its own forward and
backward, side by side over the one loop). Every module, by layer: docs/engine.md, "Layout".
"""
from . import cuda_graphs as graphs  # noqa: F401  (the module's old name)
from .api import generate, odeint, reverse, time_reversed
from .description import Backprop, ReversibleAdjoint, StoredAdjoint
from .info import info
from .solvers import SOLVERS, ButcherTableau
from .version import __version__

__all__ = ["reverse", "generate", "odeint", "time_reversed", "info", "SOLVERS", "ButcherTableau", "StoredAdjoint",
           "ReversibleAdjoint", "Backprop", "__version__"]
