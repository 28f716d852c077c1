"""PRG finetuning (`prg-fast finetune`), re-evaluation (`prg-fast evaluate`) and feature extraction
(`prg-fast extract`); DESIGN.md section 4.

Finetuning loads a pretraining checkpoint (EMA weights by default), puts a ClassifierHead on the end
state of the reversed trajectory (PRGClassifier: reverse from t0 to t, then the head) and trains
head and flow jointly through prg_fast's exact adjoint with

    loss = cross_entropy(logits, y; label_smoothing) + beta * flow_matching_loss(flow, x, path)

on the same batch (the paper's objective; beta = 0 is the released code's cross-entropy only).
AdamW, linear warm-up then cosine decay (or constant); --freeze-flow trains the head only (the flow
runs without a graph), --from-scratch trains the same architecture without pretraining. One process,
or many under torchrun (DistributedDataParallel), with the helpers of prg_fast.train.

Run directory (--out DIR):
    DIR/checkpoint.pt   atomically written every --ckpt-every steps and at the end; a later run with
                        the same DIR resumes from it (same arguments; --steps may grow)
    DIR/metrics.json    one flat JSON object: top1 (test split, at the training step count), loss,
                        ce, fm, train_top1, step, wall_time_s, ... plus every argument
    DIR/log.csv         step, loss, ce, fm, train_top1, lr (and test top1 where evaluated)

Checkpoint format (DIR/checkpoint.pt, torch.save of a dict; loads with weights_only=True; read it with
`load_finetune_checkpoint`, rebuild the classifier with `build_classifier`):
    format "prg_fast.finetune", version 1, step, flow (velocity network state_dict), head
    (ClassifierHead state_dict), optimizer, model_config (UNet(**model_config)), head_config
    (ClassifierHead(**head_config)), preset, in_channels, image_size, path ({"name", "sigma"} or None),
    data, num_classes, classes, classifier ({"t0", "t", "save_at", "steps", "method"}), pretrain
    ({"checkpoint", "step", "weights"} or None for --from-scratch without one), args (FinetuneConfig),
    world_size, rng (per rank), history, running, elapsed_s, top1 (None until the run finished),
    torch_version.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .classifier import PRGClassifier, feature_shape
from .data import Augment, ImageData, class_balanced_subset, default_augment, load_data
from .losses import flow_matching_loss
from .models import UNet
from .models.heads import ClassifierHead
from .paths import PATHS, get_path
from .train import CHECKPOINT_FORMAT as PRETRAIN_FORMAT, CHECKPOINT_NAME, CheckpointError, build_model, load_checkpoint
from .training.runs import (Dist, StepBatches, atomic_write, cosine_factor, init_distributed, merge_config, rank_seed,
                            resolve_device, restore_rng_on_resume, rng_state, seed_everything)

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "evaluate", "extract", "load_finetune_checkpoint",
           "build_classifier", "FINETUNE_FORMAT", "FINETUNE_VERSION", "add_finetune", "add_evaluate", "add_extract"]

FINETUNE_FORMAT = "prg_fast.finetune"
FINETUNE_VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "flow", "head", "optimizer", "model_config", "head_config",
                 "in_channels", "image_size", "data", "num_classes", "classifier", "args", "world_size", "rng", "history")
# arguments that define what a finetuning run is; resuming with other values is refused
RESUME_MUST_MATCH = ("data", "checkpoint", "t0", "t", "save_at", "ode_steps", "method", "batch_size", "beta",
                     "label_smoothing", "freeze_flow", "from_scratch", "model", "path", "hidden", "raw_weights",
                     "labels_per_class", "labels_seed")


def _number_ok(v, lo, hi, lo_open=False, hi_open=False) -> bool:
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))


def _parse_times(value) -> Optional[List[float]]:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return [float(s) for s in value.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"save_at must be comma-separated times such as 0.5,1.0, got {value!r}") from None
    return [float(v) for v in value]


@dataclass
class FinetuneConfig:
    """Arguments of `prg-fast finetune` (the command line maps one flag to each field)."""

    data: str = "digits"
    checkpoint: Optional[str] = None  # pretraining checkpoint (file or run directory)
    out: str = "runs/finetune"
    steps: int = 1000
    batch_size: int = 128  # global: split evenly over the processes
    ode_steps: int = 20
    method: str = "euler"  # the released code's solver
    t0: float = 0.0
    t: float = 1.0
    save_at: Optional[List[float]] = None  # several feature times, concatenated on the channel dim
    beta: float = 0.0  # weight of the flow-matching term (paper: > 0; released code: 0)
    label_smoothing: float = 0.1
    lr: float = 1e-3
    head_lr: Optional[float] = None  # None: lr
    weight_decay: float = 0.05
    warmup: Optional[int] = None  # linear warm-up steps; None: 5% of --steps
    schedule: str = "cosine"  # cosine | constant (after the warm-up)
    min_lr: float = 0.0  # cosine floor, as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    freeze_flow: bool = False  # train the head only
    from_scratch: bool = False  # same architecture, random initial weights
    model: Optional[str] = None  # UNet preset for --from-scratch without --checkpoint
    path: Optional[str] = None  # flow-matching path for beta > 0 (default: the checkpoint's)
    raw_weights: bool = False  # start from the checkpoint's raw weights instead of its EMA
    hidden: Optional[int] = None  # head width (None: the pooled feature size, as in PRG)
    seed: int = 0
    labels_per_class: Optional[int] = None  # finetune on N labelled images per class (None: all of them)
    labels_seed: Optional[int] = None  # seed of that class-balanced subset (None: seed)
    hflip: Optional[bool] = None
    crop_padding: int = 0
    fm_eps: float = 1e-5
    ckpt_every: int = 500
    log_every: int = 25
    eval_every: int = 0  # test top-1 every N steps (0: only at the end)
    eval_batch_size: int = 256
    device: str = "auto"
    progress: bool = True

    def validate(self) -> "FinetuneConfig":
        def int_at_least(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        for name in ("steps", "batch_size", "ode_steps", "ckpt_every", "log_every", "eval_batch_size"):
            int_at_least(name, 1)
        for name in ("seed", "crop_padding", "eval_every"):
            int_at_least(name, 0)
        if self.warmup is not None:
            int_at_least("warmup", 0)
        if self.hidden is not None:
            int_at_least("hidden", 1)
        if self.labels_per_class is not None:
            int_at_least("labels_per_class", 1)
        if self.labels_seed is not None:
            int_at_least("labels_seed", 0)
        for name, lo, hi, lo_open in (("lr", 0.0, 1.0, True), ("weight_decay", 0.0, 10.0, False),
                                      ("beta", 0.0, 1e6, False), ("min_lr", 0.0, 1.0, False),
                                      ("grad_clip", 0.0, 1e12, False), ("fm_eps", 0.0, 0.5, False)):
            if not _number_ok(getattr(self, name), lo, hi, lo_open):
                raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {getattr(self, name)!r}")
        if self.head_lr is not None and not _number_ok(self.head_lr, 0.0, 1.0, lo_open=True):
            raise ValueError(f"head_lr must be a number in (0, 1], got {self.head_lr!r}")
        if not _number_ok(self.label_smoothing, 0.0, 1.0, hi_open=True):
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        for name in ("t0", "t"):
            if not _number_ok(getattr(self, name), 0.0, 1.0):
                raise ValueError(f"{name} must be a number in [0, 1] (0 = data, 1 = noise), got {getattr(self, name)!r}")
        if not self.t0 < self.t:
            raise ValueError(f"the trajectory segment needs t0 < t (it is integrated from t0 up to t), "
                             f"got t0={self.t0:g}, t={self.t:g}")
        self.save_at = _parse_times(self.save_at)
        if self.save_at is not None:
            if not self.save_at:
                raise ValueError("save_at must hold at least one time")
            bad = [s for s in self.save_at if not self.t0 <= s <= self.t]
            if bad:
                raise ValueError(f"save_at times must lie in [t0, t] = [{self.t0:g}, {self.t:g}], got {bad}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        from .ode.solvers import get_tableau

        get_tableau(self.method)
        if self.freeze_flow and self.from_scratch:
            raise ValueError("freeze_flow with from_scratch would train a head on an untrained, frozen flow; "
                             "choose one of them")
        if self.checkpoint is None and not self.from_scratch:
            raise ValueError("finetune needs --checkpoint (a pretraining run directory or checkpoint.pt); "
                             "only --from-scratch runs without one")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, str) or not self.checkpoint:
                raise ValueError(f"checkpoint must be a path, got {self.checkpoint!r}")
            self.checkpoint = os.path.abspath(os.path.expanduser(self.checkpoint))
        if self.model is not None:
            from .models.unet import PRESETS

            if self.checkpoint is not None:
                raise ValueError("model (a UNet preset) is only for --from-scratch without --checkpoint; with a "
                                 "checkpoint the architecture is the checkpoint's")
            if self.model not in PRESETS:
                raise ValueError(f"model must be a UNet preset, one of {sorted(PRESETS)}, got {self.model!r}")
        elif self.checkpoint is None:
            raise ValueError("--from-scratch without --checkpoint needs --model PRESET for the architecture")
        if self.path is not None and self.path not in PATHS:
            raise ValueError(f"path must be one of {sorted(PATHS)}, got {self.path!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a directory path, got {self.out!r}")
        return self

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else int(round(0.05 * self.steps))


@dataclass
class FinetuneResult:
    classifier: PRGClassifier  # the finetuned classifier (unwrapped)
    metrics: Dict[str, Any]
    out: str
    step: int
    history: List[List[float]] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------
# checkpoints


def _torch_load(path: str) -> Dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupted, truncated, or not written by "
                              f"prg_fast): {type(e).__name__}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a prg_fast checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def _checkpoint_file(path: str) -> str:
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def load_finetune_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a finetuning checkpoint (a file, or a run directory holding one)."""
    ckpt = _torch_load(path)
    where = _checkpoint_file(path)
    fmt = ckpt.get("format")
    if fmt == PRETRAIN_FORMAT:
        raise CheckpointError(f"{where} is a pretraining checkpoint: it has no classifier head. Finetune it first "
                              f"(prg-fast finetune --checkpoint {path} ...) and evaluate that run's directory")
    if fmt != FINETUNE_FORMAT:
        raise CheckpointError(f"{where} is not a prg_fast finetuning checkpoint (format {fmt!r}, expected "
                              f"{FINETUNE_FORMAT!r})")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > FINETUNE_VERSION:
        raise CheckpointError(f"{where} has finetuning checkpoint version {ckpt.get('version')!r}; this prg_fast reads "
                              f"versions <= {FINETUNE_VERSION} (upgrade prg_fast)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where} lacks the entries {missing}; it is incomplete or from another tool")
    return ckpt


