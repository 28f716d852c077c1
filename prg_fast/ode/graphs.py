"""CUDA-graph replay of a whole no-grad fixed-step solve (reverse/generate with cuda_graph=True).

A fixed-step solve launches s network evaluations and s+1 small fused kernels per step; for small
batches the GPU waits on the CPU launching them. Capturing the loop once and replaying it removes
that overhead. One graph is captured per (model, shape, dtype, device, grid, method, backend) and
kept while the model lives. The graph reads the model's parameters in place, so optimizer steps
between calls are seen; anything else the model reads must keep its storage too.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import torch

_CACHE: "weakref.WeakKeyDictionary[object, Dict[Tuple, Tuple]]" = weakref.WeakKeyDictionary()


def graphed_solve(solve, model, x: torch.Tensor, grid: List[float], index: List[int], **kwargs) -> torch.Tensor:
    """Run `solve(model, x, grid, index, **kwargs)` (api's solve) through a captured graph."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        where = x.device if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cuda_graph=True needs x on a CUDA device, got {where}")
    if kwargs.get("check_finite"):
        raise ValueError("cuda_graph=True cannot be combined with check_finite=True (it needs a host sync every step)")
    params = [p for p in model.parameters()] if isinstance(model, torch.nn.Module) else []
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        raise ValueError("cuda_graph=True is for inference: call it under torch.no_grad() (or torch.inference_mode())")
    key = (tuple(x.shape), x.dtype, x.device, x.stride(), tuple(grid), tuple(index),
           str(kwargs.get("method")), kwargs.get("backend"), kwargs.get("model_dtype"),
           kwargs.get("reversible"), kwargs.get("reversible_coupling"))
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(key)
    if entry is None:
        static_x = x.detach().clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up outside the graph (lazy init, cuDNN/cuBLAS autotuning)
                solve(model, static_x, grid, index, **kwargs)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = solve(model, static_x, grid, index, **kwargs)
        entry = per_model[key] = (graph, static_x, static_out)
    graph, static_x, static_out = entry
    static_x.copy_(x)
    graph.replay()
    return static_out.clone()


def clear_cache() -> None:
    """Drop every captured graph (frees their memory pools)."""
    _CACHE.clear()
