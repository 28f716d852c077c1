"""Every private PyTorch internal prg_fast relies on, one function each: nothing else in prg_fast
touches a private torch name (python_tests/test_compat.py scans the package for it).

Each function says what it reads, the torch versions it was checked on and what happens where the
internal is missing: a fallback that stays exact (slower), or a clear error naming the internal --
never a silent change. Each has a canary in python_tests/test_compat.py that fails loudly when a
torch release changes the internal's behaviour (CI runs them on the declared floor, 2.11 and the
newest release). "Checked on torch 2.5.1-2.15.0": the canaries and the engine's tests passed on
2.5.1, 2.11.0, 2.13.0 and 2.15.0. The bottom layer: it imports nothing of prg_fast, and both
prg_fast.kernels and prg_fast.ode import it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.autograd import forward_ad
from torch.nn.utils import parametrize


def _missing(what: str, use: str) -> RuntimeError:
    return RuntimeError(
        f"torch {torch.__version__} has no {what}, which prg_fast reads to {use} (prg_fast.compat, checked on "
        "torch 2.5.1-2.15.0): use adjoint=False, or a torch version prg_fast supports"
    )


# -- tensors ------------------------------------------------------------------------------------

_HOOK_ATTRS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_HAS_HOOK_DICTS = all(hasattr(torch.Tensor, a) for a in _HOOK_ATTRS)


def tensor_hook_dicts(tensors: Sequence[torch.Tensor]) -> List[dict]:
    """The non-empty dicts autograd reads these tensors' Python hooks from (Tensor.register_hook
    and register_post_accumulate_grad_hook keep them in Tensor._backward_hooks and
    Tensor._post_accumulate_grad_hooks; autograd calls what the dict holds when it runs, so
    emptying it mutes them and refilling it restores them, in order). Checked on torch 2.5.1-2.15.0.
    Missing: an error (the adjoints could not keep a hook from running once per evaluation)."""
    if not _HAS_HOOK_DICTS:
        raise _missing("Tensor._backward_hooks / _post_accumulate_grad_hooks",
                       "run a parameter's hooks once on the adjoint's total gradient")
    return [d for t in tensors for d in (t._backward_hooks, t._post_accumulate_grad_hooks) if d]


def gradient_hooks(t: torch.Tensor) -> Optional[dict]:
    """The dict of the hooks Tensor.register_hook put on `t` (Tensor._backward_hooks; autograd calls
    what it holds, in order, on t's gradient), or None when it has none. Checked on torch 2.13.
    Missing: an error (a hook on the solver's state could not be run on its whole gradient)."""
    if not _HAS_HOOK_DICTS:
        raise _missing("Tensor._backward_hooks", "run a hook on the solver's state on its whole gradient")
    return t._backward_hooks or None


_HAS_VERSION = hasattr(torch.Tensor, "_version")


def version(t: torch.Tensor) -> Optional[int]:
    """t's version counter (Tensor._version: bumped by every in-place write), or None for a tensor
    made under torch.inference_mode, which has none. Checked on torch 2.5.1-2.15.0. Missing: an error (an
    in-place write between the forward and its reruns would go unseen)."""
    if not _HAS_VERSION:
        raise _missing("Tensor._version", "see in-place writes to what a rerun reads")
    return None if t.is_inference() else t._version


_HAS_BASE = hasattr(torch.Tensor, "_base")


def view_base(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor `t` is a view of, None when it is no view (Tensor._base). Checked on torch 2.5.1-2.15.0.
    Missing: `t` itself, read by every caller as "possibly a view" (a gradient then gets copied
    once; a graph's bytes may be over-counted, which keeps fewer graphs): exact, slower."""
    return t._base if _HAS_BASE else t


_foreach_add_ = getattr(torch, "_foreach_add_", None)


def foreach_add_(tensors: List[torch.Tensor], others: List[torch.Tensor]) -> None:
    """tensors[i] += others[i] for every i, fused (torch._foreach_add_: one call instead of a Python
    loop, ~1 ms per evaluation for a UNet's parameters). Checked on torch 2.5.1-2.15.0. Missing: the loop
    (the same sums, slower)."""
    if _foreach_add_ is not None:
        _foreach_add_(tensors, others)
        return
    for a, b in zip(tensors, others):
        a.add_(b)


# -- modules ------------------------------------------------------------------------------------

_MODULE_HOOK_ATTRS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_module_module = torch.nn.modules.module
_GLOBAL_HOOKS = [getattr(_module_module, "_global" + a, None) for a in _MODULE_HOOK_ATTRS]


def module_hooks(module: torch.nn.Module) -> list:
    """The functions hooked on `module` (register_forward_pre_hook, register_forward_hook,
    register_full_backward_pre_hook, register_full_backward_hook keep them in the dicts
    Module._forward_pre_hooks, _forward_hooks, _backward_pre_hooks, _backward_hooks), which run
    when it is called and may read tensors of their own. Checked on torch 2.13. Missing: an error
    (a tensor a hook reads could go undifferentiated)."""
    dicts = [getattr(module, a, None) for a in _MODULE_HOOK_ATTRS]
    if any(not isinstance(d, dict) for d in dicts):
        raise _missing("Module._forward_pre_hooks / _forward_hooks / _backward_pre_hooks / _backward_hooks",
                       "find the tensors a module's hooks read")
    return [h for d in dicts for h in d.values()]


def global_module_hooks() -> list:
    """The functions hooked on every module (torch.nn.modules.module.register_module_forward_hook and
    its kin keep them in module-level dicts _global_forward_hooks, ...). Checked on torch 2.13.
    Missing: an error (a tensor such a hook reads could go undifferentiated)."""
    if any(not isinstance(d, dict) for d in _GLOBAL_HOOKS):
        raise _missing("torch.nn.modules.module._global_forward_hooks (and its kin)",
                       "find the tensors global module hooks read")
    return [h for d in _GLOBAL_HOOKS for h in d.values()]


# -- autograd graphs ----------------------------------------------------------------------------

_peek_sequence_nr = getattr(getattr(torch._C, "_autograd", None), "_get_sequence_nr", None)


def sequence_nr(node) -> int:
    """The sequence number of an autograd node (Node._sequence_nr(): nodes get increasing numbers
    per thread as they are made). Checked on torch 2.5.1-2.15.0. Missing: an error (a tensor computed
    outside the model could not be told from one computed inside it)."""
    read = getattr(node, "_sequence_nr", None)
    if read is None:
        raise _missing("autograd Node._sequence_nr()", "tell tensors the model computes from ones made outside it")
    return read()


def next_sequence_nr() -> int:
    """The sequence number the next autograd node made on this thread gets: torch's own peek
    (torch._C._autograd._get_sequence_nr, ~0.1 us) where it exists, else a throwaway node's number
    plus one (~20 us, the same number). Checked on torch 2.5.1-2.15.0."""
    if _peek_sequence_nr is not None:
        return _peek_sequence_nr()
    return sequence_nr((torch.zeros((), requires_grad=True) * 1).grad_fn) + 1


_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)


def under_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, jacrev, jacfwd, ...) or a
    torch.autograd.forward_ad dual level is active (torch._C._functorch.maybe_current_level,
    forward_ad._current_level). PyTorch gives a compiled operator with a backward formula no
    forward-mode derivative -- the tangent silently comes out zero -- and functorch's grad
    transforms refuse it, so there the engine runs its pure-PyTorch reference arithmetic.
    Checked on torch 2.5.1-2.15.0. Missing: True (the reference everywhere: exact, slower)."""
    level = getattr(forward_ad, "_current_level", None)
    if _functorch_level is None or level is None:
        return True
    return _functorch_level() is not None or level >= 0


# -- parametrizations cached by torch.nn.utils.parametrize.cached() -----------------------------

_HAS_PARAMETRIZE_CACHE = hasattr(parametrize, "_cache") and hasattr(parametrize, "_cache_enabled")


def cached_parametrizations(modules: Sequence[torch.nn.Module]) -> Optional[Dict[object, torch.Tensor]]:
    """The parametrized tensors cached now by parametrize.cached() (the module-level
    parametrize._cache, switched on by _cache_enabled), keyed as parametrize keys them; None when
    caching is off or nothing is cached. There is no public API to read the cache. Checked on torch
    2.5.1-2.15.0. Missing: None when `modules` (what a velocity reaches) hold no parametrization, else an
    error (a cached tensor would be differentiated once per evaluation)."""
    if not _HAS_PARAMETRIZE_CACHE:
        if any(isinstance(m, parametrize.ParametrizationList) for m in modules):
            raise _missing("torch.nn.utils.parametrize._cache", "differentiate parametrize.cached() tensors once")
        return None
    if not parametrize._cache_enabled:
        return None
    entries = {k: v for k, v in parametrize._cache.items() if isinstance(v, torch.Tensor)}
    return entries or None


@contextmanager
def parametrizations_cached_as(entries: Dict[object, torch.Tensor]) -> Iterator[None]:
    """Inside: parametrize's caching is on and its cache holds `entries` (from
    cached_parametrizations), so a rerun reads the forward's tensors; after: caching and the cache
    as they were (parametrize.cached() empties the cache when the outermost block ends). There is
    no public API to hand a cache over. Checked on torch 2.5.1-2.15.0. Only reached where
    cached_parametrizations found entries."""
    parametrize._cache_enabled += 1
    previous = {k: parametrize._cache.get(k) for k in entries}
    parametrize._cache.update(entries)
    try:
        yield
    finally:
        parametrize._cache_enabled -= 1
        if not parametrize._cache_enabled:
            parametrize._cache = {}
        else:
            for k, v in previous.items():
                if v is None:
                    parametrize._cache.pop(k, None)
                else:
                    parametrize._cache[k] = v


# -- tracing (prg_fast.kernels) -----------------------------------------------------------------

try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor as _FunctionalTensor
    from torch._subclasses.functional_tensor import FunctionalTensorMode as _FunctionalTensorMode
except ImportError:  # pragma: no cover - a torch that moved them
    _FakeTensor = _FunctionalTensor = _FunctionalTensorMode = None


def is_traced(t: torch.Tensor) -> bool:
    """Whether `t` is a tracing stand-in (torch._subclasses' FakeTensor or FunctionalTensor: no
    data, the compiler places the kernel launch itself). Checked on torch 2.5.1-2.15.0. Missing:
    torch.compiler.is_compiling(), which holds wherever the compiler traces."""
    if _FakeTensor is None:
        return torch.compiler.is_compiling()
    return isinstance(t, (_FakeTensor, _FunctionalTensor))


def functional_tensor_mode() -> Optional[type]:
    """torch._subclasses' FunctionalTensorMode, the mode under which torch.compile and AOTAutograd
    functionalize an operator (prg_fast.kernels keeps an interpreted Triton operator opaque there).
    Checked on torch 2.5.1-2.15.0. Missing: None (nothing is registered; compiling an interpreted Triton
    kernel then fails with torch's own error)."""
    return _FunctionalTensorMode
