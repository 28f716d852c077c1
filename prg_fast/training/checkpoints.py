"""The checkpoint formats of prg_fast's models: pretraining ("prg_fast.pretrain", written by
`prg-fast pretrain`; layout in prg_fast.training.pretrain's module doc), finetuning
("prg_fast.finetune", written by `prg-fast finetune`; layout in prg_fast.training.finetune's), and
a pretrained flow's published weights ("prg_fast.flow", written by `save_flow_weights` from a
pretraining checkpoint: its EMA weights and what rebuilds the network, without the optimizer and
random state; `finetune --weights FILE` and `extract --checkpoint FILE` read it).
Reading each file once and validating it, rebuilding its network or classifier, and the checks
shared by the commands that read them (finetune, evaluate, extract, repfusion, genrep)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..classifier import PRGClassifier
from ..models import UNet
from ..models.heads import ClassifierHead
from .flows import prg_velocity
from .rundir import CheckpointError, check_checkpoint, checkpoint_file, read_checkpoint

__all__ = ["PRETRAIN_FORMAT", "PRETRAIN_VERSION", "PRETRAIN_KEYS", "FINETUNE_FORMAT", "FINETUNE_VERSION",
           "REQUIRED_KEYS", "load_checkpoint", "load_finetune_checkpoint",
           "load_model_checkpoint", "build_model", "build_classifier", "check_data_fits", "FLOW_FORMAT",
           "FLOW_VERSION", "FLOW_KEYS", "save_flow_weights"]

SKELETON_KEYS = ("format", "version", "step", "args", "world_size", "rng", "history")  # every trainer's
PRETRAIN_FORMAT = "prg_fast.pretrain"
PRETRAIN_VERSION = 1
PRETRAIN_KEYS = SKELETON_KEYS + ("model", "ema", "optimizer", "model_config", "preset", "in_channels",
                                 "image_size", "path", "data", "num_classes")
FINETUNE_FORMAT = "prg_fast.finetune"
FINETUNE_VERSION = 1
REQUIRED_KEYS = SKELETON_KEYS + ("flow", "head", "optimizer", "model_config", "head_config", "in_channels",
                                 "image_size", "data", "num_classes", "classifier")
FLOW_FORMAT = "prg_fast.flow"
FLOW_VERSION = 1
# a pretraining checkpoint's entries that a published flow keeps ("ema": the weights), and "trained":
# how it was trained (the pretraining arguments but the output folder)
FLOW_KEYS = ("format", "version", "step", "ema", "model_config", "preset", "in_channels", "image_size", "path", "data",
             "num_classes", "trained")

FORMATS = {"pretrain": (PRETRAIN_FORMAT, PRETRAIN_VERSION, PRETRAIN_KEYS, "pretraining"),
           "finetune": (FINETUNE_FORMAT, FINETUNE_VERSION, REQUIRED_KEYS, "finetuning"),
           "flow": (FLOW_FORMAT, FLOW_VERSION, FLOW_KEYS, "flow weights")}
# a checkpoint of the other kind than asked for: what it is and what to do instead
OTHER_KIND = {
    "pretrain": f"{{where}} is not a prg_fast pretraining checkpoint ({PRETRAIN_FORMAT!r}, written by "
                f"prg-fast pretrain): it is a finetuned classifier ({FINETUNE_FORMAT!r}). Use prg-fast "
                f"evaluate / extract for finetuned checkpoints",
    "finetune": "{where} is a pretraining checkpoint: it has no classifier head. Finetune it first (prg-fast "
                "finetune --checkpoint {path} ...) and evaluate that run's directory",
    "flow": f"{{where}} is a finetuned classifier ({FINETUNE_FORMAT!r}), not a pretrained flow's weights "
            f"({FLOW_FORMAT!r}) or pretraining checkpoint; use prg-fast evaluate / extract for it"}


def load_model_checkpoint(path: str, kinds=("pretrain", "finetune"),
                          map_location="cpu") -> Tuple[str, Dict[str, Any]]:
    """(kind, the validated checkpoint) of a file or run directory, read once; `kinds`: the kinds
    ("pretrain", "finetune") accepted, the other is refused with what to do instead."""
    what = f"{FORMATS[kinds[0]][3]} checkpoint" if len(kinds) == 1 else "checkpoint"
    ckpt = read_checkpoint(path, what=what, map_location=map_location)
    where = checkpoint_file(path)
    kind = next((k for k, spec in FORMATS.items() if spec[0] == ckpt.get("format")), kinds[0])
    if kind not in kinds:
        raise CheckpointError(OTHER_KIND[kinds[0]].format(where=where, path=path))
    fmt, version, keys, name = FORMATS[kind]
    return kind, check_checkpoint(ckpt, where, fmt, version, keys, name)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read and validate a pretraining checkpoint (a file, or a run directory holding one)."""
    return load_model_checkpoint(path, ("pretrain",), map_location)[1]


