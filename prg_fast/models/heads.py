"""Classifier heads for PRG: what sits on top of the reversed trajectory's end state.

ClassifierHead is the head of the PRG release: adaptive average pooling of the (C, H, W) state to
at most 16x16, flatten, LayerNorm, Linear, Tanh, and a bias-free Linear to the class logits.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["ClassifierHead"]

MAX_POOL_SIZE = 16  # the release pools the 3x32x32 end state to 3x16x16 = 768 features


def _shape(in_shape) -> Tuple[int, int, int]:
    if isinstance(in_shape, torch.Size):
        in_shape = tuple(in_shape)
    ok = (isinstance(in_shape, (tuple, list)) and len(in_shape) == 3
          and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in in_shape))
    if not ok:
        raise ValueError(f"in_shape must be (channels, height, width) of positive integers, got {in_shape!r}")
    return tuple(int(s) for s in in_shape)


class ClassifierHead(nn.Module):
    """logits = Linear_no_bias(tanh(Linear(LayerNorm(flatten(pool(x))))))

    in_shape: (C, H, W) of the features it reads (for several save_at times concatenated on the
    channel dim, C is times x image channels). The pooling output is min(H, pool) x min(W, pool),
    so an 8x8 state is not pooled at all and a 32x32 one becomes 16x16. `hidden` is the width of
    the hidden layer (default: the flattened feature size, as in the release: 768 -> 768).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, *, hidden: Optional[int] = None,
                 pool: int = MAX_POOL_SIZE):
        super().__init__()
        c, h, w = _shape(in_shape)
        for name, value in (("num_classes", num_classes), ("pool", pool)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for a classifier, got {num_classes}")
        self.in_shape = (c, h, w)
        self.pooled_size = (min(h, int(pool)), min(w, int(pool)))
        features = c * self.pooled_size[0] * self.pooled_size[1]
        if hidden is None:
            hidden = features
        if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1 (or None), got {hidden!r}")
        self.num_classes, self.num_features, self.hidden = int(num_classes), features, int(hidden)
        self.config = dict(in_shape=list(self.in_shape), num_classes=self.num_classes, hidden=self.hidden,
                           pool=int(pool))
        self.pool = nn.AdaptiveAvgPool2d(self.pooled_size)
        self.norm = nn.LayerNorm(features)
        self.fc = nn.Linear(features, self.hidden)
        self.act = nn.Tanh()
        self.out = nn.Linear(self.hidden, self.num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ClassifierHead expects features of shape (B, {', '.join(map(str, self.in_shape))}), "
                             f"got {got}")
        h = self.pool(x) if self.pooled_size != self.in_shape[1:] else x
        h = self.norm(h.flatten(1).to(self.norm.weight.dtype))
        return self.out(self.act(self.fc(h)))

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, pooled={self.pooled_size}, hidden={self.hidden}, classes={self.num_classes}"
