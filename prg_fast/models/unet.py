"""Velocity network: the improved-diffusion / guided-diffusion UNet, called as model(t, x).

Layout and parameter names follow guided-diffusion's `UNetModel` (time_embed, input_blocks,
middle_block, output_blocks, out; ResBlock in_layers / emb_layers / out_layers / skip_connection;
AttentionBlock norm / qkv / proj_out, legacy head order), which is what torchcfm's CIFAR-10 model
and the PRG release use, so their state dicts load into the matching preset. Attention runs
through F.scaled_dot_product_attention. t in [0, 1] goes straight into a sinusoidal embedding
(max period 10000), as in torchcfm and PRG.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import PREDICTIONS, velocity_coefficients
from ..paths import PATHS

__all__ = ["UNet", "PRESETS", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (statistics of bf16/fp16 activations are too coarse)."""

    def forward(self, x):
        if x.dtype == torch.float64:  # already precise enough; float32 would mismatch the weights
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    # residual branches and the output start at zero, so the network starts as the identity
    # on its skip paths and predicts v = 0 (guided-diffusion's initialisation)
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block whose forward takes the time embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm -> SiLU -> conv, time embedding added (or scale-shift applied to the second norm),
    GroupNorm -> SiLU -> dropout -> zero-initialised conv, plus a (1x1-projected) skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, norm_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(norm_groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(norm_groups, out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual; qkv in guided-diffusion's legacy head order (heads
    outermost, then q/k/v, then channels), computed by F.scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, norm_groups: int = 32):
        super().__init__()
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels ({channels}) must be divisible by num_head_channels ({num_head_channels})")
            self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3 * H * C, T)
        length, heads = qkv.shape[-1], self.num_heads
        q, k, v = qkv.reshape(b, heads, 3 * c // heads, length).transpose(-1, -2).chunk(3, dim=-1)  # (B, H, T, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


# Presets. "cifar" is torchcfm's CIFAR-10 model (examples/images/cifar10), "prg32" the PRG
# release's 32x32 model; "tiny" is for CPU tests and the 8x8 digits; "mnist28" for 28x28 grey images
# (Fashion-MNIST, MNIST) on a CPU: 2x2 patches (so the first level is 14x14, at 16 channels, the second
# 7x7 at 32, attention only in the middle block), 0.18M parameters, sized by measurement: a 28x28 UNet
# of the same widths costs 3.4x more per evaluation on one CPU core (benchmarks/RESULTS.md)
PRESETS: Dict[str, Dict] = {
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 num_heads=2, dropout=0.0, use_scale_shift_norm=True, norm_groups=8),
    "mnist28": dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                    num_heads=2, dropout=0.0, use_scale_shift_norm=True, norm_groups=8, patch_size=2),
    "cifar": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                  num_heads=4, num_head_channels=64, dropout=0.1, use_scale_shift_norm=False),
    "prg32": dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attention_resolutions=(16, 8),
                  num_heads=4, dropout=0.0, use_scale_shift_norm=True),
}


