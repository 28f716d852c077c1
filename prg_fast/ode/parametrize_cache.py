"""Parametrizations cached around a solve (`with torch.nn.utils.parametrize.cached(): ...`).

Under parametrize.cached() a parametrized tensor (weight_norm's, spectral_norm's, orthogonal's
weight) is computed once, on its first access, and every later access returns that same tensor
with its graph. Plain backprop then differentiates the velocity's evaluations into it and its
graph once, on the total. The adjoints differentiate each evaluation on its own, so a VJP that ran
on through the shared tensor's graph would consume it ("backward through the graph a second
time") and count it once per evaluation; and a rerun after the block has ended would compute a
fresh tensor (spectral_norm: another power iteration) instead of the forward's.

So the cached tensors the first evaluation finds are treated as inputs of the solve
(`SharedParametrizations.tensors`): each VJP stops at them, the solve returns their summed
gradient and autograd runs their own graph once, as in plain backprop (the originals they are
computed from are then reached only through them: discovery drops them from the solve's inputs). And the
backward's reruns read exactly those tensors (`SharedParametrizations.kept`), whether the backward
runs inside the block or after it.

The cache itself is torch.nn.utils.parametrize's module-level one, which only prg_fast.compat reads
and writes: there is no public API to hand a cache to a rerun.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch.nn.utils import parametrize

from ..compat import cached_parametrizations, parametrizations_cached_as


class SharedParametrizations:
    def __init__(self, entries: Dict[object, torch.Tensor]):
        self.entries = entries

    @classmethod
    def of_now(cls, modules: Sequence[torch.nn.Module]) -> Optional["SharedParametrizations"]:
        """After the solve's first evaluation: every cached parametrized tensor (the cache is keyed
        by the module a parametrization was registered on, which a deep copy still shares), None
        when caching is off or nothing is cached."""
        entries = cached_parametrizations(modules)
        return cls(entries) if entries else None

    def tensors(self) -> List[torch.Tensor]:
        """The cached tensors that carry a graph: inputs of the solve."""
        return [v for v in self.entries.values() if v.requires_grad]

    @staticmethod
    def computing_modules(modules: Sequence[torch.nn.Module]) -> List[torch.nn.Module]:
        """The parametrization modules among `modules` (what computes a cached tensor, and writes
        spectral_norm's power-iteration vectors once per cache, not once per evaluation)."""
        lists = [m for m in modules if isinstance(m, parametrize.ParametrizationList)]
        return [sub for m in lists for sub in m.modules()]

    def kept(self):
        """Inside: caching is on and the cache holds the forward's tensors; after: as it was."""
        return parametrizations_cached_as(self.entries)
