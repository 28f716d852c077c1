"""PRGClassifier: a pretrained flow run backwards (data -> noise) as the feature extractor, and a
classifier head on its end state (PRG, arXiv 2412.01787).

    clf = PRGClassifier(flow, ClassifierHead((1, 8, 8), 10), t=1.0, steps=20, method="euler")
    logits = clf(x)                      # reverse(flow, x, t, t0=t0, ...) -> head
    loss = F.cross_entropy(logits, y)    # backward goes through prg_fast's exact adjoint

With `save_at=(t_1, ..., t_S)` the states at those times are concatenated on the channel dimension
(a feature hierarchy), so the head reads S x C channels; `PRGClassifier.build` sizes the head.

Learning where to read (`learn_t=True`, optionally `learn_t0=True`): the segment's ends become
parameters trained with the flow and the head, through the exact time gradient of the solve. They
are kept in 0 <= t0 < t <= 1 by construction, with s(r) = sigmoid(r) and raw parameters r:

    learn_t only:    t  = t0 + (1 - t0) s(t_raw)              (t0 fixed)
    learn_t0 only:   t0 = t s(t0_raw)                         (t fixed)
    both:            t0 = s(t0_raw),  t = t0 + (1 - t0) s(t_raw)

A sigmoid never reaches its ends, so a starting fraction of 0 or 1 (t = 1, t0 = 0, the defaults)
starts at EDGE = 1e-3 inside the range instead (t = 0.999 for t0 = 0). `clf.t`, `clf.t0` read the
current values as floats; `clf.segment()` gives them as tensors (with their graph).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .ode import reverse
from .ode.solvers import get_tableau
from .ode.api import check_unit_times

__all__ = ["PRGClassifier", "feature_shape", "check_segment", "parse_time", "parse_times"]

EDGE = 1e-3  # how far inside (0, 1) a learned segment's starting fraction is put (sigmoid's range is open)


def _logit(fraction: float) -> float:
    u = min(max(fraction, EDGE), 1.0 - EDGE)
    return math.log(u / (1.0 - u))


def parse_time(value, name: str) -> float:
    """One time (a number or a one-element tensor) as a float in [0, 1], else a ValueError naming
    `name`. With parse_times the one parser of times above the engine: the segment, the trainers'
    time fields and the command line use them; the range is the engine's check_unit_times."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    check_unit_times(**{name: value})
    return float(value)


