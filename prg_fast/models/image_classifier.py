"""A small image classifier on pixels (not on a reversed trajectory): three convolutions with SiLU
(smooth, so its log-probabilities give useful gradients to the images it reads), global average
pooling and a linear layer. The reward of `prg-fast reward --reward class:N` is its log-probability
of class N; `ImageClassifier(**net.config)` rebuilds it."""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """x (B, C, H, W) -> logits (B, num_classes): conv 3x3 (width) -> conv 3x3 stride 2 (2 width)
    -> conv 3x3 stride 2 (2 width), SiLU after each, mean over positions, Linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        for name, value, lo in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        self.config = dict(in_channels=int(in_channels), num_classes=int(num_classes), width=int(width))
        w = int(width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU())
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"expected images (B, {self.config['in_channels']}, H, W), got {tuple(x.shape)}")
        return self.fc(self.features(x).mean(dim=(2, 3)))
