"""prg_fast: run pretrained flow / diffusion-ODE models in reverse (data -> noise) with fused
kernels and an exact, memory-flat discrete adjoint; PRG (arXiv 2412.01787) on top.

    z = prg_fast.reverse(model, x, t=1.0, steps=20, method="rk4")     # data -> noise
    x = prg_fast.generate(model, z, steps=20)                          # noise -> data
    ys = prg_fast.odeint(func, y0, t_grid)                             # torchdiffeq-style

The package imports without its compiled part; `prg_fast.info()` says what is built and why not.
Only the engine (`prg_fast.ode`) is imported eagerly; the PRG layer (paths, models, training, ...)
is imported on first use, so `import prg_fast` costs an engine-only user nothing more.
"""
import importlib

from .ode import SOLVERS, ButcherTableau, __version__, generate, info, odeint, reverse, time_reversed

# public name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    "data": ("prg_fast.data", None),
    "diffusion": ("prg_fast.diffusion", None),
    "eval": ("prg_fast.training.evaluate", None),
    "models": ("prg_fast.models", None),
    "paths": ("prg_fast.paths", None),
    "train": ("prg_fast.training.pretrain", None),
    "training": ("prg_fast.training", None),
    "PRGClassifier": ("prg_fast.classifier", "PRGClassifier"),
    "FinetuneConfig": ("prg_fast.training.finetune", "FinetuneConfig"),
    "finetune": ("prg_fast.training.finetune", "finetune"),
    "flow_matching_loss": ("prg_fast.losses", "flow_matching_loss"),
    "from_diffusers": ("prg_fast.diffusion", "from_diffusers"),
    "PretrainConfig": ("prg_fast.training.pretrain", "PretrainConfig"),
    "load_checkpoint": ("prg_fast.training.pretrain", "load_checkpoint"),
    "pretrain": ("prg_fast.training.pretrain", "pretrain"),
}

__all__ = ["reverse", "generate", "odeint", "time_reversed", "info", "SOLVERS", "ButcherTableau", *_LAZY]


def __getattr__(name):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'prg_fast' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
