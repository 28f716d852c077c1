"""Plain backprop (Backprop, adjoint=False): ordinary autograd through the solver -- the one
plain-backprop path (prg_fast.ode.integrate.solve), which the stored adjoint also takes when it
keeps every graph -- or through the reversible scheme when a coupling is given. Nothing is
discovered, stored or rerun: the graph is the solve's own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .integrate import Problem, solve
from .reversible import check_coupling, solve_reversible


@dataclass(frozen=True)
class Backprop:
    """Plain autograd through the solver (through the reversible scheme when a coupling is given)."""

    reversible_coupling: Optional[float] = None

    def __post_init__(self):
        if self.reversible_coupling is not None:
            object.__setattr__(self, "reversible_coupling", check_coupling(self.reversible_coupling))

    def run(self, problem: Problem, x: torch.Tensor) -> torch.Tensor:
        """The states at the grid's outputs, stacked, with their autograd graph (every strategy's run)."""
        if self.reversible_coupling is not None:
            return solve_reversible(problem, x, self.reversible_coupling)
        return solve(problem, x)
