"""Networks for PRG: velocity networks (UNet presets), classifier heads, a small image classifier
(the reward of `prg-fast reward --reward class:N`) and a low-rank adapter (LoRA).

Any nn.Module called as model(t, x) works as a velocity network everywhere in prg_fast.
"""
from .heads import ClassifierHead
from .image_classifier import ImageClassifier
from .lora import LoRA, add_lora, lora_disabled, merged_state_dict
from .unet import PRESETS, UNet, timestep_embedding

__all__ = ["UNet", "PRESETS", "timestep_embedding", "ClassifierHead", "ImageClassifier", "LoRA", "add_lora",
           "lora_disabled", "merged_state_dict"]
