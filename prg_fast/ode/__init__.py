"""The ODE engine: fixed-step Runge-Kutta solves with fused stage kernels and exact discrete adjoints.

It imports nothing above itself (no paths, models or training), so an engine-only user pays for the
engine alone. A solve is data: api checks the arguments and builds a Grid and a SolveDescription,
the description makes the call's Problem, and the description's strategy runs it -- each strategy
one class that runs its own forward and backward, side by side on one floor, over the one loop.
The modules, bottom to top:

    solvers      Butcher tableaus (solvers are data)
    embedded     embedded pairs for adaptive steps (dopri5, tsit5, ...), as data
    grids        time grids: uniform + save_at, floats or (differentiable, per-sample) tensors;
                 which states a solve returns; the unit time interval of reverse/generate
    free_memory  the memory free at a call (memory_budget="auto"), and what an allocation failure is
    ops          the stage arithmetic as a solve calls it (Backend) over the compiled operators
                 (their fake kernels and autograd rules live below, in prg_fast.kernels.op_rules)
    reference    the pure-PyTorch oracle every kernel and strategy is tested against
    backends     which implementation of the stage arithmetic runs, and why the others cannot
    step_buffers the no-grad loop's reused output buffers
    integrate    Problem (a solve as immutable data), Velocity (one evaluation), the one stage loop
    reach        what the velocity may read: the search of the callable, the walk of its graph
    module_state buffers the network writes while it runs, kept as plain backprop leaves them
    parametrize_cache  parametrizations cached around a solve
    rerun        an evaluation rerun in the backward: the replay record and its one VJP
    discovery    the first evaluation: a new Problem with what the velocity reads, the graph's bytes
    reversible   the algebraically reversible scheme (steps forward and back, reconstruction check)
    kept_graphs  the stored adjoint's forward: which evaluation graphs it keeps, what it stores
    stored_adjoint, reversible_adjoint, backprop
                 the strategies, side by side: StoredAdjoint, ReversibleAdjoint, Backprop
    description  the solve options (OPTIONS), the SolveDescription, keywords -> strategy objects
    cuda_graphs  CUDA-graph replay of no-grad solves (also importable by its old name, graphs)
    states       odeint's scalar, complex and tuple states
    fixed_grid   odeint's grids: 1-D, per-sample, and torchdiffeq's step_size/grid_constructor
    adaptive     odeint's adaptive steps: torchdiffeq's controller, dense output, events
    api          reverse / generate / odeint (odeint_adjoint, odeint_event) / time_reversed, and run
    info         what was built, and why not
"""
from . import cuda_graphs as graphs  # noqa: F401  (the module's old name)
from .api import generate, odeint, odeint_adjoint, odeint_event, reverse, time_reversed
from .description import Backprop, ReversibleAdjoint, StoredAdjoint
from .info import info
from .solvers import SOLVERS, ButcherTableau
from .version import __version__

__all__ = ["reverse", "generate", "odeint", "odeint_adjoint", "odeint_event", "time_reversed", "info", "SOLVERS", "ButcherTableau", "StoredAdjoint",
           "ReversibleAdjoint", "Backprop", "__version__"]
