"""The one integration loop behind reverse, generate and odeint, for every tableau and backend.

A `Problem` holds everything fixed for a solve; `solve` runs it with plain autograd (or under
no_grad), `prg_fast.ode.adjoint.AdjointSolve` runs it without a graph and differentiates it exactly.
All stage arithmetic goes through `problem.combine` (a fused kernel, or the reference).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

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
    # One time tensor per (time, batch, device), built once per solve rather than per evaluation.
    time_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    def time(self, t: float, x: torch.Tensor) -> torch.Tensor:
        key = (t, x.shape[0] if self.batch_time and x.dim() else None, x.device)
        cached = self.time_cache.get(key)
        # a model that wrote into its t (version moved) gets a fresh one, never a corrupted one
        if cached is not None and cached._version == 0:
            return cached
        if self.batch_time:
            value = torch.full((x.shape[0],), t, dtype=self.state_dtype, device=x.device)
        else:
            # torch.full, not torch.tensor: no host-to-device copy (and no synchronisation) on CUDA
            value = torch.full((), t, dtype=self.state_dtype, device=x.device)
        self.time_cache[key] = value
        return value

    def evaluate(self, t: float, x_net: torch.Tensor) -> torch.Tensor:
        version = x_net._version
        k = self.func(self.time(t, x_net), x_net)
        if x_net._version != version:
            # The adjoint stores this very tensor as the stage input it recomputes from.
            raise RuntimeError(
                f"model modified its input x in place at t={t:g}; the solver keeps that tensor "
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
                f"({tuple(x_net.shape)} {self.net_dtype}), got {got} at t={t:g}"
            )
        return k

    def stage_input(self, x: torch.Tensor, ks: List[torch.Tensor], i: int, h: float) -> torch.Tensor:
        """X_i = x + h * sum_{j<i} a_ij k_j, written in the network's dtype."""
        row = self.tableau.a[i]
        terms = [ks[j] for j in range(i) if row[j] != 0.0]
        coeffs = [h * row[j] for j in range(i) if row[j] != 0.0]
        if not terms and x.dtype == self.net_dtype:
            return x
        return self.combine(x, terms, coeffs, 1.0, self.net_dtype)

    def step_output(self, x: torch.Tensor, ks: List[torch.Tensor], h: float) -> torch.Tensor:
        """x + h * sum_i b_i k_i, in the state dtype."""
        b = self.tableau.b
        terms = [k for k, bi in zip(ks, b) if bi != 0.0]
        coeffs = [h * bi for bi in b if bi != 0.0]
        return self.combine(x, terms, coeffs, 1.0, self.state_dtype)

    def check(self, x: torch.Tensor, n: int) -> None:
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"non-finite state (NaN or Inf) produced by step {n + 1} of {self.steps}, "
                f"from t={self.grid[n]:g} to t={self.grid[n + 1]:g} (check_finite=True)"
            )

    def run(self, x: torch.Tensor, stage_inputs: Optional[list] = None, rng: Optional[list] = None,
            states: Optional[list] = None, evaluator: Optional[Callable] = None) -> List[torch.Tensor]:
        """States at out_index. With `stage_inputs` (a list) every network input is appended to
        it, step-major; with `rng` the random state before every evaluation is appended too, so the
        adjoint can replay dropout exactly; with `states` the state at the start of every step.
        `evaluator(problem, n, i, t, xi)`, when given, runs evaluation (n, i) instead of
        self.evaluate (the adjoint's strategies keep some graphs, reuse a first evaluation)."""
        want = set(self.out_index)
        saved = {0: x} if 0 in want else {}
        tab = self.tableau
        for n in range(self.steps):
            t, h = self.grid[n], self.grid[n + 1] - self.grid[n]
            if states is not None:
                states.append(x)
            ks: List[torch.Tensor] = []
            for i in range(tab.stages):
                xi = self.stage_input(x, ks, i, h)
                if stage_inputs is not None:
                    stage_inputs.append(xi)
                if rng is not None:
                    rng.append(capture_rng(x.device))
                if evaluator is None:
                    ks.append(self.evaluate(t + tab.c[i] * h, xi))
                else:
                    ks.append(evaluator(self, n, i, t + tab.c[i] * h, xi))
            x = self.step_output(x, ks, h)
            self.check(x, n)
            if n + 1 in want:
                saved[n + 1] = x
        return [saved[i] for i in self.out_index]


def autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    """(enabled, dtype) of torch.autocast on `device_type`; (False, None) where autocast does not
    apply. The adjoints recompute under the forward's state, and a CUDA graph is keyed by it."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


def capture_rng(device: torch.device):
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


class restore_rng:
    """Run a block with the random state captured by `capture_rng`, then put the caller's back."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device

    def __enter__(self):
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        cpu_state, cuda_state = self.state
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def solve(problem: Problem, x: torch.Tensor, evaluator: Optional[Callable] = None) -> torch.Tensor:
    """Plain solve: ordinary autograd through the loop (or none, under no_grad). Returns the
    states at problem.out_index stacked on dim 0."""
    return torch.stack(problem.run(x.to(problem.state_dtype), evaluator=evaluator))