def _load_pretrain(path: str) -> Dict[str, Any]:
    where = _checkpoint_file(path)
    ckpt = _torch_load(path)
    if ckpt.get("format") == FINETUNE_FORMAT:
        raise CheckpointError(f"{where} is a finetuned classifier (format {FINETUNE_FORMAT!r}); finetune starts from a "
                              f"pretraining checkpoint ({PRETRAIN_FORMAT!r}, written by prg-fast pretrain). Use "
                              f"prg-fast evaluate / extract for finetuned checkpoints")
    return load_checkpoint(path)  # validates format, version and entries


def build_classifier(ckpt: Dict[str, Any], *, steps: Optional[int] = None, method: Optional[str] = None) -> PRGClassifier:
    """The PRGClassifier of a finetuning checkpoint, with its trained solver settings or others."""
    c = ckpt["classifier"]
    try:
        flow = UNet(**ckpt["model_config"])
        flow.load_state_dict(ckpt["flow"])
        head_cfg = dict(ckpt["head_config"])
        head = ClassifierHead(head_cfg.pop("in_shape"), head_cfg.pop("num_classes"), **head_cfg)
        head.load_state_dict(ckpt["head"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_config / head_config: {e}") from e
    return PRGClassifier(flow, head, t=c["t"], t0=c["t0"], save_at=c.get("save_at"),
                         steps=int(steps if steps is not None else c["steps"]),
                         method=method if method is not None else c["method"])


def _check_data_fits(data: ImageData, ckpt: Dict[str, Any], where: str, what: str) -> None:
    c, h, w = data.shape
    if (c, h, w) != (ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]):
        raise CheckpointError(f"{where} {what} {ckpt['in_channels']}x{ckpt['image_size']}x{ckpt['image_size']} images, "
                              f"but {data.spec} has {c}x{h}x{w} images")


# -------------------------------------------------------------------------------------------------
# training


class _FinetuneNet(nn.Module):
    """The classifier and the loss in one forward, so that DistributedDataParallel sees a single
    forward per step covering both the cross-entropy and the flow-matching term."""

    def __init__(self, classifier: PRGClassifier, path, beta: float, label_smoothing: float, eps: float):
        super().__init__()
        self.classifier = classifier
        self.path, self.beta, self.label_smoothing, self.eps = path, beta, label_smoothing, eps

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.classifier(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        if self.beta > 0:
            fm = flow_matching_loss(self.classifier.flow, x, self.path, eps=self.eps)
            loss = ce + self.beta * fm
        else:
            fm = torch.zeros((), device=x.device)
            loss = ce
        correct = (logits.detach().argmax(dim=1) == y).sum()
        return loss, torch.stack([loss.detach().float(), ce.detach().float(), fm.detach().float(), correct.float()])


def finetune(config: Optional[FinetuneConfig] = None, **kwargs) -> FinetuneResult:
    """Finetune (or resume finetuning) a PRG classifier; see the module doc. Call with a
    FinetuneConfig or with its fields as keyword arguments. Every process of a torchrun job calls
    it; only rank 0 writes files."""
    cfg = merge_config(FinetuneConfig, config, kwargs)
    ctx = init_distributed(cfg.device)
    try:
        return _Finetuner(cfg, ctx).run()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


class _Finetuner:
    def __init__(self, cfg: FinetuneConfig, ctx: Dist):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # see prg_fast.train: denormal Adam moments are slow on CPUs
        if cfg.batch_size % ctx.world:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({ctx.world})")
        self.local_batch = cfg.batch_size // ctx.world
        augment = default_augment(cfg.data, "train")
        augment = Augment(hflip=augment.hflip if cfg.hflip is None else bool(cfg.hflip), crop_padding=cfg.crop_padding)
        self.data: ImageData = load_data(cfg.data, "train", augment=augment)
        self.labels_seed = None
        if cfg.labels_per_class is not None:  # label-scarce: a seeded class-balanced subset; test stays whole
            self.labels_seed = cfg.seed if cfg.labels_seed is None else cfg.labels_seed
            self.data = self.data.subset(class_balanced_subset(self.data.labels, cfg.labels_per_class, self.labels_seed,
                                                               self.data.num_classes))
            if cfg.batch_size > len(self.data):
                raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the labelled subset (labels_per_class="
                                 f"{cfg.labels_per_class} x {self.data.num_classes} classes = {len(self.data)} images); "
                                 f"use batch_size <= {len(self.data)}")
        self.test: ImageData = load_data(cfg.data, "test", augment=None)
        if self.test.num_classes != self.data.num_classes:
            raise ValueError(f"{cfg.data}: the test split has {self.test.num_classes} classes, the train split "
                             f"{self.data.num_classes}")
        c, h, w = self.data.shape
        self._indices = StepBatches(self.data, ctx, cfg.seed, self.local_batch, cfg.batch_size)

        # the flow: pretrained weights (EMA by default), or the same architecture freshly initialised
        self.pretrain_info = None
        path_name, sigma = cfg.path, 0.0
        seed_everything(cfg.seed)  # identical initial head (and scratch flow) on every rank
        if cfg.checkpoint is not None:
            pre = _load_pretrain(cfg.checkpoint)
            _check_data_fits(self.data, pre, _checkpoint_file(cfg.checkpoint), "was pretrained on")
            if cfg.from_scratch:
                try:
                    flow = UNet(**pre["model_config"])
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{cfg.checkpoint}: its model_config does not build a UNet: {e}") from e
            else:
                flow = build_model(pre, ema=not cfg.raw_weights)
                self.pretrain_info = {"checkpoint": cfg.checkpoint, "step": int(pre["step"]),
                                      "weights": "raw" if cfg.raw_weights else "ema"}
            self.preset = pre.get("preset")
            if path_name is None:
                path_name, sigma = pre["path"]["name"], float(pre["path"].get("sigma", 0.0))
        else:
            flow = UNet.preset(cfg.model, in_channels=c, image_size=h)
            self.preset = cfg.model
        if h != w:
            raise ValueError(f"the UNet presets need square images; {cfg.data} has {h}x{w}")
        self.path_cfg = {"name": path_name or "otcfm", "sigma": sigma}
        self.path = get_path(self.path_cfg["name"], self.path_cfg["sigma"])
        self.beta = 0.0 if cfg.freeze_flow else cfg.beta  # a frozen flow gets nothing from the FM term
        head = ClassifierHead(feature_shape(self.data.shape, cfg.save_at), self.data.num_classes, hidden=cfg.hidden)
        self.classifier = PRGClassifier(flow, head, t=cfg.t, t0=cfg.t0, steps=cfg.ode_steps, method=cfg.method,
                                        save_at=cfg.save_at).to(self.device)
        if cfg.freeze_flow:
            self.classifier.flow.requires_grad_(False)
        groups = [{"params": list(self.classifier.head.parameters()), "lr": cfg.head_lr or cfg.lr, "name": "head"}]
        if not cfg.freeze_flow:
            groups.append({"params": list(self.classifier.flow.parameters()), "lr": cfg.lr, "name": "flow"})
        for g in groups:
            g["peak_lr"] = g["lr"]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step, self.history, self.running, self.elapsed_prev = 0, [], [0.0, 0.0, 0.0, 0.0, 0], 0.0
        self.ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
        self.resumed_from = 0
        if os.path.isfile(self.ckpt_path):
            self._resume(self.ckpt_path)
        else:
            seed_everything(rank_seed(cfg.seed, ctx.rank))
        self.module = _FinetuneNet(self.classifier, self.path, self.beta, cfg.label_smoothing, cfg.fm_eps)
        self.net = self.module
        if ctx.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- resume -----------------------------------------------------------------------------------
    def _resume(self, where: str) -> None:
        cfg = self.cfg
        raw = _torch_load(where)
        if raw.get("format") == PRETRAIN_FORMAT:
            raise CheckpointError(f"--out {cfg.out} holds a pretraining checkpoint; finetune into another directory")
        ckpt = load_finetune_checkpoint(where)
        old = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
        for key in RESUME_MUST_MATCH:
            if key in old and old[key] != getattr(cfg, key):
                raise CheckpointError(f"{where} was written by a run with {key}={old[key]!r}, but this run has "
                                      f"{key}={getattr(cfg, key)!r}; resume with the same arguments or use a new --out")
        try:
            self.classifier.flow.load_state_dict(ckpt["flow"])
            self.classifier.head.load_state_dict(ckpt["head"])
            self.opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: the saved weights or optimizer state do not fit the classifier: {e}") from e
        for group in self.opt.param_groups:  # the saved groups carry the old run's peaks: use this run's
            group["peak_lr"] = (cfg.head_lr or cfg.lr) if group.get("name") == "head" else cfg.lr
            group["weight_decay"] = cfg.weight_decay
        self.step = self.resumed_from = int(ckpt["step"])
        self.history = [list(h) for h in ckpt["history"]]
        running = ckpt.get("running") or [0.0, 0.0, 0.0, 0.0, 0]
        self.running = [float(v) for v in running[:4]] + [int(running[4])]
        self.elapsed_prev = float(ckpt.get("elapsed_s", 0.0))
        if ckpt.get("pretrain") is not None:
            self.pretrain_info = ckpt["pretrain"]
        restore_rng_on_resume(ckpt, self.ctx, self.device, cfg.seed, self.step, self._say)
        self._say(f"resuming from {where} at step {self.step}")

    # -- helpers ----------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if self.ctx.main:
            print(f"prg-fast finetune: {msg}", file=sys.stderr, flush=True)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
        cfg, warm = self.cfg, self.cfg.warmup_steps
        if cfg.schedule == "constant":
            return (step + 1) / warm if warm > 0 and step < warm else 1.0
        return cosine_factor(step, cfg.steps, warm, cfg.min_lr)

    def test_top1(self) -> float:
        return top1(self.classifier, self.test, batch_size=self.cfg.eval_batch_size, device=self.device)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        from tqdm.auto import tqdm

        cfg, ctx = self.cfg, self.ctx
        if ctx.main:
            os.makedirs(cfg.out, exist_ok=True)
        start_step, t_start = self.step, time.perf_counter()
        if self.step >= cfg.steps:
            self._say(f"{self.ckpt_path} is already at step {self.step} >= --steps {cfg.steps}; nothing to train")
        mode = "head only" if cfg.freeze_flow else ("from scratch" if cfg.from_scratch else "PRG")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (ctx.main and cfg.progress), dynamic_ncols=True,
                   mininterval=1.0, desc=f"finetune ({mode})", unit="step")
        self.classifier.train()
        if cfg.freeze_flow:
            self.classifier.flow.eval()
        stats_sum = torch.zeros(4, device=self.device)
        n_window, t_window = 0, time.perf_counter()
        params = [p for p in self.classifier.parameters() if p.requires_grad]
        while self.step < cfg.steps:
            step = self.step
            factor = self.lr_factor(step)
            for group in self.opt.param_groups:
                group["lr"] = group["peak_lr"] * factor
            x, y = self.data.batch(self._indices(step), device=self.device)
            loss, stats = self.net(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
            stats_sum += stats
            n_window += 1
            self.step += 1
            bar.update(1)
            boundary = (self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step % cfg.ckpt_every == 0
                        or (cfg.eval_every and self.step % cfg.eval_every == 0))
            if boundary:
                self._flush(stats_sum, n_window, factor * cfg.lr, bar, t_window)
                stats_sum.zero_()
                n_window, t_window = 0, time.perf_counter()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                acc = self._eval_all()
                if ctx.main:
                    self.history[-1] = self.history[-1][:6] + [acc]
                    bar.set_postfix(top1=f"{acc:.4f}", refresh=False)
            if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self._save(self.elapsed_prev + time.perf_counter() - t_start, None)
        bar.close()
        elapsed = time.perf_counter() - t_start
        acc = self._eval_all()
        if self.step > start_step or not os.path.isfile(self.ckpt_path):
            self._save(self.elapsed_prev + elapsed, acc)
        metrics = self._finish(start_step, elapsed, acc)
        if ctx.world > 1:
            dist.barrier()
        return FinetuneResult(self.classifier, metrics, cfg.out, self.step, self.history)

    def _eval_all(self) -> float:
        # rank 0 evaluates the whole test split (identical weights on every rank); others wait
        acc = self.test_top1() if self.ctx.main else 0.0
        if self.ctx.world > 1:
            t = torch.tensor([acc], device=self.device, dtype=torch.float64)
            dist.broadcast(t, 0)
            acc = float(t.item())
        self.classifier.train()
        if self.cfg.freeze_flow:
            self.classifier.flow.eval()
        return acc

    def _flush(self, stats_sum, n_window, lr, bar, t_window) -> None:
        stats = torch.cat([stats_sum.double(), torch.tensor([float(n_window)], device=self.device, dtype=torch.float64)])
        if self.ctx.world > 1:
            dist.all_reduce(stats)
        loss_sum, ce_sum, fm_sum, correct, n = (float(v) for v in stats)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the loss became non-finite before step {self.step}; lower --lr (now "
                                     f"{self.cfg.lr:g}) or keep --grad-clip on")
        world = self.ctx.world
        # per-rank sums of per-batch means -> divide by world; correct counts -> divide by images
        self.running[0] += loss_sum / world
        self.running[1] += ce_sum / world
        self.running[2] += fm_sum / world
        self.running[3] += correct
        self.running[4] += int(round(n / world))
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps or (
                self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
            count = max(self.running[4], 1)
            row = [self.step, self.running[0] / count, self.running[1] / count, self.running[2] / count,
                   self.running[3] / (count * self.cfg.batch_size), lr]
            self.history.append(row)
            self.running = [0.0, 0.0, 0.0, 0.0, 0]
            rate = n_window * self.cfg.batch_size / max(time.perf_counter() - t_window, 1e-9)
            bar.set_postfix({"loss": f"{row[1]:.4f}", "train acc": f"{row[4]:.3f}", "img/s": f"{rate:.0f}"}, refresh=False)

    def _save(self, elapsed: float, top1_value: Optional[float]) -> None:
        ctx = self.ctx
        rng = rng_state(self.device)
        if ctx.world > 1:
            gathered: List[Any] = [None] * ctx.world
            dist.all_gather_object(gathered, {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in rng.items()})
            rngs = gathered
        else:
            rngs = [rng]
        if not ctx.main:
            return
        cfg, clf = self.cfg, self.classifier
        ckpt = {
            "format": FINETUNE_FORMAT,
            "version": FINETUNE_VERSION,
            "step": self.step,
            "flow": clf.flow.state_dict(),
            "head": clf.head.state_dict(),
            "optimizer": self.opt.state_dict(),
            "model_config": dict(clf.flow.config),
            "head_config": dict(clf.head.config),
            "preset": self.preset,
            "in_channels": self.data.shape[0],
            "image_size": self.data.shape[1],
            "path": dict(self.path_cfg),
            "data": cfg.data,
            "num_classes": self.data.num_classes,
            "classes": list(self.data.classes),
            "classifier": {"t0": clf.t0, "t": clf.t, "save_at": list(clf.save_at) if clf.save_at else None,
                           "steps": clf.steps, "method": clf.method},
            "pretrain": self.pretrain_info,
            "args": asdict(cfg),
            "world_size": ctx.world,
            "rng": [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in rngs],
            "history": self.history,
            "running": list(self.running),
            "elapsed_s": elapsed,
            "top1": top1_value,
            "torch_version": str(torch.__version__),
        }
        atomic_write(self.ckpt_path, lambda f: torch.save(ckpt, f))
        self._write_log()

    def _write_log(self) -> None:
        def write(f):
            text = io.StringIO()
            w = csv.writer(text)
            w.writerow(["step", "loss", "ce", "fm", "train_top1", "lr", "test_top1"])
            w.writerows(self.history)
            f.write(text.getvalue().encode())

        atomic_write(os.path.join(self.cfg.out, "log.csv"), write)

    def _finish(self, start_step: int, elapsed: float, acc: float) -> Dict[str, Any]:
        cfg, clf = self.cfg, self.classifier
        last = self.history[-1] if self.history else [self.step] + [float("nan")] * 5
        trained = self.step - start_step
        metrics: Dict[str, Any] = {
            "top1": acc,
            "test_size": len(self.test),
            "loss": last[1], "ce": last[2], "fm": last[3], "train_top1": last[4],
            "loss_start": self.history[0][1] if self.history else float("nan"),
            "step": self.step,
            "resumed_from_step": self.resumed_from,
            "wall_time_s": round(elapsed, 3),
            "train_time_total_s": round(self.elapsed_prev + elapsed, 3),
            "images_per_s": round(trained * cfg.batch_size / elapsed, 2) if trained and elapsed > 0 else None,
            "num_params_flow": sum(p.numel() for p in clf.flow.parameters()),
            "num_params_head": sum(p.numel() for p in clf.head.parameters()),
            "beta_used": self.beta,
            "fm_path": self.path_cfg["name"],
            "pretrain_step": self.pretrain_info["step"] if self.pretrain_info else None,
            "warmup_steps": cfg.warmup_steps,
            "train_size": len(self.data),
            "labels_seed_used": self.labels_seed,
            "world_size": self.ctx.world,
            "device_used": str(self.device),
            "torch_version": str(torch.__version__),
        }
        for key, value in asdict(cfg).items():
            metrics.setdefault(key, value)
        if self.ctx.main:
            _write_json(os.path.join(cfg.out, "metrics.json"), metrics)
            self._say(f"step {self.step}: test top-1 {acc:.4f} ({cfg.ode_steps} {cfg.method} steps); "
                      f"wrote {cfg.out}/checkpoint.pt, metrics.json")
        return metrics


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, allow_nan=True) + "\n").encode()))