class UNet(nn.Module):
    """UNet velocity network v(t, x): x (B, in_channels, image_size, image_size), t (B,) in [0, 1].

    With prediction="epsilon" or "v" (and prediction_path, the path it is trained on) the network's
    output is that prediction and forward returns the velocity it implies on the path
    (prg_fast.losses.velocity_coefficients); train it with prediction_weighting.

    attention_resolutions are feature-map sizes in pixels (16 means "at 16x16"); the encoder halves
    the resolution after every level but the last. `config` holds the constructor arguments, so
    UNet(**model.config) rebuilds the architecture (checkpoints store it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        model_channels: int = 128,
        out_channels: Optional[int] = None,
        num_res_blocks: int = 2,
        attention_resolutions: Iterable[int] = (16,),
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        dropout: float = 0.0,
        num_heads: int = 4,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        conv_resample: bool = True,
        norm_groups: int = 32,
        max_period: float = 10000.0,
        preset: Optional[str] = None,
        prediction: str = "velocity",
        prediction_path: Optional[str] = None,
        patch_size: int = 1,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if prediction != "velocity" and prediction_path not in PATHS:
            raise ValueError(f"prediction={prediction!r} needs prediction_path, one of {sorted(PATHS)}, got {prediction_path!r}")
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        for name, value in (("in_channels", in_channels), ("image_size", image_size),
                            ("model_channels", model_channels), ("num_res_blocks", num_res_blocks),
                            ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive integers, got {channel_mult!r}")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % (patch_size * factor):
            raise ValueError(f"image_size must be divisible by {'patch_size x ' if patch_size > 1 else ''}2^(levels-1) = "
                             f"{patch_size * factor} for channel_mult={channel_mult}, got {image_size}")
        widths = {model_channels * m for m in channel_mult}
        if any(w % norm_groups for w in widths):
            raise ValueError(f"every level width {sorted(widths)} must be divisible by norm_groups={norm_groups}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        out_channels = out_channels or in_channels
        self.config = dict(in_channels=in_channels, image_size=image_size, model_channels=model_channels,
                           out_channels=out_channels, num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), channel_mult=list(channel_mult),
                           dropout=float(dropout), num_heads=num_heads, num_head_channels=num_head_channels,
                           use_scale_shift_norm=bool(use_scale_shift_norm), conv_resample=conv_resample,
                           norm_groups=norm_groups, max_period=float(max_period), preset=preset)
        if prediction != "velocity":  # recorded only when used: older checkpoints' configs stay equal
            self.config.update(prediction=prediction, prediction_path=prediction_path)
        if patch_size != 1:  # likewise
            self.config.update(patch_size=patch_size)
        self.prediction, self.prediction_path = prediction, prediction_path
        self.in_channels, self.image_size, self.model_channels = in_channels, image_size, model_channels
        self.max_period = max_period
        # patch_size p > 1: the network runs on (p*p*C, H/p, W/p), the image's p x p patches stacked on
        # the channel dim (pixel_unshuffle; pixel_shuffle puts the output back): p*p times fewer
        # positions at the first level, which is what a CPU pays for at these widths
        self.patch_size = patch_size
        self._downsample_factor = factor * patch_size
        grid = image_size // patch_size  # the first level's feature-map size
        net_in, net_out = in_channels * patch_size ** 2, out_channels * patch_size ** 2
        attention_ds = {grid // r for r in attention_resolutions if r > 0 and grid % r == 0}
        unknown = [r for r in attention_resolutions if r <= 0 or grid % r or (grid // r) > factor]
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not feature-map sizes of this UNet "
                             f"(image_size={image_size}, patch_size={patch_size}, levels: "
                             f"{[grid >> i for i in range(len(channel_mult))]})")

        def res(ch_in, ch_out):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, norm_groups)

        def attn(ch):
            return AttentionBlock(ch, num_heads, num_head_channels, norm_groups)

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = input_ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(net_in, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(norm_groups, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(input_ch, net_out, 3, padding=1)))

    @classmethod
    def preset(cls, name: str, in_channels: int = 3, image_size: int = 32, **overrides) -> "UNet":
        """A preset architecture: "tiny" (~0.5M parameters; CPU tests, 8x8 digits), "mnist28" (0.18M;
        28x28 grey images on a CPU, 2x2 patches), "cifar"
        (torchcfm CIFAR-10, ~35.7M), "prg32" (PRG 32x32, ~52.5M). Keyword overrides replace any
        constructor argument (for example dropout=0.0)."""
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        if name == "tiny" and "attention_resolutions" not in overrides:
            # attention at the coarsest level, whatever the image size (4x4 for 8x8 digits)
            kwargs["attention_resolutions"] = (image_size // 2 ** (len(kwargs["channel_mult"]) - 1),)
        return cls(in_channels=in_channels, image_size=image_size, preset=name, **kwargs)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % self._downsample_factor or x.shape[-2] % self._downsample_factor:
            raise ValueError(f"x's height and width must be divisible by {self._downsample_factor}, got {tuple(x.shape[-2:])}")
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])  # torchdiffeq-style odeint passes a 0-dim time
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels, self.max_period).to(x.dtype))
        h, skips = (x if self.patch_size == 1 else F.pixel_unshuffle(x, self.patch_size)), []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h).type(x.dtype)
        if self.patch_size != 1:
            out = F.pixel_shuffle(out, self.patch_size)
        if self.prediction == "velocity":
            return out
        # a network trained to predict epsilon or v on a path: its velocity on that path, so every user of
        # the network (reverse, PRGClassifier, finetuning, sampling) sees a velocity by construction
        a, c = velocity_coefficients(self.prediction_path, self.prediction, t.to(x.dtype))
        shape = (-1,) + (1,) * (x.dim() - 1)
        return a.reshape(shape) * x + c.reshape(shape) * out
