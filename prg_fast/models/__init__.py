"""Networks for PRG: velocity networks (UNet presets) and, in heads.py, classifier heads.

Any nn.Module called as model(t, x) works as a velocity network everywhere in prg_fast.
"""
import importlib.util as _importlib_util

from .unet import PRESETS, UNet, timestep_embedding

__all__ = ["UNet", "PRESETS", "timestep_embedding"]

# heads.py (ClassifierHead) is owned and added separately; import it when present so that
# prg_fast.models.ClassifierHead appears without editing this file, and so that a real error
# inside heads.py still surfaces instead of being swallowed by a try/except ImportError.
if _importlib_util.find_spec(__name__ + ".heads") is not None:
    from . import heads as _heads

    for _name in getattr(_heads, "__all__", ["ClassifierHead"]):
        globals()[_name] = getattr(_heads, _name)
        __all__.append(_name)