def top1(classifier, data, *, batch_size: int = 256, device=None, progress: bool = False) -> float:
    from .eval import top1_accuracy

    return top1_accuracy(classifier, data, batch_size=batch_size, device=device, progress=progress)


# -------------------------------------------------------------------------------------------------
# evaluate / extract


def _device(name: str) -> torch.device:
    return resolve_device(name, 0)


def evaluate(checkpoint: str, data: Optional[str] = None, *, ode_steps: Optional[int] = None,
             method: Optional[str] = None, batch_size: int = 256, device: str = "auto", progress: bool = False,
             out: Optional[str] = None) -> Dict[str, Any]:
    """Top-1 of a finetuned checkpoint on the test split of `data` (default: the data it was
    finetuned on), with its training step count or `ode_steps` / `method`. Writes out/metrics.json
    when `out` is given; returns the metrics dict."""
    ckpt = load_finetune_checkpoint(checkpoint)
    where = _checkpoint_file(checkpoint)
    spec = data or ckpt["data"]
    test = load_data(spec, "test", augment=None)
    if test.num_classes != int(ckpt["num_classes"]):
        raise CheckpointError(f"{where} classifies {ckpt['num_classes']} classes, but {spec} has {test.num_classes}; "
                              f"evaluate on the data set it was finetuned on ({ckpt['data']})")
    _check_data_fits(test, ckpt, where, "was finetuned on")
    if ckpt.get("classes") and list(ckpt["classes"]) != list(test.classes):
        print(f"prg-fast evaluate: warning: class names differ from those finetuned on ({ckpt['classes'][:5]}... vs "
              f"{test.classes[:5]}...); labels are matched by sorted position", file=sys.stderr)
    dev = _device(device)
    clf = build_classifier(ckpt, steps=ode_steps, method=method).to(dev)
    t_start = time.perf_counter()
    acc = top1(clf, test, batch_size=batch_size, device=dev, progress=progress)
    metrics = {
        "top1": acc,
        "correct": int(round(acc * len(test))),
        "test_size": len(test),
        "ode_steps": clf.steps,
        "method": clf.method,
        "trained_ode_steps": ckpt["classifier"]["steps"],
        "trained_method": ckpt["classifier"]["method"],
        "t0": clf.t0, "t": clf.t,
        "finetune_top1": ckpt.get("top1"),
        "finetune_step": int(ckpt["step"]),
        "checkpoint": os.path.abspath(where),
        "data": spec,
        "wall_time_s": round(time.perf_counter() - t_start, 3),
        "device_used": str(dev),
        "batch_size": batch_size,
    }
    if out:
        _write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def extract(checkpoint: str, data: str, out: str, *, t: Optional[float] = None, t0: Optional[float] = None,
            save_at: Optional[Sequence[float]] = None, ode_steps: Optional[int] = None, method: Optional[str] = None,
            raw_weights: bool = False, batch_size: int = 256, device: str = "auto", progress: bool = False,
            probe: bool = False, knn_k: int = 20) -> Dict[str, Any]:
    """Features of both splits of `data` along the reversed trajectory of a checkpoint's flow,
    written to `out` (.npz; format in prg_fast.eval). A pretraining checkpoint gives its EMA
    network (raw_weights=True: the raw one); a finetuning checkpoint its finetuned flow, with its
    trained segment and solver as defaults. probe=True adds linear-probe and k-NN top-1 (written
    next to the file as <out without .npz>.probe.json). Returns the metadata (and probe numbers)."""
    from .eval import extract_features, probe_features, save_features

    if not isinstance(out, str) or not out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {out!r}")
    raw = _torch_load(checkpoint)
    where = _checkpoint_file(checkpoint)
    if raw.get("format") == FINETUNE_FORMAT:
        ckpt = load_finetune_checkpoint(checkpoint)
        flow = build_classifier(ckpt).flow
        c = ckpt["classifier"]
        defaults = dict(t=c["t"], t0=c["t0"], steps=c["steps"], method=c["method"])
        kind, weights = "finetune", "finetuned"
    else:
        ckpt = load_checkpoint(checkpoint)
        flow = build_model(ckpt, ema=not raw_weights)
        defaults = dict(t=1.0, t0=0.0, steps=20, method="euler")
        kind, weights = "pretrain", "raw" if raw_weights else "ema"
    t = defaults["t"] if t is None else float(t)
    t0 = defaults["t0"] if t0 is None else float(t0)
    steps = defaults["steps"] if ode_steps is None else ode_steps
    method = defaults["method"] if method is None else method
    if not t0 < t:
        raise ValueError(f"the trajectory segment needs t0 < t, got t0={t0:g}, t={t:g}")
    save_at = _parse_times(save_at)
    dev = _device(device)
    flow = flow.to(dev)
    splits = {}
    t_start = time.perf_counter()
    for split in ("train", "test"):
        d = load_data(data, split, augment=None)
        if split == "train":
            _check_data_fits(d, ckpt, where, "was trained on")
        splits[split] = (d, *extract_features(flow, d, t, t0=t0, steps=steps, method=method, save_at=save_at,
                                              batch_size=batch_size, device=dev, progress=progress))
    meta = {"checkpoint": os.path.abspath(where), "checkpoint_kind": kind, "weights": weights, "data": data,
            "t": t, "t0": t0, "save_at": save_at, "ode_steps": steps, "method": method,
            "feature_shape": list(feature_shape(splits["train"][0].shape, save_at)),
            "n_train": len(splits["train"][0]), "n_test": len(splits["test"][0]),
            "wall_time_s": round(time.perf_counter() - t_start, 3)}
    save_features(out, train_features=splits["train"][1], train_labels=splits["train"][2],
                  test_features=splits["test"][1], test_labels=splits["test"][2],
                  feature_shape=meta["feature_shape"], classes=splits["train"][0].classes, meta=meta)
    if probe:
        result = probe_features({"train_features": splits["train"][1], "train_labels": splits["train"][2],
                                 "test_features": splits["test"][1], "test_labels": splits["test"][2]}, k=knn_k)
        meta.update(result)
        _write_json(out[:-len(".npz")] + ".probe.json", meta)
    return meta


