"""A small low-rank adapter (LoRA, Hu et al. 2021, arXiv 2106.09685) for any network: each Linear,
Conv1d and Conv2d (groups 1) becomes base(x) + (alpha / rank) up(down(x)), the base frozen, `down`
of rank r with the base layer's kernel, stride and padding, `up` a 1x1 (Linear: r -> out) initialised
to zero, so the adapted network starts as the base one. peft is not needed (a peft-wrapped network
also trains through prg_fast: everything that requires grad is trained).

    names = add_lora(model, rank=4)        # in place; returns the adapted layers' names
    with lora_disabled(model): ...          # the base network (the pretrained reference)
    merged_state_dict(model)                # the base architecture's state_dict, adapters folded in
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

__all__ = ["LoRA", "add_lora", "lora_disabled", "merged_state_dict", "lora_layers"]

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LoRA(nn.Module):
    """base(x) + scale * up(down(x)), scale = alpha / rank; base's parameters frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: Optional[float] = None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if isinstance(base, nn.Linear):
            down = nn.Linear(base.in_features, rank, bias=False)
            up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)) and _plain_conv(base):
            conv = type(base)
            down = conv(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                        dilation=base.dilation, bias=False)
            up = conv(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts Linear, Conv1d and Conv2d layers (groups 1, zero padding), got {base!r}")
        down.to(base.weight), up.to(base.weight)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)
        self.base, self.down, self.up = base.requires_grad_(False), down, up
        self.rank, self.scale = int(rank), alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.scale * self.up(self.down(x))

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the low-rank update added: W + scale * up @ down (per kernel tap)."""
        up = self.up.weight.reshape(self.up.weight.shape[0], self.rank)
        delta = torch.einsum("or,ri...->oi...", up, self.down.weight)
        return self.base.weight + self.scale * delta


def _plain_conv(conv) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def add_lora(model: nn.Module, rank: int = 4, alpha: Optional[float] = None) -> List[str]:
    """Freeze every parameter of `model` and wrap each adaptable layer in a LoRA of `rank` (in
    place): afterwards only the adapters' down/up weights require grad. The adapted layers' names."""
    model.requires_grad_(False)
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ADAPTABLE) and not isinstance(module, LoRA) and (
                    not isinstance(child, (nn.Conv1d, nn.Conv2d)) or _plain_conv(child)):
                setattr(module, child_name, LoRA(child, rank, alpha))
                names.append(f"{name}.{child_name}" if name else child_name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear / Conv1d / Conv2d layer (groups 1) to adapt")
    return names


def lora_layers(model: nn.Module) -> Iterator[LoRA]:
    return (m for m in model.modules() if isinstance(m, LoRA))


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base network inside the block: every adapter of `model` off, then back on (also on an
    error). Nothing is copied."""
    layers = list(lora_layers(model))
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict of the network without adapters (its own keys), each adapted layer's weight
    replaced by the merged one: loads into the base architecture."""
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, LoRA)}
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in adapters if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1:]
        if rest == "base.weight":
            out[f"{prefix}.weight"] = adapters[prefix].merged_weight().detach().clone()
        elif rest.startswith("base."):
            out[f"{prefix}.{rest[len('base.'):]}"] = value
    return out