def save_flow_weights(checkpoint: str, file: str, *, force: bool = False) -> Dict[str, Any]:
    """Write the published weights of a pretraining checkpoint (run directory or file) to `file`
    ("prg_fast.flow": its EMA weights, the network's config, path, data and pretraining arguments;
    no optimizer or random state, so about a third of the checkpoint). An existing `file` is
    replaced only with force=True. Returns what was written."""
    from .rundir import atomic_write, claim_file

    claim_file(file, force)
    ckpt = load_checkpoint(checkpoint)
    if ckpt["model_config"] is None:
        raise CheckpointError(f"{checkpoint_file(checkpoint)} holds a network prg_fast did not build; publish its "
                              f"state_dict instead (finetune --model MODULE:FACTORY --weights FILE reads that)")
    trained = {k: v for k, v in dict(ckpt["args"]).items() if k not in ("out", "device")}
    flow = {"format": FLOW_FORMAT, "version": FLOW_VERSION, "step": int(ckpt["step"]),
            "ema": {k: v.detach().to("cpu", torch.float32).clone() for k, v in ckpt["ema"].items()},
            **{k: ckpt[k] for k in ("model_config", "preset", "in_channels", "image_size", "path", "data",
                                   "num_classes")},
            "trained": trained}
    atomic_write(file, lambda f: torch.save(flow, f))
    return flow


def load_finetune_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a finetuning checkpoint (a file, or a run directory holding one)."""
    return load_model_checkpoint(path, ("finetune",))[1]


def _load_weights(ckpt: Dict[str, Any], model: Optional[torch.nn.Module], state: Optional[Dict[str, Any]],
                  what: str) -> torch.nn.Module:
    """The checkpoint's network (UNet(**model_config), or the `model` given) with `state` loaded
    (None: as built). A failure blames what was wrong: the network passed, or the checkpoint's own
    entries."""
    if model is None and ckpt["model_config"] is None:
        raise CheckpointError(f"this checkpoint holds a network prg_fast did not build ({ckpt.get('model_class')}, "
                              f"factory {ckpt.get('preset')!r}): pass model= (or --model package.module:factory)")
    try:
        net = model if model is not None else UNet(**ckpt["model_config"])
        if state is not None:
            net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        if model is None:
            raise CheckpointError(f"the checkpoint's {what} does not build its network, or its weights "
                                  f"do not fit it: {e}") from e
        built = "prg_fast's UNet (its model_config)" if ckpt["model_config"] is not None else ckpt.get("model_class")
        raise ValueError(f"model= / --model: the network given ({type(model).__name__}) does not fit this checkpoint, "
                         f"which holds {built}; pass the network it was trained with"
                         f"{' or drop --model' if ckpt['model_config'] is not None else ''}: {e}") from e
    return net


def build_model(ckpt: Dict[str, Any], ema: bool = True, model: Optional[torch.nn.Module] = None, *,
                fresh: bool = False) -> torch.nn.Module:
    """The velocity network of a pretraining checkpoint, with its EMA weights (ema=True) or the raw
    ones (fresh=True: neither, as initialised). A network prg_fast did not build (model_config None)
    is the `model` given, its weights loaded; the network is returned as trained, in its own time
    convention (ckpt.get("time_convention"))."""
    if not ema and not fresh and "model" not in ckpt:
        raise CheckpointError(f"this file holds the EMA weights only ({ckpt.get('format')!r}); drop --raw-weights")
    return _load_weights(ckpt, model, None if fresh else ckpt["ema" if ema else "model"], "model_config")


def build_classifier(ckpt: Dict[str, Any], *, steps: Optional[int] = None, method: Optional[str] = None,
                     model: Optional[torch.nn.Module] = None) -> PRGClassifier:
    """The PRGClassifier of a finetuning checkpoint, with its trained solver settings or others. A
    network prg_fast did not build (model_config None) is the `model` given, its weights loaded."""
    c = ckpt["classifier"]
    flow = _load_weights(ckpt, model, ckpt["flow"], "model_config")
    try:
        head_cfg = dict(ckpt["head_config"])
        head = ClassifierHead(head_cfg.pop("in_shape"), head_cfg.pop("num_classes"), **head_cfg)
        head.load_state_dict(ckpt["head"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's head weights do not fit its head_config: {e}") from e
    return PRGClassifier(prg_velocity(flow, ckpt.get("time_convention", "prg")), head, t=c["t"], t0=c["t0"],
                         save_at=c.get("save_at"), steps=int(steps if steps is not None else c["steps"]),
                         method=method if method is not None else c["method"])


def check_data_fits(data, ckpt: Dict[str, Any], where: str, what: str) -> None:
    """Refuse data whose image shape is not the one the checkpoint's network reads."""
    c, h, w = data.shape
    if (c, h, w) != (ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]):
        raise CheckpointError(f"{where} {what} {ckpt['in_channels']}x{ckpt['image_size']}x{ckpt['image_size']} images "
                              f"({ckpt['data']}), but {data.spec} has {c}x{h}x{w} images")
