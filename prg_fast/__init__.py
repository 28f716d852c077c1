"""prg_fast: run pretrained flow / diffusion-ODE models in reverse (data -> noise) with fused
kernels and an exact, memory-flat discrete adjoint; PRG (arXiv 2412.01787) on top.

    z = prg_fast.reverse(model, x, t=1.0, steps=20, method="rk4")     # data -> noise
    x = prg_fast.generate(model, z, steps=20)                          # noise -> data
    ys = prg_fast.odeint(func, y0, t_grid)                             # torchdiffeq-style

The package imports without its compiled part; `prg_fast.info()` says what is built and why not.
"""
from . import data, eval, models, paths, train
from .api import generate, odeint, reverse, time_reversed
from .classifier import PRGClassifier
from .finetune import FinetuneConfig, finetune
from .info import info
from .losses import flow_matching_loss
from .solvers import SOLVERS, ButcherTableau
from .train import PretrainConfig, load_checkpoint, pretrain

__all__ = [
    "reverse", "generate", "odeint", "time_reversed", "info", "SOLVERS", "ButcherTableau",
    "paths", "models", "data", "train", "flow_matching_loss", "pretrain", "PretrainConfig",
    "load_checkpoint", "PRGClassifier", "eval", "finetune", "FinetuneConfig",
]
__version__ = "0.1.0"
