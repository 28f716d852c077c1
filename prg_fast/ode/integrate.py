"""The one stage loop behind reverse, generate and odeint, for every tableau and backend.

A `Problem` holds everything fixed for a solve (built once by prg_fast.ode.run); `step_at` gives a
step's times (stage times computed once per step), `stages` runs its stages, `run` the whole loop.
`solve` runs it with plain autograd (or under no_grad); the adjoints run it without a graph. The
stage arithmetic goes through `problem.backend` (prg_fast.ode.backends.Backend), which hides
whether the step size is a float (the fast path) or a tensor (time tensors: `times` holds the
grid, (P,) shared or (P, B) per sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..compat import version as _version
from .backends import Backend
from .solvers import ButcherTableau


@dataclass
class Problem:
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tableau: ButcherTableau
    grid: List[float]  # times, strictly monotone, len >= 1
    out_index: List[int]  # grid indices whose states are returned, in output order
    combine: Callable
    state_dtype: torch.dtype  # float32/float64: the solver state and every accumulation
    net_dtype: torch.dtype  # what the network reads and returns
    batch_time: bool = True  # t passed as shape (B,) (reverse/generate) or 0-dim (odeint)
    check_finite: bool = False
    params: Sequence[torch.Tensor] = field(default_factory=list)
    # time tensors: the float64 grid (P,) or (P, B) (`grid` then holds sample 0's values)
    times: Optional[torch.Tensor] = None
    combine_rows: Optional[Callable] = None
    # save_at on a per-sample grid: out_rows[j][b] is the grid index of output j for sample b (the
    # save times sit at different grid positions per sample); out_index is then sample 0's.
    out_rows: Optional[List[List[int]]] = None
    # One time tensor per (float time, batch, device), built once per solve rather than per evaluation.
    time_cache: dict = field(default_factory=dict, repr=False, compare=False)
    # the buffers of the modules the velocity reaches (module_state.ModuleState; None: no adjoint)
    module_state: Optional[object] = field(default=None, repr=False, compare=False)
    # torchdiffeq's perturb option (float grids): stages at a grid point read a time one
    # floating-point step inside their step (see stage_time)
    perturb: bool = False
    # The modules the velocity reaches (prg_fast.ode.reach), for their train/eval flags.
    modules: Sequence[torch.nn.Module] = field(default_factory=list, repr=False, compare=False)
    # found on the adjoints' first evaluation (prg_fast.ode.run.discover): a reentrant checkpoint in
    # the velocity's graph (the VJPs then go through torch.autograd.backward: prg_fast.ode.vjp), and
    # parametrized tensors cached around the solve, which the reruns read (parametrize_cache)
    reentrant: bool = False
    shared_parametrizations: Optional[object] = field(default=None, repr=False, compare=False)
    # computed tensors requiring grad the velocity holds but that are not inputs of the solve
    # (prg_fast.ode.reach.Reach.computed): an adjoint's VJP that finds one read is an error (vjp)
    unlisted: Sequence[torch.Tensor] = field(default_factory=list, repr=False, compare=False)
    # combine writing into a tensor the solve owns (stage_combine_into's signature), or None: the
    # no-grad loop then reuses its stage-input and state buffers (see StepBuffers).
    combine_into: Optional[Callable] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        # the stage arithmetic (prg_fast.ode.backends.Backend): where float and tensor steps part
        self.backend = Backend("given", self.combine, self.combine_rows)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    @property
    def per_sample(self) -> bool:
        return self.times is not None and self.times.dim() == 2

    def point(self, n: int):
        """Grid point n: a float, or a tensor (0-dim shared, (B,) per sample) in tensor mode."""
        return self.grid[n] if self.times is None else self.times[n]

    def stage_time(self, t, h, i: int, end):
        """The time stage i of the step from t of size h (ending at the grid point `end`) reads:
        t + c_i h. With `perturb` (torchdiffeq's option for forcing that jumps at grid points; float
        grids only) a stage on a grid point reads one floating-point step inside its own step: c_i = 0
        towards the step's end, c_i = 1 from the end point itself (not t + h, which may round past
        it) towards the start, so a jump at the grid point is seen from the right side."""
        c = self.tableau.c[i]
        if self.perturb and c in (0.0, 1.0):
            # one step of the dtype the network reads its time in (a float64 step vanishes in float32)
            at, towards = (t, end) if c == 0.0 else (end, t)
            dt = self.state_dtype
            return torch.nextafter(torch.tensor(at, dtype=dt), torch.tensor(towards, dtype=dt)).item()
        return t + c * h

    def step_at(self, n: int):
        """(t, h, stage times) of step n: its start, its size and the time each stage reads, computed
        once per step (the forward, the adjoint's backward and first evaluation all read these)."""
        t, end = self.point(n), self.point(n + 1)
        h = end - t
        return t, h, self.stage_times(t, h, end)

    def stage_times(self, t, h, end) -> list:
        return [self.stage_time(t, h, i, end) for i in range(self.tableau.stages)]

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

    def time(self, t, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            # a fresh tensor every call, so the network may do with it what it likes (and a leaf
            # requiring grad stays the leaf the adjoint differentiates through)
            t = t.to(self.state_dtype)
            if self.batch_time and t.dim() == 0:
                t = t.expand(x.shape[0])
            return t.clone(memory_format=torch.contiguous_format)
        batched = self.batch_time or self.per_sample
        key = (t, x.shape[0] if batched and x.dim() else None, x.device)
        cached = self.time_cache.get(key)
        # a model that wrote into its t (version moved) gets a fresh one, never a corrupted one
        if cached is not None and _version(cached) == 0:
            return cached
        if batched:
            value = torch.full((x.shape[0],), t, dtype=self.state_dtype, device=x.device)
        else:
            # torch.full, not torch.tensor: no host-to-device copy (and no synchronisation) on CUDA
            value = torch.full((), t, dtype=self.state_dtype, device=x.device)
        self.time_cache[key] = value
        return value

    def row_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<a, b> per sample ((B,), float64) on a per-sample grid, else over everything (0-dim)."""
        prod = a * b.to(a.dtype)
        if self.per_sample:
            return prod.reshape(prod.shape[0], -1).sum(1, dtype=torch.float64)
        return prod.sum(dtype=torch.float64)

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
            g = grad_out[pos]
            if self.out_rows is None:
                parts = [(self.out_index[pos], g)]
            else:
                parts = [(m, torch.where(self._rows_at(pos, m, g), g, torch.zeros_like(g)))
                         for m in sorted(set(self.out_rows[pos]))]
            for idx, part in parts:
                arriving[idx] = part if idx not in arriving else arriving[idx] + part
        return arriving

    def evaluate(self, t, x_net: torch.Tensor) -> torch.Tensor:
        version = _version(x_net)
        k = self.func(self.time(t, x_net), x_net)
        if version is not None and _version(x_net) != version:
            # The adjoint stores this very tensor as the stage input it recomputes from.
            raise RuntimeError(
                f"model modified its input x in place at t={format_time(t)}; the solver keeps that tensor "
                "(stage input) for the gradient, so the model must not write into it (use an "
                "out-of-place op, e.g. x = x + y instead of x += y)"
            )
        # Under torch.autocast the network returns the autocast dtype; the kernels accumulate in
        # float32 whatever the terms' dtype, so any floating output is fine there.
        dtype_ok = k.dtype == self.net_dtype if isinstance(k, torch.Tensor) else False
        if not dtype_ok and isinstance(k, torch.Tensor) and k.is_floating_point():
            dtype_ok = autocast_state(x_net.device.type)[0]
        if not isinstance(k, torch.Tensor) or k.shape != x_net.shape or not dtype_ok:
            got = f"{tuple(k.shape)} {k.dtype}" if isinstance(k, torch.Tensor) else type(k).__name__
            raise ValueError(
                f"model output must be a tensor shaped and typed like its input x "
                f"({tuple(x_net.shape)} {self.net_dtype}), got {got} at t={format_time(t)}"
            )
        return k

    def stage_input(self, x: torch.Tensor, ks: List[torch.Tensor], i: int, h, buffers=None) -> torch.Tensor:
        """X_i = x + h * sum_{j<i} a_ij k_j, written in the network's dtype (h a float, or a tensor),
        into buffers' stage buffer when given (a float h)."""
        used = [j for j, a in enumerate(self.tableau.a[i]) if a != 0.0]
        if not used and x.dtype == self.net_dtype:
            return x
        if buffers is not None and not isinstance(h, torch.Tensor):
            return self.combine_into(x, [ks[j] for j in used], [h * self.tableau.a[i][j] for j in used], 1.0,
                                     buffers.stage(x, self.net_dtype))
        return self.backend.weighted(x, [ks[j] for j in used], [self.tableau.a[i][j] for j in used], h,
                                     self.net_dtype, self.state_dtype)

    def step_output(self, x: torch.Tensor, ks: List[torch.Tensor], h, buffers=None) -> torch.Tensor:
        """x + h * sum_i b_i k_i, in the state dtype (h a float, or a tensor), into buffers' state
        buffer (x itself when it is that buffer) when given (a float h)."""
        used = [i for i, b in enumerate(self.tableau.b) if b != 0.0]
        if buffers is not None and not isinstance(h, torch.Tensor):
            return self.combine_into(x, [ks[i] for i in used], [h * self.tableau.b[i] for i in used], 1.0,
                                     buffers.state(x))
        return self.backend.weighted(x, [ks[i] for i in used], [self.tableau.b[i] for i in used], h,
                                     self.state_dtype, self.state_dtype)

    def check(self, x: torch.Tensor, n: int) -> None:
        if self.check_finite and not bool(torch.isfinite(x).all()):
            where = f"from t={self.grid[n]:g} to t={self.grid[n + 1]:g}"
            if self.per_sample:
                bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[0, 0].item()
                where = (f"sample {bad} from t={self.times[n, bad].item():g} "
                         f"to t={self.times[n + 1, bad].item():g}")
            raise FloatingPointError(
                f"non-finite state (NaN or Inf) produced by step {n + 1} of {self.steps}, "
                f"{where} (check_finite=True)"
            )

    def run(self, x: torch.Tensor, stage_inputs: Optional[list] = None, states: Optional[list] = None,
            evaluator: Optional[Callable] = None) -> List[torch.Tensor]:
        """States at out_index. With `stage_inputs` (a list) every network input is appended to
        it, step-major; with `states` the state at the start of every step.
        `evaluator(problem, n, i, t, xi)`, when given, runs evaluation (n, i) instead of
        self.evaluate (the adjoint's strategies keep some graphs, reuse a first evaluation)."""
        return self.gather_outputs(self.walk(x, 0, self.steps, stage_inputs, states, evaluator)[1])

    def walk(self, x: torch.Tensor, first: int, last: int, stage_inputs: Optional[list] = None,
             states: Optional[list] = None, evaluator: Optional[Callable] = None) -> Tuple[torch.Tensor, dict]:
        """Steps first .. last-1 from the state x at grid point `first` (run's loop, in pieces):
        (the state at `last`, {grid index: state} for the output points in [first, last])."""
        want = self.output_points()
        saved = {first: x} if first in want else {}
        plain = stage_inputs is None and states is None and evaluator is None
        buffers = StepBuffers() if plain and self.combine_into is not None and self.times is None \
            and not torch.is_grad_enabled() else None
        for n in range(first, last):
            t, h, taus = self.step_at(n)
            if states is not None:
                states.append(x)

            def evaluate(i: int, tau, xi: torch.Tensor, n: int = n) -> torch.Tensor:
                if stage_inputs is not None:
                    stage_inputs.append(xi)
                return self.evaluate(tau, xi) if evaluator is None else evaluator(self, n, i, tau, xi)

            x = self.step_output(x, self.stages(x, h, taus, evaluate, buffers), h, buffers)
            self.check(x, n)
            if n + 1 in want:
                saved[n + 1] = x
                if buffers is not None:
                    buffers.give_away(x)
        return x, saved


class StepBuffers:
    """The no-grad loop's outputs, written into tensors it owns instead of fresh ones: one stage
    input buffer (a stage input is dead once its evaluation returned) and one state buffer,
    updated in place step after step (the kernel reads every element before writing it). A fresh
    output of a few hundred KiB costs page faults whenever the allocator has handed the memory
    back to the system, which for a small network is a sizeable share of the solve. Nothing that
    is kept is ever overwritten: the caller's x, a saved output state (give_away), and a velocity
    that returns its input or a view of a buffer (apart copies it)."""

    def __init__(self):
        self.stage_buffer: Optional[torch.Tensor] = None
        self.state_buffer: Optional[torch.Tensor] = None

    def stage(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buf = self.stage_buffer
        if buf is None or buf.shape != like.shape or buf.dtype != dtype:
            buf = self.stage_buffer = torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        return buf

    def state(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.state_buffer:  # the caller's x, or a state given away as an output
            self.state_buffer = torch.empty_like(x, memory_format=torch.contiguous_format)
        return self.state_buffer

    def give_away(self, x: torch.Tensor) -> None:
        if x is self.state_buffer:
            self.state_buffer = None

    def apart(self, k: torch.Tensor) -> torch.Tensor:
        """k itself, or a copy when it shares memory with a buffer that will be overwritten."""
        storage = k.untyped_storage().data_ptr()
        for buf in (self.stage_buffer, self.state_buffer):
            if buf is not None and buf.untyped_storage().data_ptr() == storage:
                return k.clone()
        return k


def accumulator_dtype(q: torch.Tensor) -> torch.dtype:
    """Parameter gradients accumulate over evaluations in float32 (float64 for float64 parameters;
    complex64/complex128 for complex ones), whatever the network's own dtype."""
    if q.dtype in (torch.float64, torch.complex64, torch.complex128):
        return q.dtype
    return torch.float32


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


def solve(problem: Problem, x: torch.Tensor, evaluator: Optional[Callable] = None) -> torch.Tensor:
    """The states at problem.out_index stacked on dim 0, by ordinary autograd (or under no_grad)."""
    return torch.stack(problem.run(x.to(problem.state_dtype), evaluator=evaluator))
