"""The ODE engine: fixed-step Runge-Kutta solves with fused stage kernels and exact discrete adjoints.

It imports nothing above itself (no paths, models or training), so an engine-only user pays for the
engine alone. The modules, bottom to top:

    solvers      Butcher tableaus (solvers are data)
    free_memory  the memory free at a call (memory_budget="auto"), and what an allocation failure is
    description  the SolveDescription and the adjoint strategy objects, built once per call
    grids        time grids: uniform + save_at, floats or (differentiable, per-sample) tensors
    reference    the pure-PyTorch oracle every kernel and strategy is tested against
    ops          the torch.library layer over the compiled kernels (its fake kernels and
                 autograd rules live below it, in prg_fast.kernels.op_rules)
    backends     which implementation of the stage arithmetic runs, and why the others cannot
    integrate    Problem: the one stage loop, evaluation checks
    reach        what the velocity reads: reach search, graph discovery, computed-input check
    module_state buffers the network writes while it runs, kept as plain backprop leaves them
    replay       the replay record both adjoints rerun evaluations from (with parametrize_cache)
    vjp          the one VJP of an evaluation: hooks once on the total, reentrant checkpoints
    strategies   the first evaluation; which evaluation graphs the adjoint keeps, what it stores
    adjoint      the exact discrete adjoint (AdjointSolve)
    reversible   the algebraically reversible scheme and its adjoint (ReversibleSolve)
    run          a described solve, run: Problem, discovery, the strategy's loop
    cuda_graphs  CUDA-graph replay of no-grad solves (also importable by its old name, graphs)
    states       odeint's scalar, complex and tuple states
    fixed_grid   odeint's torchdiffeq options: a finer solver grid, linear interpolation
    api          reverse / generate / odeint / time_reversed
    info         what was built, and why not
"""
from . import cuda_graphs as graphs  # noqa: F401  (the module's old name)
from .api import generate, odeint, reverse, time_reversed
from .description import Backprop, ReversibleAdjoint, StoredAdjoint
from .info import info
from .solvers import SOLVERS, ButcherTableau
from .version import __version__

__all__ = ["reverse", "generate", "odeint", "time_reversed", "info", "SOLVERS", "ButcherTableau", "StoredAdjoint",
           "ReversibleAdjoint", "Backprop", "__version__"]
