"""The one stage loop behind reverse, generate and odeint, for every tableau and backend: `Problem`,
a solve as immutable data (what the call fixes, and what discovery found it reads), whose methods
are the arithmetic of one step; `Velocity`, one evaluation. Why so: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..compat import version
from .ops import Backend
from .solvers import ButcherTableau
from .step_buffers import StepBuffers

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_state(x, name: str = "x", batched: bool = True) -> None:
    """What a solve's state may be: a non-empty floating tensor with values (and a batch dimension)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if batched and x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (B, ...)), got a 0-dim tensor")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values); the solve computes values: "
                         "pass a tensor on the CPU or a GPU")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value, name: str, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        quoted = [f'"{c}"' for c in choices]
        raise ValueError(f"{name} must be {', '.join(quoted[:-1])} or {quoted[-1]}, got {value!r}")
    return value


def format_time(t) -> str:
    """A time for a message: a float, a 0-dim tensor, or per-sample times (their range)."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.numel() == 1:
            return f"{t.item():g}"
        return f"[{t.min().item():g} .. {t.max().item():g}] (per sample)"
    return f"{t:g}"


def autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    """(enabled, dtype) of torch.autocast on `device_type`; (False, None) where autocast does not
    apply. The adjoints recompute under the forward's state, and a CUDA graph is keyed by it."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


def capture_rng(device: torch.device):
    """The random generators' state (the CPU's, and the CUDA device's), ~2 us, no device sync."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def set_rng(state, device: torch.device) -> None:
    """Set the generators to a state captured by `capture_rng`."""
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


@contextmanager
def restore_rng(state, device: torch.device) -> Iterator[None]:
    """Run a block with the random state captured by `capture_rng`, then put the caller's back."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        set_rng(state, device)
        yield


@dataclass(frozen=True)
class Grid:
    """The times a solve steps through and which of its states it returns."""

    points: List[float]  # the grid's values, strictly monotone (sample 0's on a per-sample grid)
    out_index: List[int]  # grid indices whose states are returned, in output order
    times: Optional[torch.Tensor] = None  # the float64 tensor grid, (P,) or (P, B); None: floats
    # save_at on a per-sample grid: out_rows[j][b] is the grid index of output j for sample b (the
    # save times sit at different grid positions per sample); out_index is then sample 0's
    out_rows: Optional[List[List[int]]] = None
    # an adaptive solve's accepted grid (prg_fast.ode.adaptive): the times each step's stages read,
    # and per output (step, theta) of the dense output holding it, or None for the grid point out_index
    stage_times: Optional[List[List[float]]] = None
    dense: Optional[List[Optional[tuple]]] = None

    def output_points(self) -> set:
        """Grid indices whose state goes into some output."""
        if self.out_rows is None:
            return set(self.out_index)
        return {m for row in self.out_rows for m in row}

    def _rows_at(self, j: int, m: int, like: torch.Tensor) -> torch.Tensor:
        hit = torch.tensor([r == m for r in self.out_rows[j]], device=like.device)
        return hit.reshape((-1,) + (1,) * (like.dim() - 1))

    def gather_outputs(self, saved: dict) -> List[torch.Tensor]:
        """The outputs from the states at output_points(): per sample, each row from its own
        grid index."""
        if self.out_rows is None:
            return [saved[i] for i in self.out_index]
        outs = []
        for j, row in enumerate(self.out_rows):
            points = sorted(set(row))
            out = saved[points[0]]
            for m in points[1:]:
                out = torch.where(self._rows_at(j, m, out), saved[m], out)
            outs.append(out)
        return outs

    def output_cotangents(self, grad_out: torch.Tensor) -> dict:
        """grid index -> the cotangent arriving there from the outputs (an index may be output
        twice; on a per-sample grid each output's rows arrive at their own indices)."""
        arriving = {}
        for pos in range(grad_out.shape[0]):
            if self.dense is not None and self.dense[pos] is not None:
                continue  # a dense output's cotangent enters its step's stages (stored_adjoint.BackwardWalk)
            g = grad_out[pos]
            if self.out_rows is None:
                parts = [(self.out_index[pos], g)]
            else:
                parts = [(m, torch.where(self._rows_at(pos, m, g), g, torch.zeros_like(g)))
                         for m in sorted(set(self.out_rows[pos]))]
            for idx, part in parts:
                arriving[idx] = part if idx not in arriving else arriving[idx] + part
        return arriving


