"""Bring your own flow: any nn.Module called as model(t, x), named on the command line as
"package.module:factory", in prg_fast's time convention (t = 0 is data) or torchcfm's (t = 0 is noise)."""
import pkgutil

import torch

from ..ode import time_reversed

__all__ = ["TIME_CONVENTIONS", "is_factory_spec", "import_factory", "check_flow", "prg_velocity", "check_model_reads",
           "foreign_model_entries"]

TIME_CONVENTIONS = ("prg", "torchcfm")


def is_factory_spec(spec) -> bool:
    """"package.module:factory" names a callable that returns a velocity network."""
    return isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))


def import_factory(spec: str):
    """The callable named by "package.module:factory" (imported by pkgutil.resolve_name)."""
    if not is_factory_spec(spec):
        raise ValueError(f"model factory must be written package.module:factory, got {spec!r}")
    try:
        obj = pkgutil.resolve_name(spec)
    except ImportError as e:
        raise ValueError(f"model factory {spec!r}: cannot import {spec.split(':')[0]!r} ({e})") from e
    except AttributeError as e:
        raise ValueError(f"model factory {spec!r}: {e}") from e
    if not callable(obj):
        raise ValueError(f"model factory {spec!r} is not callable")
    return obj


def check_flow(model, time_convention: str):
    """A user's velocity network (None: prg_fast builds one): an nn.Module, whose parameters are
    trained and saved; and a known time convention ("prg": t = 0 is data; "torchcfm": t = 0 is noise)."""
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(f"time_convention must be one of {TIME_CONVENTIONS} ('prg': t = 0 is data, "
                         f"'torchcfm': t = 0 is noise), got {time_convention!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module called as model(t, x), got {type(model).__name__}")
    return model


def prg_velocity(model: torch.nn.Module, time_convention: str) -> torch.nn.Module:
    """The network seen in prg_fast's convention (t = 0 data): time_reversed for torchcfm's."""
    if time_convention == "torchcfm":
        return time_reversed(model)
    return model


# every convolution with in_channels (torch's public classes; the lazy ones subclass them)
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
          torch.nn.ConvTranspose3d)


def _first_conv_channels(model: torch.nn.Module):
    conv = next((m for m in model.modules() if isinstance(m, _CONVS)), None)
    return None if conv is None else conv.in_channels


@torch.no_grad()
def check_model_reads(model: torch.nn.Module, shape, spec: str, device) -> None:
    """Refuse, before any training, a velocity network that cannot read the data's images: one
    forward of a zero image at t = 0 in eval mode (no gradients, no random numbers drawn by
    dropout) must return a tensor of the image's shape. The message names both shapes."""
    c, h, w = shape
    x = torch.zeros((1, c, h, w), device=device)
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, device=device), x)
    except Exception as e:  # any failure of a foreign network on these images
        reads = _first_conv_channels(model)
        expects = f" (its first convolution reads {reads} channels)" if reads is not None else ""
        raise ValueError(f"the model {type(model).__name__}{expects} cannot read {spec}'s {c}x{h}x{w} images: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model {type(model).__name__} returns {got} for a batch of {spec}'s images of shape "
                         f"{tuple(x.shape)}; a velocity has the shape of its input")


def foreign_model_entries(model: torch.nn.Module, time_convention: str):
    """What a checkpoint records about a network prg_fast did not build: its class and time convention."""
    return {"model_class": f"{type(model).__module__}.{type(model).__qualname__}", "time_convention": time_convention}