# -------------------------------------------------------------------------------------------------
# command line (registered by prg_fast.cli)


def _time_arg(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a time in [0, 1] (0 = data, 1 = noise), got {value:g}")
    return value


def _times_arg(text: str) -> List[float]:
    import argparse

    try:
        times = _parse_times(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not times or any(not 0.0 <= s <= 1.0 for s in times):
        raise argparse.ArgumentTypeError(f"expected comma-separated times in [0, 1], got {text!r}")
    return times


def _solver_arguments(p, steps_default, method_default, what: str) -> None:
    from .cli import positive_int
    from .ode import SOLVERS

    p.add_argument("--ode-steps", type=positive_int, default=steps_default, metavar="K",
                   help=f"fixed solver steps from t0 to t ({what})")
    p.add_argument("--method", choices=sorted(SOLVERS), default=method_default, help=f"ODE solver ({what})")


def add_finetune(subparsers) -> None:
    from .cli import add_data_arguments, add_run_arguments, nonnegative_float, nonnegative_int, positive_int
    from .models.unet import PRESETS

    d = FinetuneConfig()
    p = subparsers.add_parser(
        "finetune", help="PRG finetuning: classifier head on the reversed trajectory, trained jointly with the flow",
        description="Load a pretraining checkpoint (EMA weights by default), reverse images from t0 to t with the "
                    "flow, classify the end state with a ClassifierHead, and train head and flow jointly with "
                    "cross-entropy + BETA x flow-matching loss through the exact adjoint. Runs on one process, or "
                    "under `torchrun --nproc_per_node N` with DistributedDataParallel.")
    add_data_arguments(p)
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="pretraining run directory (or its checkpoint.pt); optional with --from-scratch --model")
    p.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps in total (default {d.steps})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"global batch, split over processes (default {d.batch_size})")
    _solver_arguments(p, d.ode_steps, d.method, f"default {d.ode_steps} {d.method}")
    p.add_argument("--t0", type=_time_arg, default=d.t0, help="start of the trajectory segment; the image is the "
                   "state at t0 (default 0 = data)")
    p.add_argument("--t", type=_time_arg, default=d.t, help="end of the segment, whose state is classified (default 1)")
    p.add_argument("--save-at", type=_times_arg, default=None, metavar="T1,T2,...",
                   help="classify the states at these times, concatenated on the channel dim (default: only t)")
    p.add_argument("--beta", type=nonnegative_float, default=d.beta,
                   help=f"weight of the flow-matching loss on the same batch (default {d.beta:g}: cross-entropy only, "
                        "as the released PRG code; the paper's objective uses beta > 0)")
    p.add_argument("--label-smoothing", type=nonnegative_float, default=d.label_smoothing,
                   help=f"(default {d.label_smoothing:g})")
    p.add_argument("--freeze-flow", action="store_true", help="train the head only (the flow is a fixed feature map)")
    p.add_argument("--from-scratch", action="store_true",
                   help="same architecture with random initial weights (no pretraining)")
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="UNet preset for --from-scratch without --checkpoint")
    p.add_argument("--path", choices=sorted(PATHS), default=None,
                   help="flow-matching path of the beta term (default: the checkpoint's, else otcfm)")
    p.add_argument("--raw-weights", action="store_true", help="start from the raw weights instead of the EMA")
    p.add_argument("--hidden", type=positive_int, default=None, help="head width (default: pooled feature size)")
    p.add_argument("--labels-per-class", type=positive_int, default=None, metavar="N",
                   help="finetune on a seeded, class-balanced subset of N labelled training images per class "
                        "(default: every one); evaluation still uses the whole test split")
    p.add_argument("--labels-seed", type=nonnegative_int, default=None,
                   help="seed of that subset (default: --seed); written to metrics.json")
    add_run_arguments(p)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--head-lr", type=float, default=None, help="peak learning rate of the head (default: --lr)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay, help=f"AdamW (default {d.weight_decay:g})")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule, help="after the warm-up")
    p.add_argument("--min-lr", type=nonnegative_float, default=d.min_lr, help="cosine floor, fraction of the peak")
    p.add_argument("--grad-clip", type=nonnegative_float, default=d.grad_clip, help="max gradient norm, 0 disables")
    p.add_argument("--fm-eps", type=nonnegative_float, default=d.fm_eps, help="t ~ U(eps, 1) in the beta term")
    p.add_argument("--ckpt-every", type=positive_int, default=d.ckpt_every, help=f"(default {d.ckpt_every})")
    p.add_argument("--log-every", type=positive_int, default=d.log_every, help=f"(default {d.log_every})")
    p.add_argument("--eval-every", type=nonnegative_int, default=d.eval_every,
                   help="test top-1 every N steps into log.csv (default 0: only at the end)")
    p.add_argument("--eval-batch-size", type=positive_int, default=d.eval_batch_size)
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from dataclasses import fields

    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    finetune(config)
    return 0


