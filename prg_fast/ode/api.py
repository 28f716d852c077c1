"""Public entry points: reverse (data -> noise), generate (noise -> data), odeint (any grid).

Time convention (DESIGN.md section 2): t = 0 is data, t = 1 is noise; the velocity network is called
model(t, x) with t of shape (B,) and returns a tensor shaped like x.

Times are floats on the fast path. A time argument that is a tensor requiring grad (under grad
mode) or holding one time per sample turns the grid into a float64 tensor built with
differentiable ops ((P,) shared, (P, B) per sample), passed to the solve as an input; see
prg_fast.ode.integrate.Problem.times.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import backends, fixed_grid
from .adjoint import AdjointSolve
from .graphs import graphed_solve
from .integrate import Problem, solve
from .reach import Reach, reachable
from .reversible import DEFAULT_COUPLING, ReversibleSolve, check_coupling, solve_reversible
from .solvers import get_tableau
from .strategies import FirstEvaluation, Strategy, check_memory_budget, check_store, first_evaluation

Time = Union[float, torch.Tensor]  # a number, a one-element tensor, or shape (B,): one time per sample
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def time_reversed(model: Callable) -> "TimeReversed":
    """Adapt a model trained with the opposite convention (torchcfm: t = 0 is noise):
    v'(t, x) = -v(1 - t, x)."""
    return TimeReversed(model)


class TimeReversed(torch.nn.Module):
    def __init__(self, model: Callable):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(t, x), got {type(model).__name__}")
        self.model = model  # registered as a submodule when it is one, so .parameters() sees it

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -self.model(1 - t, x)


# ---------------------------------------------------------------------------------------------
# argument checks: every message names the argument and what was expected


def _check_x(x, name: str = "x", batched: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if batched and x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (B, ...)), got a 0-dim tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _as_time(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number (or a one-element tensor), got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _dtypes(model, x: torch.Tensor, model_dtype: Optional[torch.dtype]) -> Tuple[torch.dtype, torch.dtype]:
    """(state dtype, network dtype). The state and every accumulation are float32 (float64 for a
    float64 x); the network reads its own dtype: its parameters' for an nn.Module, else x's."""
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    if model_dtype is None:
        model_dtype = x.dtype
        if isinstance(model, torch.nn.Module):
            for p in model.parameters():
                if p.is_floating_point():
                    model_dtype = p.dtype
                    break
    if model_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"model_dtype must be a floating dtype, got {model_dtype}")
    return state, model_dtype


