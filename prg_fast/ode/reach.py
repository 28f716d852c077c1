"""What a velocity can reach: the modules and the leaf tensors requiring grad it holds.

The adjoints must know everything a velocity reads that requires grad (to return its gradient) and
every buffer it may write (prg_fast.ode.module_state). Graph discovery (api._discover_params) sees
what the *first* evaluation reads; a velocity may read more later -- an expert chosen by time, a
tensor used only for t >= 1/2 -- so the callable itself is searched as well, the way cloudpickle
finds what a function needs: an nn.Module and its submodules (with what user-written modules hold as
plain attributes, and the globals their forward names),
what functools.partial, bound methods, closures and callable objects hold, the globals a function
names, defaults, and the items of small containers. Depth and container sizes are bounded, so a
velocity that closes over a dataset or a trainer costs a bounded walk, not a scan of everything.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import List

import torch

MAX_DEPTH = 6
MAX_ITEMS = 256  # larger containers (datasets, caches) are not searched


@dataclass
class Reach:
    modules: List[torch.nn.Module] = field(default_factory=list)  # each once, submodules included
    tensors: List[torch.Tensor] = field(default_factory=list)  # leaves requiring grad held outside modules


def _global_names(code: types.CodeType) -> List[str]:
    names = list(code.co_names)
    for const in code.co_consts:  # nested functions and lambdas
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return names


def reachable(obj) -> Reach:
    out = Reach()
    seen: set = set()
    seen_classes: set = set()
    modules: dict = {}

    def visit(o, depth: int) -> None:
        if o is None or depth > MAX_DEPTH or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.nn.Module):
            for m in o.modules():
                if id(m) in modules:
                    continue
                modules[id(m)] = m
                cls = type(m)
                if cls.__module__.startswith("torch."):
                    continue  # PyTorch's own modules hold nothing else that matters here
                # what a user-written module holds besides submodules (a function or a network
                # kept as a plain attribute: time_reversed(lambda ...)), and what its forward names
                for key, a in vars(m).items():
                    if not key.startswith("_") and not isinstance(a, (bool, int, float, str)):
                        visit(a, depth + 1)
                if cls not in seen_classes:
                    seen_classes.add(cls)
                    forward = getattr(cls, "forward", None)
                    if isinstance(forward, types.FunctionType):
                        visit_function_globals(forward, depth + 1)
            return
        if isinstance(o, torch.Tensor):
            # leaves only: a non-leaf (W = A @ B, a loss kept from an earlier step) made an input
            # would be differentiated through its own graph as well as by the solve, and may belong
            # to a graph long freed; graph discovery makes one that the velocity reads an error
            if o.requires_grad and o.is_leaf:
                out.tensors.append(o)
            return
        if isinstance(o, (types.ModuleType, type, str, bytes, int, float, bool, complex)):
            return
        if isinstance(o, functools.partial):
            visit(o.func, depth + 1)
            for a in o.args:
                visit(a, depth + 1)
            for a in o.keywords.values():
                visit(a, depth + 1)
            return
        if inspect.ismethod(o):
            visit(o.__self__, depth + 1)
            visit(o.__func__, depth + 1)
            return
        if isinstance(o, types.FunctionType):
            for cell in o.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    pass
            visit_function_globals(o, depth + 1)
            for d in o.__defaults__ or ():
                visit(d, depth + 1)
            visit(getattr(o, "__wrapped__", None), depth + 1)
            return
        if isinstance(o, (list, tuple, set, frozenset)):
            if len(o) <= MAX_ITEMS:
                for a in o:
                    visit(a, depth + 1)
            return
        if isinstance(o, dict):
            if len(o) <= MAX_ITEMS:
                for a in o.values():
                    visit(a, depth + 1)
            return
        # a callable object (or any object) that is not a module: what it holds
        attrs = getattr(o, "__dict__", None)
        if isinstance(attrs, dict) and len(attrs) <= MAX_ITEMS:
            for a in list(attrs.values()):
                visit(a, depth + 1)

    def visit_function_globals(fn: types.FunctionType, depth: int) -> None:
        g = fn.__globals__
        for name in _global_names(fn.__code__):
            if name in g:
                visit(g[name], depth)

    visit(obj, 0)
    out.modules = list(modules.values())
    return out