def add_evaluate(subparsers) -> None:
    from .cli import positive_int

    p = subparsers.add_parser(
        "evaluate", help="test top-1 of a finetuned checkpoint, with any ODE step count",
        description="Re-evaluate a finetuned PRG classifier on the test split of DATA, with the step count and "
                    "solver it was trained with or others (the step-invariance check). Writes metrics.json into "
                    "--out (default: CHECKPOINT_DIR/evaluate-METHOD-K) and prints it.")
    p.add_argument("--data", required=True, metavar="DATA", help="digits | cifar10:PATH | folder:PATH")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="finetuning run directory (or its checkpoint.pt)")
    _solver_arguments(p, None, None, "default: those it was trained with")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--out", default=None, metavar="DIR", help="where metrics.json goes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    ckpt = load_finetune_checkpoint(args.checkpoint)  # fail early, and learn the defaults for --out
    out = args.out
    if out is None:
        c = ckpt["classifier"]
        folder = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
        out = os.path.join(folder, f"evaluate-{args.method or c['method']}-{args.ode_steps or c['steps']}")
    metrics = evaluate(args.checkpoint, args.data, ode_steps=args.ode_steps, method=args.method,
                       batch_size=args.batch_size, device=args.device, progress=args.progress, out=out)
    print(json.dumps(metrics))
    print(f"prg-fast evaluate: top-1 {metrics['top1']:.4f} ({metrics['correct']}/{metrics['test_size']}) with "
          f"{metrics['ode_steps']} {metrics['method']} steps; wrote {out}/metrics.json", file=sys.stderr)
    return 0