def parse_times(value, name: str = "save_at") -> Optional[List[float]]:
    """None, a sequence (or tensor) of times, or comma-separated text such as "0.5,1.0" -> a list of
    floats in [0, 1] (or None); see parse_time."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, str):
        try:
            value = [float(s) for s in value.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated times such as 0.5,1.0, got {value!r}") from None
    if isinstance(value, bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be None or a sequence of times, got {type(value).__name__}")
    return [parse_time(s, f"{name} entries") for s in value]


def check_segment(t0, t, save_at=None, *, learned: bool = False) -> Tuple[float, float, Optional[Tuple[float, ...]]]:
    """The one check of a trajectory segment, for PRGClassifier, finetune and extract alike:
    (t0, t, save_at) as floats in [0, 1] (parse_time, parse_times) with t0 < t and every save_at
    time in [t0, t]; a learned segment (learned=True) has no save_at."""
    t, t0 = parse_time(t, "t"), parse_time(t0, "t0")
    times = parse_times(save_at)
    if not t > t0:
        raise ValueError(f"the trajectory segment must run forward in time: need t0 < t, got t0={t0:g}, t={t:g}")
    if times is not None and not times:
        raise ValueError("save_at must hold at least one time (or be None)")
    for s in times or ():
        if not t0 <= s <= t:
            raise ValueError(f"save_at times must lie in [t0, t] = [{t0:g}, {t:g}], got {s:g}")
    if learned and times is not None:
        raise ValueError("learn_t/learn_t0 cannot be combined with save_at (fixed times in a moving segment)")
    return t0, t, None if times is None else tuple(times)


def feature_shape(image_shape: Sequence[int], save_at: Optional[Sequence[float]] = None) -> Tuple[int, int, int]:
    """(C, H, W) of the features PRGClassifier hands its head for images of `image_shape`."""
    c, h, w = (int(s) for s in image_shape)
    return (c * (len(save_at) if save_at is not None else 1), h, w)


class PRGClassifier(nn.Module):
    """head(reverse(flow_model, x, t, t0=t0, steps=steps, method=method)).

    flow_model: a velocity network called model(t, x) (any nn.Module, for example a UNet preset).
    head:       maps the features (B, C', H, W) to logits (B, classes), e.g. ClassifierHead.
    t0, t:      the trajectory segment, t0 < t (0 = data, 1 = noise); the input is the state at t0.
    steps, method: the fixed-step solver (prg_fast.SOLVERS); re-evaluate with another count by
                setting `.steps` (the paper trains with one count and evaluates with others).
    save_at:    optional times in [t0, t]; the states there are concatenated on the channel dim.
    adjoint:    True (default) trains through the exact discrete adjoint, memory flat in steps;
                False backpropagates through the solver (same gradients, memory grows with steps).
    learn_t, learn_t0: learn the end time t (and the start t0) with the rest (module docstring:
                the parametrisation keeping 0 <= t0 < t <= 1); not with save_at.
    Extra keyword arguments (backend, model_dtype, memory_budget, ...) go to prg_fast.reverse; its
    memory_budget="auto" (the default) keeps the graphs that fit in half the free memory.
    """

    def __init__(self, flow_model: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], t: float = 1.0,
                 t0: float = 0.0, *, steps: int = 20, method: str = "euler",
                 save_at: Optional[Sequence[float]] = None, adjoint: bool = True, learn_t: bool = False,
                 learn_t0: bool = False, **reverse_kwargs):
        super().__init__()
        if not callable(flow_model):
            raise TypeError(f"flow_model must be callable as model(t, x), got {type(flow_model).__name__}")
        if not callable(head):
            raise TypeError(f"head must be callable on the features, got {type(head).__name__}")
        self.flow = flow_model
        self.head = head
        for name, flag in (("learn_t", learn_t), ("learn_t0", learn_t0)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        t0, t, save_at = check_segment(t0, t, save_at, learned=learn_t or learn_t0)
        self.learn_t, self.learn_t0 = learn_t, learn_t0
        # fixed ends stay floats; learned ones are raw parameters (see the module docstring)
        self._t, self._t0 = t, t0
        if learn_t0:
            self.t0_raw = nn.Parameter(torch.tensor(_logit(t0 if learn_t else t0 / t)))
        if learn_t:
            self.t_raw = nn.Parameter(torch.tensor(_logit((t - t0) / (1.0 - t0))))
        self.save_at = save_at
        self.steps = steps
        self.method = method
        self.adjoint = adjoint
        self.reverse_kwargs = dict(reverse_kwargs)

    def segment(self):
        """(t0, t): floats where fixed, tensors (with their graph) where learned."""
        t0 = self._t0
        if self.learn_t0:
            s0 = torch.sigmoid(self.t0_raw)
            t0 = s0 if self.learn_t else self._t * s0
        t = self._t
        if self.learn_t:
            t = t0 + (1 - t0) * torch.sigmoid(self.t_raw)
        return t0, t

    @property
    def t(self) -> float:
        """The end time (the current value when learned)."""
        return float(self.segment()[1].detach()) if self.learn_t else self._t

    @property
    def t0(self) -> float:
        """The start time (the current value when learned)."""
        return float(self.segment()[0].detach()) if self.learn_t0 else self._t0

    @t.setter
    def t(self, value: float) -> None:
        self._set_segment(self.t0, parse_time(value, "t"))

    @t0.setter
    def t0(self, value: float) -> None:
        self._set_segment(parse_time(value, "t0"), self.t)

    def _set_segment(self, t0: float, t: float) -> None:
        """Move the segment (learned ends restart from the new values)."""
        check_segment(t0, t, self.save_at)
        if (self.learn_t or self.learn_t0) and not 0.0 <= t0 < t <= 1.0:
            raise ValueError(f"a learned segment lives in 0 <= t0 < t <= 1; got t0={t0:g}, t={t:g}")
        self._t, self._t0 = t, t0
        with torch.no_grad():
            if self.learn_t0:
                self.t0_raw.fill_(_logit(t0 if self.learn_t else t0 / t))
            if self.learn_t:
                self.t_raw.fill_(_logit((t - t0) / (1.0 - t0)))

    # properties validate on assignment, so a bad evaluation step count fails where it is set
    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"steps must be an integer >= 1, got {value!r}")
        self._steps = int(value)

    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        get_tableau(value)  # raises with the list of methods
        self._method = value

    @classmethod
    def build(cls, flow_model: nn.Module, image_shape: Sequence[int], num_classes: int, t: float = 1.0,
              t0: float = 0.0, *, save_at: Optional[Sequence[float]] = None, hidden: Optional[int] = None,
              **kwargs) -> "PRGClassifier":
        """A PRGClassifier with a fresh ClassifierHead sized for images of `image_shape` (C, H, W)."""
        from .models.heads import ClassifierHead

        head = ClassifierHead(feature_shape(image_shape, save_at), num_classes, hidden=hidden)
        return cls(flow_model, head, t=t, t0=t0, save_at=save_at, **kwargs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The reversed state at t (B, C, H, W), or the save_at states concatenated (B, S*C, H, W)."""
        t0, t = self.segment()
        z = reverse(self.flow, x, t, t0=t0, steps=self.steps, method=self.method, adjoint=self.adjoint,
                    save_at=self.save_at, **self.reverse_kwargs)
        if self.save_at is not None:  # (S, B, C, ...) -> (B, S*C, ...)
            z = z.transpose(0, 1).reshape(z.shape[1], z.shape[0] * z.shape[2], *z.shape[3:])
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        seg = f"t0={self.t0:g}, t={self.t:g}, steps={self.steps}, method={self.method!r}"
        if self.learn_t or self.learn_t0:
            seg += f", learn_t={self.learn_t}, learn_t0={self.learn_t0}"
        return seg + (f", save_at={list(self.save_at)}" if self.save_at is not None else "") + f", adjoint={self.adjoint}"