@dataclass(frozen=True)
class Velocity:
    """The velocity as a solve calls it: model(t, x) with t a tensor in the state dtype (shape (B,),
    or 0-dim for odeint), its output checked (a tensor shaped like x in the network's dtype; an
    input written in place is refused). `time_cache` holds one time tensor per (float time, batch,
    device): built once per solve, not per evaluation."""

    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    state_dtype: torch.dtype  # float32/float64: the solver state, every accumulation, the time
    net_dtype: torch.dtype  # what the network reads and returns
    batched_time: bool = True  # t of shape (B,) (reverse/generate, per-sample grids) or 0-dim
    time_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def time(self, t, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            # a fresh tensor every call, so the network may do with it what it likes (and a leaf
            # requiring grad stays the leaf the adjoint differentiates through)
            t = t.to(self.state_dtype)
            if self.batched_time and t.dim() == 0:
                t = t.expand(x.shape[0])
            return t.clone(memory_format=torch.contiguous_format)
        size = (x.shape[0],) if self.batched_time and x.dim() else ()
        key = (t, size, x.device)
        cached = self.time_cache.get(key)
        # a model that wrote into its t (version moved) gets a fresh one, never a corrupted one
        if cached is not None and version(cached) == 0:
            return cached
        # torch.full, not torch.tensor: no host-to-device copy (and no synchronisation) on CUDA
        value = self.time_cache[key] = torch.full(size, t, dtype=self.state_dtype, device=x.device)
        return value

    def __call__(self, t, x_net: torch.Tensor) -> torch.Tensor:
        before = version(x_net)
        k = self.func(self.time(t, x_net), x_net)
        if before is not None and version(x_net) != before:
            # The adjoint stores this very tensor as the stage input it recomputes from.
            raise RuntimeError(
                f"model modified its input x in place at t={format_time(t)}; the solver keeps that tensor "
                "(stage input) for the gradient, so the model must not write into it (use an "
                "out-of-place op, e.g. x = x + y instead of x += y)"
            )
        # Under torch.autocast the network returns the autocast dtype; the kernels accumulate in
        # float32 whatever the terms' dtype, so any floating output is fine there.
        ok = isinstance(k, torch.Tensor) and k.shape == x_net.shape and (
            k.dtype == self.net_dtype or k.is_floating_point() and autocast_state(x_net.device.type)[0])
        if not ok:
            got = f"{tuple(k.shape)} {k.dtype}" if isinstance(k, torch.Tensor) else type(k).__name__
            raise ValueError(
                f"model output must be a tensor shaped and typed like its input x "
                f"({tuple(x_net.shape)} {self.net_dtype}), got {got} at t={format_time(t)}"
            )
        return k


@dataclass(frozen=True)
class Reads:
    """What an adjoint differentiates and restores, found by prg_fast.ode.discovery (empty for plain
    backprop); `unlisted`: computed tensors the velocity holds but the solve does not take (a VJP
    that finds one read is an error). The rest: docs/engine.md, "Inside the engine": discovery."""

    params: Tuple[torch.Tensor, ...] = ()
    unlisted: Tuple[torch.Tensor, ...] = ()
    modules: Tuple[torch.nn.Module, ...] = ()
    module_state: Optional[object] = None
    reentrant: bool = False
    shared: Optional[object] = None


@dataclass(frozen=True)
class Problem:
    # what the call fixes
    velocity: Velocity
    tableau: ButcherTableau
    grid: Grid
    backend: Backend
    check_finite: bool = False
    perturb: bool = False  # torchdiffeq's perturb option (float grids): see stage_times
    adjoint_params: Optional[Tuple[torch.Tensor, ...]] = None  # the tensors passed as adjoint_params=
    # an adaptive controller (prg_fast.ode.adaptive) that picks the grid as it runs: `run` is then its
    # run, and the problem on the grid it accepted (controller.accepted) is what a backward walks
    controller: Optional[object] = None
    # what discovery finds (prg_fast.ode.discovery), for an adjoint
    reads: Reads = Reads()

    @property
    def state_dtype(self) -> torch.dtype:
        return self.velocity.state_dtype

    @property
    def net_dtype(self) -> torch.dtype:
        return self.velocity.net_dtype

    @property
    def steps(self) -> int:
        return len(self.grid.points) - 1

    @property
    def evaluations(self) -> float:
        """The solve's evaluations: steps x stages; unknown (inf) while a controller picks the grid."""
        return self.steps * self.tableau.stages if self.controller is None else math.inf

    @property
    def per_sample(self) -> bool:
        return self.grid.times is not None and self.grid.times.dim() == 2

    def on(self, grid: Grid) -> "Problem":
        """The same solve on another grid."""
        return dataclasses.replace(self, grid=grid)

    def evaluate(self, t, x_net: torch.Tensor) -> torch.Tensor:
        return self.velocity(t, x_net)

    def point(self, n: int):
        """Grid point n: a float, or a tensor (0-dim shared, (B,) per sample) in tensor mode."""
        return self.grid.points[n] if self.grid.times is None else self.grid.times[n]

    def step_at(self, n: int):
        """(t, h, stage times) of step n: its start, its size and the time each stage reads, computed
        once per step (the forward, the adjoint's backward and first evaluation all read these)."""
        t, end = self.point(n), self.point(n + 1)
        if self.grid.stage_times is None:
            return t, end - t, self.stage_times(t, end - t, end)
        # an adaptive solve's: its step sizes held, the times its forward read (tensors under time gradients)
        h, taus = self.grid.points[n + 1] - self.grid.points[n], self.grid.stage_times[n]
        return t, h, taus if self.grid.times is None else [torch.full_like(t, tau) for tau in taus]

    def stage_times(self, t, h, end) -> list:
        """The time each stage of the step from t of size h (ending at the grid point `end`) reads:
        t + c_i h, or with `perturb` one float step inside (docs/engine.md, "Inside the engine": fixed_grid)."""
        if not self.perturb:
            return [t + c * h for c in self.tableau.c]
        # one step of the dtype the network reads its time in (a float64 step vanishes in float32)
        inside = {0.0: (t, end), 1.0: (end, t)}
        return [torch.nextafter(*(torch.tensor(v, dtype=self.state_dtype) for v in inside[c])).item()
                if c in inside else t + c * h for c in self.tableau.c]

    def stages(self, x: torch.Tensor, h, taus: Sequence, evaluate: Callable, buffers=None) -> List[torch.Tensor]:
        """The one stage loop: k_i = evaluate(i, tau_i, X_i) with X_i = x + h sum_{j<i} a_ij k_j.
        Every solve runs its stages through here (the forward, the store="steps" backward, the
        reversible scheme's base step); what an evaluation is, is the caller's `evaluate`. With
        `buffers` (StepBuffers, the no-grad loop) X_i is written into a buffer it owns."""
        ks: List[torch.Tensor] = []
        for i, tau in enumerate(taus):
            k = evaluate(i, tau, self.stage_input(x, ks, i, h, buffers))
            ks.append(k if buffers is None else buffers.apart(k))
        return ks

    def stage_input(self, x: torch.Tensor, ks: List[torch.Tensor], i: int, h, buffers=None) -> torch.Tensor:
        """X_i = x + h * sum_{j<i} a_ij k_j, written in the network's dtype (h a float, or a tensor),
        into buffers' stage buffer when given (a float h)."""
        used = [j for j, a in enumerate(self.tableau.a[i]) if a != 0.0]
        if not used and x.dtype == self.net_dtype:
            return x
        terms, weights = [ks[j] for j in used], [self.tableau.a[i][j] for j in used]
        if buffers is not None and not isinstance(h, torch.Tensor):
            return self.backend.into(x, terms, [h * w for w in weights], 1.0, buffers.stage(x, self.net_dtype))
        return self.backend.weighted(x, terms, weights, h, self.net_dtype, self.state_dtype)

    def step_output(self, x: torch.Tensor, ks: List[torch.Tensor], h, buffers=None) -> torch.Tensor:
        """x + h * sum_i b_i k_i, in the state dtype (h a float, or a tensor), into buffers' state
        buffer (x itself when it is that buffer) when given (a float h)."""
        used = [i for i, b in enumerate(self.tableau.b) if b != 0.0]
        terms, weights = [ks[i] for i in used], [self.tableau.b[i] for i in used]
        if buffers is not None and not isinstance(h, torch.Tensor):
            return self.backend.into(x, terms, [h * w for w in weights], 1.0, buffers.state(x))
        return self.backend.weighted(x, terms, weights, h, self.state_dtype, self.state_dtype)

    def row_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<a, b> per sample ((B,), float64) on a per-sample grid, else over everything (0-dim)."""
        prod = a * b.to(a.dtype)
        if self.per_sample:
            return prod.reshape(prod.shape[0], -1).sum(1, dtype=torch.float64)
        return prod.sum(dtype=torch.float64)


def check_finite(p: Problem, x: torch.Tensor, n: int) -> None:
    """check_finite=True: the state after step n holds no NaN or Inf, else an error naming the step."""
    if not p.check_finite or bool(torch.isfinite(x).all()):
        return
    where = f"from t={p.grid.points[n]:g} to t={p.grid.points[n + 1]:g}"
    if p.per_sample:
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[0, 0].item()
        where = f"sample {bad} from t={p.grid.times[n, bad].item():g} to t={p.grid.times[n + 1, bad].item():g}"
    raise FloatingPointError(
        f"non-finite state (NaN or Inf) produced by step {n + 1} of {p.steps}, {where} (check_finite=True)")


def walk(p: Problem, x: torch.Tensor, first: int, last: int, stage_inputs: Optional[list] = None,
         states: Optional[list] = None, evaluator: Optional[Callable] = None) -> Tuple[torch.Tensor, dict]:
    """Steps first .. last-1 from the state x at grid point `first`: (the state at `last`, {grid
    index: state} for the output points in [first, last]). With `stage_inputs` (a list) every network
    input is appended to it, step-major; with `states` the state at the start of every step.
    `evaluator(problem, n, i, t, xi)`, when given, runs evaluation (n, i) instead of p.evaluate
    (the stored adjoint keeps some graphs, reuses a first evaluation)."""
    want = p.grid.output_points()
    saved = {first: x} if first in want else {}
    plain = stage_inputs is None and states is None and evaluator is None
    buffers = StepBuffers() if plain and p.backend.into is not None and p.grid.times is None \
        and not torch.is_grad_enabled() else None
    for n in range(first, last):
        t, h, taus = p.step_at(n)
        if states is not None:
            states.append(x)

        def evaluate(i: int, tau, xi: torch.Tensor, n: int = n) -> torch.Tensor:
            if stage_inputs is not None:
                stage_inputs.append(xi)
            return p.evaluate(tau, xi) if evaluator is None else evaluator(p, n, i, tau, xi)

        x = p.step_output(x, p.stages(x, h, taus, evaluate, buffers), h, buffers)
        check_finite(p, x, n)
        if n + 1 in want:
            saved[n + 1] = x
            if buffers is not None:
                buffers.give_away(x)
    return x, saved


def run(p: Problem, x: torch.Tensor, **walked) -> List[torch.Tensor]:
    """The states at the grid's outputs (`walk`'s keywords: what to record, which evaluator)."""
    if p.controller is not None:
        return p.controller.run(p, x, **walked)
    return p.grid.gather_outputs(walk(p, x, 0, p.steps, **walked)[1])


def solve(p: Problem, x: torch.Tensor, evaluator: Optional[Callable] = None) -> torch.Tensor:
    """The states at the grid's outputs stacked on dim 0, by ordinary autograd (or under no_grad):
    plain backprop's one path (prg_fast.ode.backprop, and the stored adjoint when it keeps every
    graph)."""
    return torch.stack(run(p, x.to(p.state_dtype), evaluator=evaluator))