def _collect_params(model, adjoint_params, reach: Optional[Reach] = None) -> List[torch.Tensor]:
    """The model's parameters, then those of every module and every leaf tensor requiring grad the
    model reaches (prg_fast.ode.reach: what it may read after its first evaluation, which graph
    discovery cannot see), then adjoint_params."""
    params: List[torch.Tensor] = []
    seen: set = set()

    def add(p: torch.Tensor) -> None:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)

    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            add(p)
    if reach is not None:
        for m in reach.modules:
            for p in m.parameters(recurse=False):
                add(p)
        for p in reach.tensors:
            add(p)
    if adjoint_params is not None:
        for i, p in enumerate(adjoint_params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"adjoint_params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            add(p)
    return params


def _save_times(save_at) -> List[float]:
    if isinstance(save_at, torch.Tensor):
        save_at = save_at.detach().flatten().tolist()
    if isinstance(save_at, (str, bytes)) or not hasattr(save_at, "__iter__"):
        raise TypeError(f"save_at must be a sequence of times, got {type(save_at).__name__}")
    times = [_as_time(s, "save_at entries") for s in save_at]
    if not times:
        raise ValueError("save_at must hold at least one time (or be None)")
    return times


def _merge_plan(t0: float, t1: float, steps: int, times: Optional[List[float]]) -> Tuple[List[float], List[int], List[int]]:
    """(grid, out index, sources): a uniform grid of `steps` steps from t0 to t1, with the save_at
    `times` inserted as extra grid points (so every saved state is an exact solver state, never an
    interpolation). sources[i] says where grid point i comes from: k < steps+1 is the uniform
    point k, steps+1+j the save time j (a tensor grid is assembled from the same plan)."""
    grid = [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]
    grid[-1] = t1
    if times is None:
        return grid, [steps], list(range(steps + 1))
    lo, hi = min(t0, t1), max(t0, t1)
    tol = 1e-9 * abs(t1 - t0)
    for s in times:
        if s < lo - tol or s > hi + tol:
            raise ValueError(f"save_at times must lie in [t0, t] = [{t0:g}, {t1:g}], got {s:g}")
    sign = 1.0 if t1 > t0 else -1.0
    # snap to an existing grid point when within rounding, else insert
    tol = max(tol, 1e-12)
    entries = [(g, k) for k, g in enumerate(grid)]
    for j, s in enumerate(times):
        if all(abs(s - g) > tol for g, _ in entries):
            entries.append((s, steps + 1 + j))
    entries.sort(key=lambda e: sign * e[0])
    grid = [g for g, _ in entries]
    index = [min(range(len(grid)), key=lambda k: abs(grid[k] - s)) for s in times]
    return grid, index, [src for _, src in entries]


def _merge_grid(t0: float, t1: float, steps: int, save_at: Optional[Sequence[float]]) -> Tuple[List[float], List[int]]:
    grid, index, _ = _merge_plan(t0, t1, steps, None if save_at is None else _save_times(save_at))
    return grid, index


def _time_arg(value, name: str, x: torch.Tensor):
    """A time argument of reverse/generate: a float (the float path), or a float64 tensor on x's
    device, 0-dim (one time that requires grad) or (B,) (one time per sample)."""
    if not isinstance(value, torch.Tensor):
        return _as_time(value, name)
    B = x.shape[0]
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a number or a floating-point tensor, got a {value.dtype} tensor")
    per_sample = value.dim() == 1 and value.shape[0] == B and B > 1
    if not per_sample and value.numel() != 1:
        raise ValueError(
            f"{name} must be a number, a one-element tensor or a tensor of shape (B,) = ({B},) (one time "
            f"per sample of x), got shape {tuple(value.shape)}"
        )
    if value.device != x.device and (per_sample or value.device.type != "cpu"):
        raise ValueError(
            f"{name} is on {value.device} but x is on {x.device}: a time tensor must be on x's device "
            "(a one-element time may also be a CPU tensor)"
        )
    finite = torch.isfinite(value.detach().reshape(-1))
    if not bool(finite.all()):
        if per_sample:
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{name} must be finite for every sample; sample {i} has {name}={value[i].item()}")
        raise ValueError(f"{name} must be a finite number, got {value.item()}")
    if per_sample or (value.requires_grad and torch.is_grad_enabled()):
        return value.reshape(B if per_sample else ()).to(device=x.device, dtype=torch.float64)
    return float(value.item())


def _check_order(lo, hi, message: str, lo_name: str, hi_name: str) -> None:
    """`hi` > `lo` (floats or time tensors), else `message`, naming the first offending sample."""
    a = lo.detach().cpu() if isinstance(lo, torch.Tensor) else torch.tensor(lo, dtype=torch.float64)
    b = hi.detach().cpu() if isinstance(hi, torch.Tensor) else torch.tensor(hi, dtype=torch.float64)
    a, b = torch.broadcast_tensors(a.double(), b.double())
    bad = ~(b > a)
    if not bool(bad.any()):
        return
    if a.dim() == 0:
        raise ValueError(f"{message}; got {lo_name}={a.item():g}, {hi_name}={b.item():g}")
    i = int(bad.nonzero()[0, 0])
    raise ValueError(f"{message} for every sample; sample {i} has {lo_name}={a[i].item():g}, {hi_name}={b[i].item():g}")


def _time_grid(start, end, steps: int, save_at, x: torch.Tensor):
    """(times, grid, index, out_rows): the grid from `start` to `end`, as floats (times None: the
    float path) or, when a time is a tensor, as a float64 tensor built with differentiable ops:
    (P,) for shared times, (P, B) per sample. `grid` holds its values (sample 0's on a per-sample
    grid); out_rows (per-sample save_at only) each output's grid index per sample."""
    save_2d = isinstance(save_at, torch.Tensor) and save_at.dim() == 2
    save_tensor = isinstance(save_at, torch.Tensor) and save_at.requires_grad and torch.is_grad_enabled()
    if not (isinstance(start, torch.Tensor) or isinstance(end, torch.Tensor) or save_tensor or save_2d):
        grid, index = _merge_grid(start, end, steps, save_at)
        return None, grid, index, None
    dev = x.device
    a = start if isinstance(start, torch.Tensor) else torch.tensor(start, dtype=torch.float64, device=dev)
    b = end if isinstance(end, torch.Tensor) else torch.tensor(end, dtype=torch.float64, device=dev)
    per_sample = a.dim() == 1 or b.dim() == 1 or save_2d
    if per_sample:
        a, b = a.expand(x.shape[0]), b.expand(x.shape[0])
    k = torch.arange(steps, dtype=torch.float64, device=dev).reshape((steps,) + (1,) * a.dim())
    # the same arithmetic as the float grid (t0 + (t1 - t0) * k / steps), last point exactly t1
    uniform = torch.cat([a + (b - a) * k / steps, b.unsqueeze(0)])
    if per_sample:
        if save_at is None:
            return uniform, uniform[:, 0].tolist(), [steps], None
        return _per_sample_save_grid(uniform, save_at, x)
    save = None if save_at is None else _save_times(save_at)
    grid, index, sources = _merge_plan(a.item(), b.item(), steps, save)
    if save is not None:
        if isinstance(save_at, torch.Tensor):
            points = save_at.reshape(-1).to(device=dev, dtype=torch.float64)
        else:
            points = torch.tensor(save, dtype=torch.float64, device=dev)
        uniform = torch.cat([uniform, points])
    times = uniform if sources == list(range(steps + 1)) else uniform[torch.tensor(sources, device=dev)]
    return times, grid, index, None


def _per_sample_save_grid(uniform: torch.Tensor, save_at, x: torch.Tensor):
    """save_at on a per-sample grid: shape (S,) (the same absolute times for every sample) or
    (S, B) (per sample). Every save time must lie in its sample's interval and is inserted into
    that sample's grid, so every sample takes steps + S steps; a save time equal to a uniform grid
    point gives a zero-length step, an exact no-op (h = 0). No snapping, unlike a shared grid."""
    B, dev = x.shape[0], x.device
    if isinstance(save_at, torch.Tensor):
        if not save_at.is_floating_point():
            raise TypeError(f"save_at must hold floating-point times, got a {save_at.dtype} tensor")
        if save_at.dim() == 2 and save_at.shape[1] != B or save_at.dim() > 2:
            raise ValueError(
                f"save_at must have shape (S,) or (S, B) = (S, {B}) (per-sample times), got {tuple(save_at.shape)}"
            )
        if save_at.device != dev:
            raise ValueError(f"save_at is on {save_at.device} but x is on {dev}: a time tensor must be on x's device")
        if not bool(torch.isfinite(save_at).all()):
            raise ValueError("save_at must hold finite times")
        points = save_at.to(torch.float64)
        if points.dim() < 2:
            points = points.reshape(-1, 1)
        if points.numel() == 0:
            raise ValueError("save_at must hold at least one time (or be None)")
        points = points.expand(points.shape[0], B)
    else:
        points = torch.tensor(_save_times(save_at), dtype=torch.float64, device=dev)[:, None].expand(-1, B)
    lo = torch.minimum(uniform[0], uniform[-1]).detach()
    hi = torch.maximum(uniform[0], uniform[-1]).detach()
    tol = 1e-9 * (hi - lo)
    outside = (points.detach() < lo - tol) | (points.detach() > hi + tol)
    if bool(outside.any()):
        j, i = (int(v) for v in outside.nonzero()[0])
        raise ValueError(
            f"save_at times must lie in [t0, t] of every sample; save_at[{j}] = {points[j, i].item():g} is outside "
            f"sample {i}'s [t0, t] = [{uniform[0, i].item():g}, {uniform[-1, i].item():g}]"
        )
    # clamp rounding-level excursions into the interval, so no step runs backwards
    points = points.clamp(lo, hi)
    merged = torch.cat([uniform, points])
    sign = 1.0 if bool((uniform[-1] >= uniform[0]).all()) else -1.0
    # stable: a save time equal to a uniform point comes after it (a zero-length step, then saved)
    order = torch.sort(sign * merged.detach(), dim=0, stable=True).indices
    times = merged.gather(0, order)
    position = torch.argsort(order, dim=0)[uniform.shape[0]:]  # (S, B): each save time's grid index
    out_rows = position.tolist()
    return times, times[:, 0].tolist(), [row[0] for row in out_rows], out_rows


def _needs_grad(x: torch.Tensor, params: List[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _discover_params(first: Optional[FirstEvaluation], params: List[torch.Tensor],
                     direct: Optional[set] = None) -> List[torch.Tensor]:
    """Everything the velocity reads that requires grad, so the adjoint differentiates it exactly:
    module parameters, tensors closed over by a plain function, modules inside wrappers such as
    time_reversed(lambda ...), the rest of a partial adjoint_params list. (What the callable holds
    but reads only later is in `params` already: _collect_params adds what prg_fast.ode.reach finds.)

    The solve's first evaluation is run with a graph (strategies.first_evaluation, under the
    caller's random state; the solve then reuses its output, so discovery costs no extra network
    evaluation) and its graph is walked: every leaf that requires grad is added. A non-leaf tensor
    requiring grad that was made outside the velocity (say W = A @ B closed over) cannot be added as
    a leaf, and differentiating through its graph once per evaluation would be wrong, so it is an
    error that says to pass it as adjoint_params (then the walk stops at its node, and
    _check_computed_inputs refuses it if its graph reaches another input)."""
    found = list(params)
    found_ids = {id(p) for p in found}
    if first is None or first.k is None or not first.k.requires_grad:
        return found
    known_nodes = {p.grad_fn for p in params if p.grad_fn is not None}
    seen, stack = set(), [first.k.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in known_nodes:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:  # AccumulateGrad: a leaf that requires grad
            if direct is not None:
                direct.add(id(leaf))  # read by the first evaluation itself, not through a computed input
            if leaf is not first.leaf and id(leaf) not in found_ids:
                found.append(leaf)
                found_ids.add(id(leaf))
            continue
        # A dtype cast made earlier is what autocast's weight cache hands back inside one autocast
        # region; it saves no tensors, so walking through it once per evaluation is exact.
        if node._sequence_nr() < first.sequence_nr and node.name() != "ToCopyBackward0":
            raise ValueError(
                f"model reads a tensor that requires grad and was computed outside it (from {node.name()}); "
                "its exact gradient needs it as an input of the solve: pass it as adjoint_params=[...] "
                "(or compute it inside the model, or use adjoint=False)"
            )
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _check_computed_inputs(params: List[torch.Tensor], explicit: set, direct: set) -> List[torch.Tensor]:
    """A tensor computed from others (adjoint_params=[W], W = A @ B) is differentiated by the solve
    and then, through its own graph, by autograd. If that graph reaches another input A of the
    solve, the solve's VJP for A would run through W too and A would be counted twice. When A was
    only found implicitly (a parameter of the model, reached by the search) and the first
    evaluation does not read it directly -- MAML-style fast weights `p - lr * g` through
    functional_call, a hypernetwork's output -- A is dropped from the solve's inputs: its gradient
    arrives through W's graph, as in plain backprop. Otherwise (A passed explicitly, or read
    directly as well) it is refused, rather than silently doubled. Returns the inputs to keep."""
    computed = [(i, p) for i, p in enumerate(params) if p.grad_fn is not None]
    if not computed:
        return params
    leaves = {id(p): i for i, p in enumerate(params) if p.grad_fn is None}
    nodes = {p.grad_fn: i for i, p in computed}
    drop: set = set()
    for i, p in computed:
        seen, stack = set(), [fn for fn, _ in p.grad_fn.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            j = leaves.get(id(var)) if var is not None else nodes.get(node)
            if j is not None:
                a = params[j]
                if id(a) in explicit or id(a) in direct or a.grad_fn is not None:
                    raise ValueError(
                        f"the solve's input {i} (shape {tuple(p.shape)}, computed by {p.grad_fn.name()}) is computed "
                        f"from its input {j} (shape {tuple(a.shape)}), which the solve also differentiates directly: "
                        "its gradient would be counted twice. Compute the tensor inside the model from what it is "
                        "made of, or use adjoint=False"
                    )
                drop.add(j)
                continue
            if var is None:
                stack.extend(fn for fn, _ in node.next_functions)
    return [p for j, p in enumerate(params) if j not in drop]


def _solve(
    func,
    x: torch.Tensor,
    grid: List[float],
    out_index: List[int],
    *,
    method,
    adjoint: bool,
    backend: str,
    adjoint_params,
    batch_time: bool,
    check_finite: bool,
    model_dtype: Optional[torch.dtype],
    preserve_rng_state: bool,
    reversible: bool = False,
    reversible_coupling: float = DEFAULT_COUPLING,
    times: Optional[torch.Tensor] = None,
    out_rows: Optional[List[List[int]]] = None,
    memory_budget: Optional[float] = None,
    store: str = "stages",
    perturb: bool = False,
) -> torch.Tensor:
    if not callable(func):
        raise TypeError(f"model must be callable as model(t, x), got {type(func).__name__}")
    tableau = get_tableau(method)
    if not isinstance(adjoint, bool):
        raise TypeError(f"adjoint must be True or False, got {adjoint!r}")
    _, combine = backends.resolve(backend, x.device)
    state_dtype, net_dtype = _dtypes(func, x, model_dtype)
    # a velocity that declares jumps at the grid points (a piecewise time map whose knots are the grid's,
    # as prg_fast.diffusion's) is read from inside each step, as with torchdiffeq's perturb (float grids)
    perturb = perturb or (times is None and getattr(func, "jumps_at_grid_points", False) is True)
    # the adjoint differentiates this call: it needs everything the velocity reads and writes
    tracked = adjoint and torch.is_grad_enabled()
    # what the velocity reaches (modules, tensors): its parameters and buffers beyond the first evaluation
    reach = reachable(func) if tracked else None
    params = _collect_params(func, adjoint_params, reach)
    problem = Problem(
        func=func,
        tableau=tableau,
        grid=grid,
        out_index=out_index,
        combine=combine,
        state_dtype=state_dtype,
        net_dtype=net_dtype,
        batch_time=batch_time,
        check_finite=check_finite,
        params=params,
        perturb=perturb,
        modules=reach.modules if reach is not None else [],
    )
    times_grad = False
    if times is not None:
        problem.times = times  # with its graph: plain backprop differentiates through it
        problem.combine_rows = backends.resolve_rows(backend, x.device)[1]
        problem.out_rows = out_rows
        times_grad = times.requires_grad and torch.is_grad_enabled()
    if not isinstance(reversible, bool):
        raise TypeError(f"reversible must be True or False, got {reversible!r}")
    if reversible and out_rows is not None:
        # the per-sample save_at grid may hold zero-length steps, which only the RK step maps to the identity
        raise ValueError(
            "reversible=True cannot be combined with save_at on per-sample times (t, t0 or save_at per sample): "
            "a zero-length step of the reversible scheme is not the identity (its coupling mixes the two states); "
            "use reversible=False, or shared times"
        )
    memory_budget, store = check_memory_budget(memory_budget), check_store(store)
    if (memory_budget is not None or store != "stages") and (reversible or not adjoint):
        raise ValueError(
            f"memory_budget={memory_budget!r} and store={store!r} choose what the stored adjoint keeps "
            "(adjoint=True, reversible=False); "
            + ("reversible=True stores nothing" if reversible else "adjoint=False keeps every graph")
            + ": leave memory_budget=None and store='stages'"
        )
    if tracked and times is not None:
        # the adjoint's Functions take the grid as an input and return its gradient; the first
        # evaluation and the forward read it without its graph
        problem.times = times.detach().requires_grad_(times_grad)
    first = None
    if tracked:
        first = first_evaluation(problem, x, params)
        direct: set = set()
        params = _discover_params(first, params, direct)
        explicit = {id(p) for p in adjoint_params} if adjoint_params is not None else set()
        problem.params = params = _check_computed_inputs(params, explicit, direct)
    if tracked and times is not None:
        problem.times = times.detach()
    differentiate = _needs_grad(x, params) or times_grad
    if reversible:
        coupling = check_coupling(reversible_coupling)
        if first is not None:
            first.discard()  # the reversible scheme runs its own evaluations: discovery costs one
        if adjoint and differentiate:
            out = ReversibleSolve.apply(problem, coupling, preserve_rng_state, times, x, *params)
        else:
            out = solve_reversible(problem, x, coupling)
    elif adjoint and differentiate:
        strategy = Strategy(preserve_rng=preserve_rng_state, memory_budget=memory_budget, store=store, first=first)
        out = AdjointSolve.apply(problem, strategy, times, x, *params)
    else:
        out = solve(problem, x, first.evaluator() if first is not None else None)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _check_graph_times(cuda_graph, names: str) -> None:
    """A captured graph replays fixed float times: time tensors (per sample, or requiring grad
    under grad mode) run eagerly with cuda_graph="auto" and are refused with cuda_graph=True."""
    if cuda_graph is True:
        raise ValueError(
            f"cuda_graph=True replays a solve on plain float times, but {names} include a tensor that is per "
            "sample or requires grad: pass numbers (under torch.no_grad()), or cuda_graph=False / 'auto'"
        )
    if cuda_graph not in (False, None, "auto"):
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")


def reverse(
    model: Callable,
    x: torch.Tensor,
    t: Time = 1.0,
    *,
    steps: int = 20,
    method: str = "rk4",
    t0: Time = 0.0,
    adjoint: bool = True,
    backend: str = "auto",
    save_at: Optional[Union[Sequence[float], torch.Tensor]] = None,
    adjoint_params: Optional[Sequence[torch.Tensor]] = None,
    check_finite: bool = False,
    model_dtype: Optional[torch.dtype] = None,
    preserve_rng_state: bool = True,
    cuda_graph: Union[bool, str] = False,
    reversible: bool = False,
    reversible_coupling: float = DEFAULT_COUPLING,
    memory_budget: Optional[float] = None,
    store: str = "stages",
) -> torch.Tensor:
    """Integrate dx/dt = model(t, x) from t0 (data end) up to t (noise end) in `steps` fixed steps.

    Returns the state at t, shaped like x; with `save_at` (times in [t0, t]) the states at those
    times stacked on dim 0 -- they are inserted into the grid, so each is an exact solver state.

    Times may be tensors. `t`, `t0` (and `save_at`) that require grad get the exact derivative of
    the discrete solve (adjoint and plain backprop alike). `t` and `t0` may have shape (B,): each
    sample integrates its own interval [t0[b], t[b]] in the same `steps` steps, and the model reads
    each sample's own time. With per-sample times `save_at` has shape (S,) (absolute times inside
    every sample's interval) or (S, B) (per sample); each is inserted into its sample's grid (a
    time on a uniform grid point gives a zero-length step, an exact no-op), and the result is
    (S, B, ...). Bad time tensors (shape, non-finite, t <= t0, device, dtype) raise an error naming
    the argument and the offending sample.
    With `adjoint=True` (default) gradients are the exact discrete adjoint of the solve at the
    memory of one network evaluation plus steps*stages stored states; `adjoint=False` uses plain
    autograd through the same solver. `backend` picks the fused kernels ("auto", "cuda", "triton",
    "cpu", "reference"). `model_dtype` overrides the dtype the network reads (default: its
    parameters'); the solver state stays float32 (float64 for float64 x). `preserve_rng_state`
    replays the random state of each evaluation in the backward (exact gradients with dropout).
    `cuda_graph=True` (CUDA, no grad) captures the loop once per shape and replays it;
    `cuda_graph="auto"` captures only where a graph pays (CUDA, no grad, states up to
    `prg_fast.ode.graphs.auto_max_numel()` elements) and runs eagerly otherwise.
    `reversible=True` solves with the algebraically reversible scheme built on `method`
    (McCallum & Foster 2024; prg_fast.ode.reversible): same order as the base tableau, 2*stages
    evaluations per step forward and 2*stages recomputed evaluations + VJPs per step backward,
    and the adjoint stores only the final state pair (memory flat in `steps`); exact gradients of
    that scheme. `reversible_coupling` is its lam in (0, 1], default 0.999 as the paper recommends
    (lam < 1 gives a nonzero stability region; lam near 1 keeps the inverse exact to rounding).

    Adjoint strategies (adjoint=True; every one gives the same exact gradients, to rounding), with
    K steps, s stages, E = one network evaluation's time, G = one evaluation's graph (activations
    autograd saves), S = one state:

    - `memory_budget=None` (default), `store="stages"`: the forward stores every stage input
      (K*s*S) and the backward recomputes every evaluation with its graph before its VJP. Time:
      forward + backward ~ backprop + K*s*E; memory: K*s*S + one G.
    - `memory_budget=B` (bytes; `float("inf")` = all): the forward keeps the graphs of the last
      floor(B / G) evaluations (the first ones the backward needs; each is freed by its VJP), and
      the backward skips their recomputation. G is measured on the solve's first evaluation by
      saved-tensor hooks (prg_fast.ode.strategies). With an unlimited budget the cost is that of
      plain backprop (memory K*s*G, as adjoint=False); with B = 0 as the default.
    - `store="steps"`: the forward stores one state per step (K*S instead of K*s*S) and the
      backward recomputes each step's stage inputs with s-1 extra evaluations without graph
      (time ~ backprop + (2s-1)*K*E). Combines with memory_budget (kept outputs are reused).
    - `reversible=True` (above): no stored states at all; 2x the evaluations.
    """
    _check_x(x)
    steps = _check_steps(steps)
    t1, t0 = _time_arg(t, "t", x), _time_arg(t0, "t0", x)
    _check_order(t0, t1, "reverse integrates from t0 up to t, so t must be > t0", "t0", "t")
    times, grid, index, out_rows = _time_grid(t0, t1, steps, save_at, x)
    kwargs = dict(method=method, adjoint=adjoint, backend=backend, adjoint_params=adjoint_params,
                  batch_time=True, check_finite=check_finite, model_dtype=model_dtype,
                  preserve_rng_state=preserve_rng_state, reversible=reversible,
                  reversible_coupling=reversible_coupling, memory_budget=memory_budget, store=store)
    if times is not None:
        _check_graph_times(cuda_graph, "t, t0")
        out = _solve(model, x, grid, index, times=times, out_rows=out_rows, **kwargs)
    elif cuda_graph:
        out = graphed_solve(_solve, model, x, grid, index, mode=cuda_graph, **kwargs)
    else:
        out = _solve(model, x, grid, index, **kwargs)
    return out[0] if save_at is None else out


def generate(
    model: Callable,
    z: torch.Tensor,
    *,
    steps: int = 20,
    method: str = "rk4",
    backend: str = "auto",
    t: Time = 1.0,
    t_end: Time = 0.0,
    adjoint: bool = True,
    check_finite: bool = False,
    model_dtype: Optional[torch.dtype] = None,
    cuda_graph: Union[bool, str] = False,
    **kwargs,
) -> torch.Tensor:
    """Integrate from the noise end t (default 1) down to t_end (default 0, data): samples.
    Differentiable like `reverse` (same keyword arguments). `t` and `t_end` may be tensors that
    require grad and/or have shape (B,) (per-sample intervals), as `reverse`'s t0 and t."""
    _check_x(z, "z")
    steps = _check_steps(steps)
    t1, t_end = _time_arg(t, "t", z), _time_arg(t_end, "t_end", z)
    _check_order(t_end, t1, "generate integrates from t down to t_end, so t must be > t_end", "t_end", "t")
    # reverse's grid over [t_end, t], walked backwards: a round trip generate(reverse(x)) visits the same
    # time points bit for bit (t_end + (t - t_end) k / steps, not t - (t - t_end) k / steps, which rounds
    # differently), so a velocity with knots on reverse's grid sees them in both directions
    times, grid, index, _ = _time_grid(t_end, t1, steps, None, z)
    grid = grid[::-1]
    times = None if times is None else times.flip(0)
    opts = dict(method=method, adjoint=adjoint, backend=backend,
                adjoint_params=kwargs.pop("adjoint_params", None), batch_time=True,
                check_finite=check_finite, model_dtype=model_dtype,
                preserve_rng_state=kwargs.pop("preserve_rng_state", True),
                reversible=kwargs.pop("reversible", False),
                reversible_coupling=kwargs.pop("reversible_coupling", DEFAULT_COUPLING),
                memory_budget=kwargs.pop("memory_budget", None), store=kwargs.pop("store", "stages"))
    if kwargs:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(kwargs)}")
    if times is not None:
        _check_graph_times(cuda_graph, "t, t_end")
        return _solve(model, z, grid, index, times=times, **opts)[0]
    if cuda_graph:
        return graphed_solve(_solve, model, z, grid, index, mode=cuda_graph, **opts)[0]
    return _solve(model, z, grid, index, **opts)[0]


def odeint(
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    method: str = "rk4",
    adjoint: bool = True,
    backend: str = "auto",
    adjoint_params: Optional[Sequence[torch.Tensor]] = None,
    check_finite: bool = False,
    model_dtype: Optional[torch.dtype] = None,
    preserve_rng_state: bool = True,
    reversible: bool = False,
    reversible_coupling: float = DEFAULT_COUPLING,
    memory_budget: Optional[float] = None,
    store: str = "stages",
    options: Optional[dict] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> torch.Tensor:
    """torchdiffeq-compatible fixed-grid solve: one step per interval of the 1-D grid `t`
    (increasing or decreasing); returns the state at every grid point stacked on dim 0.
    As in torchdiffeq, func(t, y) receives t as a 0-dim tensor. Note method="rk4" here is the
    classic rule; torchdiffeq's "rk4" is our "rk4_38". A grid that requires grad gets the exact
    derivative of the discrete solve (torchdiffeq's test suite checks this), through the adjoint
    and plain backprop alike.

    `t` may also have shape (T, B), one grid per sample (torchode-style): y0 is then (B, ...),
    func receives t of shape (B,) and the result is (T, B, ...); it may require grad too.

    `y0` may be a (nested) tuple of tensors, as in torchdiffeq: func then takes and returns that
    structure, and the result is the same structure of stacked states. The components are solved
    as one flat state (so every stage is still one fused kernel call), with exact gradients for
    each of them. `memory_budget` and `store` choose the adjoint strategy as in `reverse`.

    torchdiffeq's fixed-grid options: `options=dict(step_size=h)` or `dict(grid_constructor=fn)` steps
    along a finer grid and linearly interpolates the states at t (prg_fast.ode.fixed_grid; the same
    grid and interpolation as torchdiffeq). `rtol`/`atol` are accepted for drop-in use and ignored
    with a warning: every method here is fixed-step (torchdiffeq's fixed-grid solvers drop them too)."""
    if rtol is not None or atol is not None:
        warnings.warn(
            "odeint: rtol/atol are ignored; every method here is fixed-step (choose the grid t, or "
            "options=dict(step_size=...))", UserWarning, stacklevel=2,
        )
    options = fixed_grid.check_options(options)
    common = dict(method=method, adjoint=adjoint, backend=backend, adjoint_params=adjoint_params,
                  check_finite=check_finite, model_dtype=model_dtype, preserve_rng_state=preserve_rng_state,
                  reversible=reversible, reversible_coupling=reversible_coupling, memory_budget=memory_budget,
                  store=store, options=options)
    if isinstance(y0, torch.Tensor) and y0.is_complex():
        return _odeint_complex(func, y0, t, **common)
    if isinstance(y0, tuple):
        return _odeint_tuple(func, y0, t, **common)
    if isinstance(y0, torch.Tensor) and y0.dim() == 0 and not (isinstance(t, torch.Tensor) and t.dim() == 2):
        # a scalar state (torchdiffeq's test problems): solved as shape (1,), which every path and
        # kernel handles (the per-row combination needs a row dimension)
        ys = odeint(ScalarAsVector(func), y0.reshape(1), t, **common)
        return ys.reshape(ys.shape[:-1])
    _check_x(y0, "y0", batched=False)
    if not isinstance(t, torch.Tensor):
        if isinstance(t, (list, tuple)):
            t = torch.tensor(t, dtype=torch.float64)
        else:
            raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
    if t.dim() == 2:
        if options:
            raise ValueError("options (step_size, grid_constructor) need a 1-D grid t, not a per-sample (T, B) grid")
        return _odeint_per_sample(func, y0, t, method=method, adjoint=adjoint, backend=backend,
                                  adjoint_params=adjoint_params, check_finite=check_finite, model_dtype=model_dtype,
                                  preserve_rng_state=preserve_rng_state, reversible=reversible,
                                  reversible_coupling=reversible_coupling)
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"t must be a 1-D tensor with at least one time (or (T, B) per sample), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor of times, got {t.dtype}")
    grid = [float(v) for v in t.detach().cpu().double().tolist()]
    if not all(math.isfinite(v) for v in grid):
        raise ValueError("t must hold finite times")
    diffs = [b - a for a, b in zip(grid[:-1], grid[1:])]
    if diffs and not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    kwargs = dict(method=method, adjoint=adjoint, backend=backend, adjoint_params=adjoint_params, batch_time=False,
                  check_finite=check_finite, model_dtype=model_dtype, preserve_rng_state=preserve_rng_state,
                  reversible=reversible, reversible_coupling=reversible_coupling, memory_budget=memory_budget,
                  store=store, perturb=bool(options.get("perturb", False)))
    if kwargs["perturb"] and t.requires_grad and torch.is_grad_enabled():
        raise ValueError("options['perturb']=True moves stage times off the grid by one floating-point step; it is "
                         "for float grids: t must not require grad")
    fine = fixed_grid.solver_grid(options, func, y0, t, grid) if options else None
    if fine is not None:
        # step along the finer grid, return only the states the interpolation reads
        fine_values = fine.detach().cpu().tolist()
        needed, plan = fixed_grid.interpolation_plan(fine_values, grid)
        differentiable = fine.requires_grad and torch.is_grad_enabled()
        if kwargs["perturb"] and differentiable:
            raise ValueError("options['perturb']=True is for float grids: the grid_constructor's grid must not "
                             "require grad")
        times = fine.to(y0.device) if differentiable else None
        states = _solve(func, y0, fine_values, needed, times=times, **kwargs)
        return fixed_grid.interpolate(states, needed, plan, fine if differentiable else fine.detach(), t)
    # a grid that requires grad is the solve's tensor grid (its gradient is returned); else floats
    times = t.to(device=y0.device, dtype=torch.float64) if t.requires_grad and torch.is_grad_enabled() else None
    return _solve(func, y0, grid, list(range(len(grid))), times=times, **kwargs)


class ScalarAsVector(torch.nn.Module):
    """A velocity of a 0-dim state seen as one of shape (1,)."""

    def __init__(self, func: Callable):
        super().__init__()
        self.func = func  # a submodule when it is one, so .parameters() and the searches see it

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.func(t, y.reshape(()))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"func must return a tensor shaped like y0 (a 0-dim tensor), got {got}")
        return out.reshape(1)


class ComplexAsReal(torch.nn.Module):
    """A velocity of a complex state seen as one of its real view (..., 2): the solver's stage
    arithmetic is real-linear, so stepping the real view is stepping the complex state, and
    view_as_real/view_as_complex carry PyTorch's complex gradients through unchanged."""

    def __init__(self, func: Callable, dtype: torch.dtype):
        super().__init__()
        self.func = func  # a submodule when it is one, so .parameters() and the searches see it
        self.dtype = dtype

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.func(t, torch.view_as_complex(y))
        if not isinstance(out, torch.Tensor) or not out.is_complex() or out.shape != y.shape[:-1]:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"func must return a complex tensor shaped like y0 ({tuple(y.shape[:-1])} {self.dtype}), got {got}")
        return torch.view_as_real(out.to(self.dtype))


def _odeint_complex(func, y0: torch.Tensor, t, **kwargs) -> torch.Tensor:
    """odeint of a complex64/complex128 state (as torchdiffeq allows): solved as its real view."""
    if y0.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"y0 must be float32, float64, float16, bfloat16, complex64 or complex128, got {y0.dtype}")
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    model_dtype = kwargs.pop("model_dtype", None)
    if model_dtype is not None and model_dtype.is_complex:
        model_dtype = model_dtype.to_real()
    real = torch.view_as_real(y0.resolve_conj())
    options = kwargs.get("options")
    if options and options.get("grid_constructor") is not None:
        ctor = options["grid_constructor"]  # called with the user's function and complex y0
        kwargs["options"] = {**options, "grid_constructor": lambda f, y, tt: ctor(func, y0, tt)}
    ys = odeint(ComplexAsReal(func, y0.dtype), real, t, model_dtype=model_dtype, **kwargs)
    return torch.view_as_complex(ys.contiguous())


def _odeint_per_sample(func, y0: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """odeint on a per-sample grid t of shape (T, B): sample b of y0 (B, ...) is stepped along
    t[:, b]; func receives t of shape (B,) (each sample's time) and the result is (T, B, ...)."""
    if y0.dim() < 1 or y0.shape[0] != t.shape[1]:
        raise ValueError(
            f"a per-sample grid t of shape (T, B) = {tuple(t.shape)} needs y0 of shape (B, ...) with "
            f"B = {t.shape[1]}, got {tuple(y0.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor of times, got {t.dtype}")
    if t.shape[0] < 1:
        raise ValueError(f"t must hold at least one time per sample, got shape {tuple(t.shape)}")
    if t.device != y0.device:
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}: a per-sample grid must be on y0's device")
    values = t.detach().cpu().double()
    finite = torch.isfinite(values).all(0)
    if not bool(finite.all()):
        b = int((~finite).nonzero()[0, 0])
        raise ValueError(f"t must hold finite times for every sample; sample {b} has {values[:, b].tolist()}")
    d = values[1:] - values[:-1]
    monotone = (d > 0).all(0) | (d < 0).all(0)
    if not bool(monotone.all()):
        b = int((~monotone).nonzero()[0, 0])
        raise ValueError(
            f"t must be strictly increasing or strictly decreasing for every sample; sample {b} has {values[:, b].tolist()}"
        )
    times = t.to(torch.float64)
    return _solve(func, y0, values[:, 0].tolist(), list(range(t.shape[0])), batch_time=False, times=times, **kwargs)


def _tuple_leaves(y, name: str) -> List[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, tuple):
        return [leaf for i, part in enumerate(y) for leaf in _tuple_leaves(part, f"{name}[{i}]")]
    raise TypeError(f"{name} must be a tensor or a (nested) tuple of tensors, got {type(y).__name__}")


def _tuple_rebuild(structure, leaves):
    """`structure`'s nesting filled with the tensors of the iterator `leaves`, in order."""
    if isinstance(structure, torch.Tensor):
        return next(leaves)
    return tuple(_tuple_rebuild(part, leaves) for part in structure)


def _odeint_tuple(func, y0: tuple, t, **kwargs):
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        raise ValueError("a per-sample grid t of shape (T, B) needs a tensor y0 (B, ...), not a tuple state")
    leaves = _tuple_leaves(y0, "y0")
    for i, leaf in enumerate(leaves):
        if leaf.is_complex():
            raise TypeError(f"y0 component {i} is complex: complex states are solved as a single tensor y0, not in a tuple")
        _check_x(leaf, f"y0 component {i}", batched=False)
        if leaf.dtype != leaves[0].dtype or leaf.device != leaves[0].device:
            raise TypeError(
                f"y0's components must share one dtype and device: component 0 is {leaves[0].dtype} on "
                f"{leaves[0].device}, component {i} is {leaf.dtype} on {leaf.device}"
            )
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.numel() for leaf in leaves]

    def unflatten(flat: torch.Tensor, dim: int = 0):
        parts = flat.split(sizes, dim=dim)
        return _tuple_rebuild(y0, iter(p.reshape(tuple(flat.shape[:dim]) + tuple(shape)) for p, shape in zip(parts, shapes)))

    def flat_func(tt, y_flat):
        out = func(tt, unflatten(y_flat))
        out_leaves = _tuple_leaves(out, "func's output")
        if len(out_leaves) != len(leaves) or any(o.shape != s for o, s in zip(out_leaves, shapes)):
            raise ValueError(
                "func must return the structure of y0 (a tuple of tensors shaped like its components), got "
                f"{[tuple(o.shape) for o in out_leaves]} for {[tuple(s) for s in shapes]}"
            )
        return torch.cat([o.reshape(-1) for o in out_leaves])

    ys = odeint(flat_func, torch.cat([leaf.reshape(-1) for leaf in leaves]), t, **kwargs)
    return unflatten(ys, dim=1)
