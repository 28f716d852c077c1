"""CUDA-graph replay of a whole no-grad fixed-step solve (reverse/generate with cuda_graph=...): one
capture replayed removes the per-step launch overhead of small batches. What the cache keys on and
when "auto" captures: docs/engine.md, "Inside the engine"; docs/gpu.md."""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from itertools import chain
from typing import Callable, Dict, Hashable, List, Tuple

import torch

from .integrate import autocast_state

_DEFAULT_MAX_SIZE = int(os.environ.get("PRG_FAST_CUDA_GRAPH_CACHE", "16"))
_DEFAULT_MAX_NUMEL = int(os.environ.get("PRG_FAST_CUDA_GRAPH_MAX_NUMEL", str(2 ** 18)))


def _model_token(model) -> Hashable:
    try:
        ref = weakref.ref(model)
    except TypeError:  # objects without weakref support are keyed by identity for their lifetime
        return ("id", id(model))
    hash(ref)  # a weakref hashes its referent only while alive: fix the hash now so dead keys stay usable
    return ref


def cache_key(model, x: torch.Tensor, grid: List[float], index: List[int], spec: Hashable) -> Tuple:
    """Everything a captured solve depends on besides the values it reads in place; `spec` is the
    solve's description (prg_fast.ode.description.SolveDescription: method, backend, model dtype,
    strategy and the rest)."""
    if isinstance(model, torch.nn.Module):
        modes = tuple(m.training for m in model.modules())
        storage = tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                        for t in chain(model.parameters(), model.buffers()))
    else:
        modes, storage = (), ()
    return (_model_token(model), tuple(x.shape), x.dtype, x.device, x.stride(), tuple(grid), tuple(index),
            spec, autocast_state(x.device.type), modes, storage)


class GraphCache:
    """Bounded LRU of captured solves. `get(key, capture)` takes the capture function, so the
    bookkeeping is testable without a GPU."""

    def __init__(self, max_size: int = _DEFAULT_MAX_SIZE):
        self._entries: "OrderedDict[Tuple, object]" = OrderedDict()
        self.captures = 0
        self.set_max_size(max_size)

    def set_max_size(self, max_size: int) -> None:
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, got {max_size!r}")
        self.max_size = max_size
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def _drop_dead(self) -> None:
        for key in [k for k in self._entries if isinstance(k[0], weakref.ref) and k[0]() is None]:
            del self._entries[key]

    def get(self, key: Tuple, capture: Callable[[], object]):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        self._drop_dead()
        entry = capture()
        self.captures += 1
        self._entries[key] = entry
        self._trim()
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


_CACHE = GraphCache()
_POOLS: Dict[torch.device, object] = {}
_MAX_NUMEL = [_DEFAULT_MAX_NUMEL]


def set_max_size(max_size: int) -> None:
    """Bound the number of captured graphs kept (least recently used are dropped)."""
    _CACHE.set_max_size(max_size)


def max_size() -> int:
    return _CACHE.max_size


def set_auto_max_numel(numel: int) -> None:
    """Largest state (x.numel()) for which cuda_graph="auto" captures; measure it with benchmarks/gpu_check.sh."""
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    _MAX_NUMEL[0] = numel


def auto_max_numel() -> int:
    return _MAX_NUMEL[0]


def auto_pays(numel: int) -> bool:
    """The size rule of cuda_graph="auto": graphs pay while launch overhead dominates."""
    return numel <= auto_max_numel()


def capture_count() -> int:
    """How many captures the process-wide cache has made (a re-capture shows as +1)."""
    return _CACHE.captures


def _grad_needed(model, x) -> bool:
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def should_graph(model, x, mode, check_finite: bool = False) -> bool:
    """Whether cuda_graph=`mode` captures this call. True: always (misuse raises in graphed_solve);
    "auto": only where it pays (CUDA, no grad, no check_finite, x.numel() <= auto_max_numel())."""
    if mode is True:
        return True
    if mode is False or mode is None:
        return False
    if mode != "auto":
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {mode!r}")
    return (isinstance(x, torch.Tensor) and x.device.type == "cuda" and not check_finite
            and not _grad_needed(model, x) and auto_pays(x.numel()))


def _pool(device: torch.device):
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def graphed_solve(run, model, x: torch.Tensor, grid, spec, mode=True) -> torch.Tensor:
    """`run(model, x, grid, spec)` (prg_fast.ode.api.run; grid a float Grid, spec its description)
    through a captured graph, or eagerly when `mode="auto"` judges a graph does not pay (see
    `should_graph`)."""
    if not should_graph(model, x, mode, spec.check_finite):
        return run(model, x, grid, spec)
    if x.device.type != "cuda":  # x: a tensor (prg_fast.ode.api checked it)
        raise ValueError(f"cuda_graph=True needs x on a CUDA device, got {x.device}")
    if spec.check_finite:
        raise ValueError("cuda_graph=True cannot be combined with check_finite=True (it needs a host sync every step)")
    if _grad_needed(model, x):
        raise ValueError("cuda_graph=True is for inference: call it under torch.no_grad() (or torch.inference_mode())")

    def capture():
        static_x = x.detach().clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up outside the graph (lazy init, cuDNN/cuBLAS autotuning)
                run(model, static_x, grid, spec)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=_pool(x.device)):
            static_out = run(model, static_x, grid, spec)
        return graph, static_x, static_out

    graph, static_x, static_out = _CACHE.get(cache_key(model, x, grid.points, grid.out_index, spec), capture)
    static_x.copy_(x)
    graph.replay()
    # the pool is shared, so the next replay of any graph may overwrite static_out: hand out a copy
    return static_out.clone()


def clear_cache() -> None:
    """Drop every captured graph (their memory returns to the shared pool)."""
    _CACHE.clear()
