"""Parametrizations cached around a solve (`with torch.nn.utils.parametrize.cached(): ...`): the
cached tensors are inputs of the solve, so each VJP stops at them and every rerun reads the
forward's. Why: docs/engine.md, "Inside the engine"."""
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
