"""odeint's states: adapters that solve a scalar, complex or (nested) tuple state as one flat real
tensor, as torchdiffeq allows (`adapt`: the equivalent real-tensor solve, and the function that
turns its result back)."""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional

import torch

from .integrate import check_state


class Adapted(NamedTuple):
    func: Callable
    y0: torch.Tensor
    spec: object  # the SolveDescription (prg_fast.ode.description), adapted
    options: dict
    unwrap: Callable[[torch.Tensor], object]


def adapt(func, y0, t, spec, options: dict) -> Optional[Adapted]:
    """The real-tensor solve equivalent to odeint(func, y0, t) for a complex, tuple or 0-dim y0;
    None for a state that needs no adapter."""
    if isinstance(y0, torch.Tensor) and y0.is_complex():
        return _complex(func, y0, spec, options)
    if isinstance(y0, tuple):
        return _tuple(func, y0, t, spec, options)
    if isinstance(y0, torch.Tensor) and y0.dim() == 0 and not (isinstance(t, torch.Tensor) and t.dim() == 2):
        # a scalar state (torchdiffeq's test problems): solved as shape (1,), which every path and
        # kernel handles (the per-row combination needs a row dimension)
        return Adapted(ScalarAsVector(func), y0.reshape(1), spec, options, lambda ys: ys.reshape(ys.shape[:-1]))
    return None


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


def _complex(func, y0: torch.Tensor, spec, options: dict) -> Adapted:
    """A complex64/complex128 state, solved as its real view."""
    if y0.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"y0 must be float32, float64, float16, bfloat16, complex64 or complex128, got {y0.dtype}")
    if options.get("grid_constructor") is not None:
        ctor = options["grid_constructor"]  # called with the user's function and complex y0
        options = {**options, "grid_constructor": lambda f, y, tt: ctor(func, y0, tt)}
    real = torch.view_as_real(y0.resolve_conj())
    return Adapted(ComplexAsReal(func, y0.dtype), real, spec, options,
                   lambda ys: torch.view_as_complex(ys.contiguous()))


def tuple_leaves(y, name: str = "y0") -> List[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, tuple):
        return [leaf for i, part in enumerate(y) for leaf in tuple_leaves(part, f"{name}[{i}]")]
    raise TypeError(f"{name} must be a tensor or a (nested) tuple of tensors, got {type(y).__name__}")


def _tuple_rebuild(structure, leaves):
    """`structure`'s nesting filled with the tensors of the iterator `leaves`, in order."""
    if isinstance(structure, torch.Tensor):
        return next(leaves)
    return tuple(_tuple_rebuild(part, leaves) for part in structure)


def _tuple(func, y0: tuple, t, spec, options: dict) -> Adapted:
    """A (nested) tuple of tensors, solved as one flat state."""
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        raise ValueError("a per-sample grid t of shape (T, B) needs a tensor y0 (B, ...), not a tuple state")
    leaves = tuple_leaves(y0, "y0")
    for i, leaf in enumerate(leaves):
        if leaf.is_complex():
            raise TypeError(f"y0 component {i} is complex: complex states are solved as a single tensor y0, not in a tuple")
        check_state(leaf, f"y0 component {i}", batched=False)
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
        out_leaves = tuple_leaves(out, "func's output")
        if len(out_leaves) != len(leaves) or any(o.shape != s for o, s in zip(out_leaves, shapes)):
            raise ValueError(
                "func must return the structure of y0 (a tuple of tensors shaped like its components), got "
                f"{[tuple(o.shape) for o in out_leaves]} for {[tuple(s) for s in shapes]}"
            )
        return torch.cat([o.reshape(-1) for o in out_leaves])

    flat = torch.cat([leaf.reshape(-1) for leaf in leaves])
    return Adapted(flat_func, flat, spec, options, lambda ys: unflatten(ys, dim=1))
