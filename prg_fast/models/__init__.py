"""Networks for PRG: velocity networks (UNet presets) and classifier heads.

Any nn.Module called as model(t, x) works as a velocity network everywhere in prg_fast.
"""
from .heads import ClassifierHead
from .unet import PRESETS, UNet, timestep_embedding

__all__ = ["UNet", "PRESETS", "timestep_embedding", "ClassifierHead"]
