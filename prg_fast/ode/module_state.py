"""State a velocity writes while it runs, kept as plain backprop would leave it: module buffers
(ModuleState), train/eval flags (training_modes) and its inputs written in place (ParamVersions).
Which buffers, how writes are detected, what is kept and why: docs/engine.md, "Inside the engine"."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..compat import version

Stamp = Tuple[int, int]  # (id, version) of the tensor a slot holds
COPY_LIMIT = 1 << 20  # elements: buffers up to this size are copied before the first evaluation


class BufferSlots:
    """The buffers a velocity reaches, by slot (module, buffer name): read, copied and put back."""

    def __init__(self, slots: Sequence[Tuple[torch.nn.Module, str]]):
        self.slots = list(slots)

    def _value(self, j: int) -> Optional[torch.Tensor]:
        module, name = self.slots[j]
        return getattr(module, name, None)

    def _stamp(self, j: int) -> Optional[Stamp]:
        b = self._value(j)
        return None if b is None else (id(b), version(b))

    def _name(self, j: int) -> str:
        module, name = self.slots[j]
        return f"{type(module).__name__}.{name}"

    def _load(self, indices: Sequence[int], snap: list, keep: Sequence[torch.nn.Module] = ()) -> None:
        """Put the buffers of `indices` (not those of the modules in `keep`) back to `snap`, in place
        through .data where the module still holds a tensor of the same kind (docs/engine.md, "Inside
        the engine": module_state), else by assignment."""
        kept = {id(m) for m in keep}
        with torch.no_grad():
            for j, value in zip(indices, snap):
                module, name = self.slots[j]
                if id(module) in kept:
                    continue
                cur = getattr(module, name, None)
                if value is None:
                    setattr(module, name, None)
                elif cur is not None and cur.shape == value.shape and cur.dtype == value.dtype and cur.device == value.device:
                    cur.data.copy_(value)
                else:
                    setattr(module, name, value.clone())


class ModuleState(BufferSlots):
    """The written buffers of one solve: found by the first evaluation, copied before each
    evaluation by the forward, loaded back by the backward."""

    def __init__(self, slots: Sequence[Tuple[torch.nn.Module, str]]):
        super().__init__(slots)
        self.written: List[int] = []  # indices into slots: written by the first evaluation
        self.before_first: Optional[list] = None  # small buffers' values before the first evaluation
        self._first: Optional[list] = None  # the written buffers' values before the first evaluation
        self.uncopied: Optional[str] = None  # why `first` is not there (a written buffer too large to copy)
        self._stamps: List[Optional[Stamp]] = []

    # -- the first evaluation -----------------------------------------------------------------

    def before_first_evaluation(self) -> None:
        self._stamps = [self._stamp(j) for j in range(len(self.slots))]
        with torch.no_grad():
            self.before_first = [None if b is None or b.numel() > COPY_LIMIT else b.clone()
                                 for b in map(self._value, range(len(self.slots)))]

    def restore_before_first(self) -> None:
        """Put back the buffers copied before the first evaluation, which is run again (one written
        beyond the copy limit is then refused by after_first_evaluation)."""
        copied = [j for j, value in enumerate(self.before_first or ()) if value is not None]
        self._load(copied, [self.before_first[j] for j in copied])

    def _moved(self, indices: Sequence[int]) -> List[int]:
        """Those of `indices` whose buffer is not what it was before the first evaluation: another
        tensor, a new version, or other values (one sync for all)."""
        moved, compare = [], []
        for j in indices:
            b, old = self._value(j), self.before_first[j]
            if self._stamp(j) != self._stamps[j]:
                moved.append(j)
            elif b is not None and old is not None:
                compare.append((j, b, old))
        if compare:
            device = compare[0][1].device
            with torch.no_grad():
                differs = torch.stack([torch.ne(b, old).any().to(device) for _, b, old in compare]).tolist()
            moved += [j for (j, _, _), d in zip(compare, differs) if d]
        return sorted(moved)

    def after_first_evaluation(self) -> bool:
        """True when the first evaluation wrote some buffer (then the solve must keep state)."""
        moved = self._moved(range(len(self.slots)))
        # a module's buffers are one state: one written means all are
        owners = {id(self.slots[j][0]) for j in moved}
        self.written = [j for j in range(len(self.slots)) if id(self.slots[j][0]) in owners]
        missing = [j for j in self.written if self.before_first[j] is None and self._stamps[j] is not None]
        self.uncopied = None
        if missing:
            j = missing[0]
            # refused only where the solve reruns or undoes its first evaluation (`first`): a solve
            # run as plain backprop (every graph kept, kept_graphs.EvaluationGraphs.as_backprop) does neither
            self.uncopied = (
                f"model writes its buffer {self._name(j)!r} ({self._value(j).numel()} elements) while it runs; the "
                f"adjoint keeps copies of written buffers of up to {COPY_LIMIT} elements to rerun evaluations "
                "exactly: use adjoint=False, or memory_budget=float('inf') (a solve keeping every graph reruns "
                "nothing; not with time gradients or reversible=True)"
            )
        self._first = [self.before_first[j] for j in self.written]
        return bool(self.written)

    @property
    def first(self) -> Optional[list]:
        """The written buffers' values before the first evaluation, which a rerun of it or its undoing
        loads; an error when one of them was too large to copy (`uncopied`)."""
        if self.uncopied is not None:
            raise RuntimeError(self.uncopied)
        return self._first

    def rewritten(self, saved: Callable[[torch.Tensor], bool]) -> Optional[str]:
        """After the first evaluation: the name of a written buffer that it wrote in place with its
        version moving and whose storage its graph saved (`saved`), else None: no graph can be kept
        (docs/engine.md, "Inside the engine": kept_graphs)."""
        for j in self.written:
            b, before = self._value(j), self._stamps[j]
            same_tensor = before is not None and b is not None and before[0] == id(b)
            if same_tensor and version(b) != before[1] and saved(b):
                return self._name(j)
        return None

    def snapshot(self) -> list:
        """A copy of the written buffers as they are now."""
        values = [self._value(j) for j in self.written]
        for j, b in zip(self.written, values):
            if b is not None and b.requires_grad:
                # state carried from one evaluation into the next with its graph (self.prev = y):
                # plain backprop differentiates through it, reruns from copies cannot
                raise RuntimeError(
                    f"model stores a tensor that requires grad in its buffer {self._name(j)!r} while it runs, so "
                    "later evaluations depend on earlier ones through it; the adjoint reruns evaluations from "
                    "copies and cannot differentiate that: store it detached, or use adjoint=False"
                )
        with torch.no_grad():
            return [None if b is None else b.clone() for b in values]

    def load(self, snap: list, keep: Sequence[torch.nn.Module] = ()) -> None:
        """Put the written buffers back to `snap` (those of the modules in `keep` left as they are)."""
        self._load(self.written, snap, keep)

    def untracked(self) -> Optional[str]:
        """After the forward: why reruns cannot be exact, if a buffer the first evaluation left
        alone has moved since (None if not)."""
        if self.before_first is None:
            return None
        moved = self._moved([j for j in range(len(self.slots)) if j not in self.written])
        self.before_first = None
        if not moved:
            return None
        return (
            f"model wrote its buffer {self._name(moved[0])!r} during the forward but not in its first evaluation; "
            "the adjoint reruns evaluations in the backward and keeps the state only of buffers the first "
            "evaluation writes, so it cannot reproduce this one: use adjoint=False, or memory_budget=float('inf') "
            "with a single backward (nothing is rerun), or update that buffer on every call"
        )


@contextmanager
def left_as_found(state: Optional[ModuleState]) -> Iterator[None]:
    """For a whole backward: the written buffers end as they were when it began, whatever its
    reruns loaded and however it ends (nothing without state)."""
    saved = state.snapshot() if state is not None else None
    try:
        yield
    finally:
        if state is not None:
            state.load(saved)


@contextmanager
def training_modes(modules: Sequence[torch.nn.Module], flags: Sequence[bool]) -> Iterator[None]:
    """For a whole backward: the train/eval flags of the modules a velocity reaches set to `flags`, as
    the forward ran them, and put back after it. Why: docs/engine.md, "Inside the engine": module_state."""
    changed = [(m, flag, m.training) for m, flag in zip(modules, flags) if m.training != flag]
    for m, flag, _ in changed:
        m.training = flag
    try:
        yield
    finally:
        for m, _, now in changed:
            m.training = now


class ParamVersions:
    """What happened to the solve's parameters in place (between the forward and the backward, or
    by the model during the forward), checked by the adjoints' backward. Why and how: docs/engine.md,
    "Inside the engine": module_state."""

    def __init__(self, params: Sequence[torch.Tensor], at_forward_start: Sequence[int]):
        self.params = list(params)
        self.versions = [version(q) for q in self.params]  # at the end of the forward
        self.written = [i for i, (a, b) in enumerate(zip(at_forward_start, self.versions)) if a != b]
        self.moved: List[int] = []
        self.copies: dict = {}

    def before_backward(self) -> None:
        self.moved = [i for i, (q, v) in enumerate(zip(self.params, self.versions)) if version(q) != v]
        with torch.no_grad():
            self.copies = {i: self.params[i].detach().clone() for i in self.written if i not in self.moved}

    def after_backward(self, grads: Sequence) -> None:
        params = self.params
        for i in self.moved:
            if grads[i] is not None:
                q = params[i]
                raise RuntimeError(
                    f"a tensor the velocity reads (input {i} of the solve's {len(params)} parameters, shape "
                    f"{tuple(q.shape)}) was modified by an inplace operation between the forward and the backward "
                    f"(version {self.versions[i]} -> {version(q)}): the adjoint recomputes the network from its current "
                    "tensors, so its gradient would not be the forward's. Call backward before changing the parameters "
                    "(e.g. before optimizer.step()), or use adjoint=False"
                )
        changed = [i for i, c in self.copies.items() if not torch.equal(params[i], c)]
        with torch.no_grad():
            for i in changed:
                params[i].data.copy_(self.copies[i])
        self.copies = {}
        if changed:
            i = changed[0]
            raise RuntimeError(
                f"the model writes a tensor it reads in place while it runs (input {i} of the solve's {len(params)} "
                f"parameters, shape {tuple(params[i].shape)}; e.g. nn.Embedding(max_norm=...) renormalises its weight "
                "inside its own forward), and rerunning it in the backward changed that tensor again, so the adjoint's "
                "reruns do not read what the forward read (its values are put back). Use adjoint=False, or "
                "memory_budget=float('inf') (nothing is rerun)"
            )
