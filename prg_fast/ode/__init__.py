"""The ODE engine: fixed-step Runge-Kutta solves with fused stage kernels and exact discrete adjoints.

It imports nothing above itself (no paths, models or training), so an engine-only user pays for the
engine alone. The modules, bottom to top:

    solvers     Butcher tableaus (solvers are data)
    reference   the pure-PyTorch oracle every kernel and strategy is tested against
    ops         the torch.library layer over the compiled kernels (prg_fast._C, prg_fast._C_cuda);
                its fake kernels and autograd rules live below it, in prg_fast.kernels.op_rules
    backends    which implementation of the stage arithmetic runs, and why the others cannot
    integrate   the one integration loop
    reach       the modules and tensors requiring grad a velocity can reach (beyond its first evaluation)
    module_state  buffers the network writes while it runs, kept as plain backprop leaves them
    strategies  which evaluation graphs the adjoint keeps, what it stores
    adjoint     the exact discrete adjoint
    reversible  the algebraically reversible scheme and its adjoint
    cuda_graphs CUDA-graph replay of no-grad solves (also importable by its old name, graphs)
    fixed_grid  odeint's torchdiffeq options: a finer solver grid, linear interpolation
    api         reverse / generate / odeint / time_reversed
    info        what was built, and why not
"""
from . import cuda_graphs as graphs  # noqa: F401  (the module's old name)
from .api import generate, odeint, reverse, time_reversed
from .info import info
from .solvers import SOLVERS, ButcherTableau
from .version import __version__

__all__ = ["reverse", "generate", "odeint", "time_reversed", "info", "SOLVERS", "ButcherTableau", "__version__"]
