"""The finetuned-classifier checkpoint (format "prg_fast.finetune", written by `prg-fast finetune`;
the layout is in prg_fast.training.finetune's module doc): reading and validating it, rebuilding its
PRGClassifier, and the checks shared by finetune, evaluate and extract. The pretraining checkpoint's
format is in prg_fast.training.pretrain."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..classifier import PRGClassifier
from ..models import UNet
from ..models.heads import ClassifierHead
from .pretrain import CHECKPOINT_FORMAT as PRETRAIN_FORMAT, load_checkpoint
from .runs import CheckpointError, check_checkpoint, checkpoint_file, prg_velocity, read_checkpoint

__all__ = ["FINETUNE_FORMAT", "FINETUNE_VERSION", "REQUIRED_KEYS", "load_finetune_checkpoint",
           "load_pretrain_checkpoint", "build_classifier", "check_data_fits"]

FINETUNE_FORMAT = "prg_fast.finetune"
FINETUNE_VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "flow", "head", "optimizer", "model_config", "head_config",
                 "in_channels", "image_size", "data", "num_classes", "classifier", "args", "world_size", "rng", "history")


def load_finetune_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a finetuning checkpoint (a file, or a run directory holding one)."""
    ckpt = read_checkpoint(path)
    where = checkpoint_file(path)
    if ckpt.get("format") == PRETRAIN_FORMAT:
        raise CheckpointError(f"{where} is a pretraining checkpoint: it has no classifier head. Finetune it first "
                              f"(prg-fast finetune --checkpoint {path} ...) and evaluate that run's directory")
    return check_checkpoint(ckpt, where, FINETUNE_FORMAT, FINETUNE_VERSION, REQUIRED_KEYS, "finetuning")


def load_pretrain_checkpoint(path: str) -> Dict[str, Any]:
    """A pretraining checkpoint to finetune from; a finetuned one is refused with what to do instead."""
    where = checkpoint_file(path)
    ckpt = read_checkpoint(path)
    if ckpt.get("format") == FINETUNE_FORMAT:
        raise CheckpointError(f"{where} is a finetuned classifier (format {FINETUNE_FORMAT!r}); finetune starts from a "
                              f"pretraining checkpoint ({PRETRAIN_FORMAT!r}, written by prg-fast pretrain). Use "
                              f"prg-fast evaluate / extract for finetuned checkpoints")
    return load_checkpoint(path)  # validates format, version and entries


def build_classifier(ckpt: Dict[str, Any], *, steps: Optional[int] = None, method: Optional[str] = None,
                     model: Optional[torch.nn.Module] = None) -> PRGClassifier:
    """The PRGClassifier of a finetuning checkpoint, with its trained solver settings or others. A
    network prg_fast did not build (model_config None) is the `model` given, its weights loaded."""
    c = ckpt["classifier"]
    if model is None and ckpt["model_config"] is None:
        raise CheckpointError(f"this checkpoint holds a network prg_fast did not build ({ckpt.get('model_class')}): "
                              f"pass model=")
    try:
        flow = model if model is not None else UNet(**ckpt["model_config"])
        flow.load_state_dict(ckpt["flow"])
        head_cfg = dict(ckpt["head_config"])
        head = ClassifierHead(head_cfg.pop("in_shape"), head_cfg.pop("num_classes"), **head_cfg)
        head.load_state_dict(ckpt["head"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_config / head_config: {e}") from e
    return PRGClassifier(prg_velocity(flow, ckpt.get("time_convention", "prg")), head, t=c["t"], t0=c["t0"], save_at=c.get("save_at"),
                         steps=int(steps if steps is not None else c["steps"]),
                         method=method if method is not None else c["method"])


def check_data_fits(data, ckpt: Dict[str, Any], where: str, what: str) -> None:
    """Refuse data whose image shape is not the one the checkpoint's network reads."""
    c, h, w = data.shape
    if (c, h, w) != (ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]):
        raise CheckpointError(f"{where} {what} {ckpt['in_channels']}x{ckpt['image_size']}x{ckpt['image_size']} images, "
                              f"but {data.spec} has {c}x{h}x{w} images")
