"""Pieces shared by the RepFusion and GenRep commands: the student / encoder ResNets, batch view
augmentations and loading the frozen velocity network of a pretraining checkpoint. Their run
directory is prg_fast.training.rundir.RunDir, as for every other command.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..training.checkpoints import build_model, check_data_fits, load_checkpoint
from ..training.rundir import CheckpointError, checkpoint_file
from ..training.runs import check_int, check_number

# CheckpointError is the one of training.rundir, named here too for the related systems' users
__all__ = ["ResNet", "ENCODERS", "build_encoder", "ViewAugment", "load_flow", "pretrain_info",
           "CheckpointError"]


# -------------------------------------------------------------------------------------------------
# students / encoders: CIFAR-style ResNets (3x3 stem, no max-pool), global average pooling


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


# "resnet18" is the CIFAR variant used by RepFusion's students; the smaller ones are for CPU runs
ENCODERS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "resnet18": dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
    "resnet-small": dict(widths=(32, 64, 128), blocks=(1, 1, 1)),
    "resnet-tiny": dict(widths=(16, 32, 64), blocks=(1, 1, 1)),
}


class ResNet(nn.Module):
    """x (B, C, H, W) -> globally pooled features (B, widths[-1]). Stage i has blocks[i] basic
    blocks of width widths[i]; every stage after the first halves the resolution. `config` rebuilds
    it: ResNet(**net.config)."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2), arch: Optional[str] = None):
        super().__init__()
        widths, blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        check_int("in_channels", in_channels, 1)
        if not widths or len(widths) != len(blocks) or min(widths) < 1 or min(blocks) < 1:
            raise ValueError(f"widths and blocks must be equally long sequences of positive integers, got "
                             f"widths={widths}, blocks={blocks}")
        self.config = dict(in_channels=int(in_channels), widths=list(widths), blocks=list(blocks), arch=arch)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.feature_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"expected images (B, {self.config['in_channels']}, H, W), got {tuple(x.shape)}")
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def build_encoder(name: str, in_channels: int) -> ResNet:
    if name not in ENCODERS:
        raise ValueError(f"unknown student/encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ResNet(in_channels, arch=name, **ENCODERS[name])


# -------------------------------------------------------------------------------------------------
# augmentations on float batches in [-1, 1] (vectorised; one affine resample per batch)


@dataclass(frozen=True)
class ViewAugment:
    """SimCLR-style views: random resized crop (area fraction in `crop_scale`, aspect ratio in
    `ratio`), horizontal flip with probability 1/2 (`hflip`), colour jitter with probability
    `jitter_p` (brightness and contrast by factors in [1 - jitter, 1 + jitter]; saturation too for
    RGB) and, for RGB, grayscale with probability `grayscale_p`."""

    crop_scale: Tuple[float, float] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    jitter: float = 0.4
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale!r}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio!r}")
        for name in ("jitter", "jitter_p", "grayscale_p"):
            check_number(name, getattr(self, name), 0.0, 1.0)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        b, c = x.shape[:2]
        dev = x.device

        def rand(*shape):
            return torch.rand(*shape, generator=generator).to(dev)

        # random resized crop (and flip) as one affine map of the output grid into the input
        area = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * rand(b)
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * rand(b)
        r = torch.exp(log_r)
        sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
        sh = torch.sqrt(area / r).clamp(max=1.0)
        cx = (1 - sw) * (2 * rand(b) - 1)  # crop centre in [-1, 1] coordinates, inside the image
        cy = (1 - sh) * (2 * rand(b) - 1)
        flip = torch.where(rand(b) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(b, device=dev)
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = sh, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # colour: work in [0, 1]
        y = (x + 1) / 2
        if self.jitter > 0 and self.jitter_p > 0:
            on = (rand(b) < self.jitter_p).to(x.dtype)[:, None, None, None]

            def factor():
                return (1 + self.jitter * (2 * rand(b) - 1)).to(x.dtype)[:, None, None, None]

            j = y * factor()  # brightness
            mean = j.mean(dim=(1, 2, 3), keepdim=True)
            j = (j - mean) * factor() + mean  # contrast
            if c == 3:
                gray = (0.299 * j[:, 0:1] + 0.587 * j[:, 1:2] + 0.114 * j[:, 2:3])
                j = (j - gray) * factor() + gray  # saturation
            y = on * j.clamp(0, 1) + (1 - on) * y
        if c == 3 and self.grayscale_p > 0:
            on = (rand(b) < self.grayscale_p).to(x.dtype)[:, None, None, None]
            gray = (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]).expand_as(y)
            y = on * gray + (1 - on) * y
        return y * 2 - 1


# -------------------------------------------------------------------------------------------------
# the frozen velocity network


def load_flow(checkpoint: str, data, *, raw_weights: bool = False) -> Tuple[Dict[str, Any], nn.Module]:
    """(checkpoint dict, velocity network) of a pretraining checkpoint (file or run directory), with
    its EMA weights (raw_weights=False), frozen and in eval mode; checks it reads `data`'s images."""
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError(f"checkpoint must be the path of a pretraining run directory, got {checkpoint!r}")
    ckpt = load_checkpoint(checkpoint)  # FileNotFoundError / CheckpointError with a clear message
    check_data_fits(data, ckpt, checkpoint_file(checkpoint), "was pretrained on")
    return ckpt, build_model(ckpt, ema=not raw_weights).requires_grad_(False).eval()


def pretrain_info(checkpoint: str, ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """What a related system's checkpoint records about the pretraining run it learned from."""
    return {"checkpoint": os.path.abspath(checkpoint), "step": int(ckpt["step"]), "path": ckpt["path"],
            "preset": ckpt.get("preset"), "data": ckpt["data"]}