def add_extract(subparsers) -> None:
    from .cli import positive_int

    p = subparsers.add_parser(
        "extract", help="features along the reversed trajectory (train and test splits) into an .npz file",
        description="Reverse every image of both splits of DATA with a checkpoint's flow (a pretraining checkpoint: "
                    "its EMA weights; a finetuning checkpoint: its finetuned flow) and write the states at --t (or "
                    "--save-at) with the labels to FILE.npz (arrays train_features, train_labels, test_features, "
                    "test_labels, feature_shape, classes, meta). --probe adds linear-probe and k-NN top-1.")
    p.add_argument("--data", required=True, metavar="DATA", help="digits | cifar10:PATH | folder:PATH")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="pretraining or finetuning run directory")
    p.add_argument("--t", type=_time_arg, default=None, help="feature time (default 1, or the finetuned t)")
    p.add_argument("--t0", type=_time_arg, default=None, help="start time; the image is the state there (default 0)")
    p.add_argument("--save-at", type=_times_arg, default=None, metavar="T1,T2,...",
                   help="several feature times, concatenated on the channel dim")
    _solver_arguments(p, None, None, "default 20 euler, or those a finetuned checkpoint was trained with")
    p.add_argument("--raw-weights", action="store_true", help="pretraining checkpoint: raw weights instead of EMA")
    p.add_argument("--out", required=True, metavar="FILE.npz")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--probe", action="store_true", help="also run a linear probe and k-NN on the features")
    p.add_argument("--knn-k", type=positive_int, default=20)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_extract)


def run_extract(args) -> int:
    meta = extract(args.checkpoint, args.data, args.out, t=args.t, t0=args.t0, save_at=args.save_at,
                   ode_steps=args.ode_steps, method=args.method, raw_weights=args.raw_weights,
                   batch_size=args.batch_size, device=args.device, progress=args.progress, probe=args.probe,
                   knn_k=args.knn_k)
    print(json.dumps(meta))
    msg = f"wrote {args.out}: {meta['n_train']} train / {meta['n_test']} test features of shape {meta['feature_shape']}"
    if args.probe:
        msg += f"; linear probe top-1 {meta['linear_probe_top1']:.4f}, {meta['knn_k']}-NN top-1 {meta['knn_top1']:.4f}"
    print(f"prg-fast extract: {msg}", file=sys.stderr)
    return 0
