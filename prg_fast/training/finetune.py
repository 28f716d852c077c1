"""PRG finetuning (`prg-fast finetune`, docs/cli.md). Re-evaluation and feature extraction
(`prg-fast evaluate` / `extract`) are in prg_fast.training.evaluate, the checkpoint's reading and
rebuilding in prg_fast.training.checkpoints (both still importable from here).

Finetuning loads a pretraining checkpoint (EMA weights by default; or `weights`, a pretrained flow's
published weights file, prg_fast.training.checkpoints.save_flow_weights), puts a ClassifierHead on the end
state of the reversed trajectory (PRGClassifier: reverse from t0 to t, then the head) and trains
head and flow jointly through prg_fast's exact adjoint with

    loss = cross_entropy(logits, y; label_smoothing) + beta * flow_matching_loss(flow, x, path)

on the same batch (the paper's objective; beta = 0 is the released code's cross-entropy only).
AdamW, linear warm-up then cosine decay or constant (torch's LambdaLR); --freeze-flow trains the
head only (the flow runs without a graph), --from-scratch trains the same architecture without
pretraining. `val_size` holds out that many training images (stratified, drawn by the seed:
prg_fast.data.validation_split) before any labelled subset is drawn and reports their top-1 as
val_top1. One process, or many under torchrun (DistributedDataParallel; the test split is
classified in shards, one per process), on the skeleton of prg_fast.training.trainer. Any
nn.Module called as model(t, x) can be the flow (finetune(model=...), see `finetune`).

Run directory (--out DIR; the skeleton's, prg_fast.training.trainer): metrics.json has top1 (test
split, at the training step count), loss, ce, fm, train_top1, ...; log.csv rows are step, loss, ce,
fm, train_top1, lr (and test top1 where evaluated).

Checkpoint entries (format "prg_fast.finetune", version 1; read it with `load_finetune_checkpoint`,
rebuild the classifier with `build_classifier`), besides the skeleton's: flow (velocity network
state_dict), head (ClassifierHead state_dict), optimizer, model_config (UNet(**model_config)),
head_config (ClassifierHead(**head_config)), preset, in_channels, image_size, path ({"name",
"sigma"} or None), data, num_classes, classes, classifier ({"t0", "t", "save_at", "steps",
"method"}: with --learn-t the learned values at that step), segment (the raw time parameters of a
learned segment, else absent), pretrain ({"checkpoint", "step", "weights"} or None for
--from-scratch without one), running, loss_first (the first step's loss), top1 (None until the run
finished).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classifier import PRGClassifier, check_segment, feature_shape
from ..data import ImageData, class_balanced_subset, load_data, validation_split
from ..losses import flow_matching_loss
from ..models import UNet
from ..models.heads import ClassifierHead
from ..models.unet import PRESETS
from ..ode.solvers import get_tableau
from ..paths import PATHS, get_path
from .checkpoints import (FINETUNE_FORMAT, FINETUNE_VERSION, REQUIRED_KEYS, build_classifier, build_model,
                          check_data_fits, load_finetune_checkpoint, load_model_checkpoint)
from .distributed import Dist, run_on_ranks, wrap_ddp
from .evaluate import evaluate, extract, sharded_correct
from .flows import check_flow, check_model_reads, foreign_model_entries, prg_velocity
from .rundir import CheckpointError, checkpoint_file
from .runs import load_train_data
from .trainer import Result, RunOptions, Schedule, TrainConfig, Trainer, configure, one_of, ranged

# evaluate, extract, load_finetune_checkpoint, build_classifier and the format constants live in
# evaluate.py / checkpoints.py; they stay importable from here, where they were first
__all__ = ["FinetuneConfig", "finetune", "evaluate", "extract", "load_finetune_checkpoint",
           "build_classifier", "FINETUNE_FORMAT", "FINETUNE_VERSION"]

# arguments that define what a finetuning run is; resuming with other values is refused
RESUME_MUST_MATCH = ("data", "checkpoint", "weights", "val_size", "t0", "t", "learn_t", "learn_t0", "save_at",
                     "ode_steps", "method", "batch_size", "beta", "label_smoothing", "freeze_flow", "from_scratch",
                     "model", "path", "hidden", "raw_weights", "labels_per_class", "labels_seed")


@dataclass
class FinetuneConfig(TrainConfig):
    """Arguments of `prg-fast finetune` (the command line maps one flag to each field)."""

    checkpoint: Optional[str] = None  # pretraining checkpoint (file or run directory)
    weights: Optional[str] = None  # or a pretrained flow's published weights (prg_fast.flow file)
    out: str = "runs/finetune"
    steps: int = 1000
    ode_steps: int = ranged(20, 1)
    method: str = "euler"  # the released code's solver
    t0: float = 0.0  # t0, t and save_at: checked by classifier.check_segment
    t: float = 1.0
    save_at: Optional[List[float]] = None  # several feature times, concatenated on the channel dim
    beta: float = ranged(0.0, 0.0, 1e6)  # weight of the flow-matching term (paper: > 0; released code: 0)
    label_smoothing: float = ranged(0.1, 0.0, 1.0, hi_open=True)
    lr: float = ranged(1e-3, 0.0, 1.0, lo_open=True)
    head_lr: Optional[float] = ranged(None, 0.0, 1.0, lo_open=True)  # None: lr
    weight_decay: float = ranged(0.05, 0.0, 10.0)
    warmup: Optional[int] = ranged(None, 0)  # linear warm-up steps; None: 5% of --steps
    schedule: str = one_of("cosine", ("cosine", "constant"))  # after the warm-up
    min_lr: float = ranged(0.0, 0.0, 1.0)  # cosine floor, as a fraction of the peak
    grad_clip: float = ranged(1.0, 0.0, 1e12)  # max global gradient norm; 0 disables
    freeze_flow: bool = False  # train the head only
    from_scratch: bool = False  # same architecture, random initial weights
    model: Optional[str] = one_of(None, PRESETS)  # UNet preset for --from-scratch without --checkpoint
    path: Optional[str] = one_of(None, PATHS)  # flow-matching path for beta > 0 (default: the checkpoint's)
    raw_weights: bool = False  # start from the checkpoint's raw weights instead of its EMA
    hidden: Optional[int] = ranged(None, 1)  # head width (None: the pooled feature size, as in PRG)
    learn_t: bool = False  # learn the end time t with the flow and head (PRGClassifier(learn_t=True))
    learn_t0: bool = False  # learn the start time t0 too
    t_lr: float = ranged(0.05, 0.0, 10.0, lo_open=True)  # peak lr of the raw time parameters; no decay
    labels_per_class: Optional[int] = ranged(None, 1)  # finetune on N labelled images per class (None: all)
    labels_seed: Optional[int] = ranged(None, 0)  # seed of that class-balanced subset (None: seed)
    val_size: int = ranged(0, 0)  # hold out this many training images (stratified, by seed) and report val_top1
    crop_padding: int = ranged(0, 0)
    fm_eps: float = ranged(1e-5, 0.0, 0.5)
    ckpt_every: int = 500
    log_every: int = 25
    eval_every: int = ranged(0, 0)  # test top-1 every N steps (0: only at the end)
    eval_batch_size: int = ranged(256, 1)
    memory_budget: Any = "auto"  # the adjoint's (prg_fast.reverse): "auto", None (recompute all) or bytes

    def validate(self, external_model: bool = False) -> "FinetuneConfig":
        """Check and normalise the fields; `external_model`: the caller brings the flow network
        (finetune(model=...)), so neither a checkpoint nor a preset is needed."""
        self.check_run_fields()
        self.t0, self.t, save_at = check_segment(self.t0, self.t, self.save_at, learned=self.learn_t or self.learn_t0)
        self.save_at = None if save_at is None else list(save_at)
        get_tableau(self.method)
        if self.freeze_flow and self.from_scratch:
            raise ValueError("freeze_flow with from_scratch would train a head on an untrained, frozen flow; "
                             "choose one of them")
        if self.checkpoint is not None and self.weights is not None:
            raise ValueError("give the pretrained flow once: --checkpoint (a pretraining run) or --weights (a flow "
                             "weights file), not both")
        if self.weights is not None:
            if not isinstance(self.weights, str) or not self.weights:
                raise ValueError(f"weights must be a file path, got {self.weights!r}")
            self.weights = os.path.abspath(os.path.expanduser(self.weights))
        if self.pretrained is None and not self.from_scratch and not external_model:
            raise ValueError("finetune needs --checkpoint (a pretraining run directory or checkpoint.pt) or --weights "
                             "(a pretrained flow's weights file); only --from-scratch runs without one")
        if self.checkpoint is not None:
            self.checkpoint = self.pretrained_checkpoint("finetune")
        if self.model is not None:
            if external_model:
                raise ValueError("model (a UNet preset) and a network passed as model= exclude each other")
            if self.pretrained is not None:
                raise ValueError("model (a UNet preset) is only for --from-scratch without --checkpoint / --weights; "
                                 "with a pretrained flow the architecture is its own")
        elif self.pretrained is None and not external_model:
            raise ValueError("--from-scratch without --checkpoint needs --model PRESET for the architecture")
        return self

    @property
    def pretrained(self) -> Optional[str]:
        """The pretrained flow's file or run directory: --checkpoint or --weights (None: neither)."""
        return self.checkpoint if self.checkpoint is not None else self.weights

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else int(round(0.05 * self.steps))


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


def finetune(config: Optional[FinetuneConfig] = None, *, model: Optional[nn.Module] = None,
             time_convention: str = "prg", **kwargs) -> Result:
    """Finetune (or resume finetuning) a PRG classifier (the Result's network: classifier, the
    finetuned PRGClassifier, unwrapped); see the module doc. Call with a
    FinetuneConfig or with its fields as keyword arguments. Every process of a torchrun job calls
    it; only rank 0 writes files.

    Bring your own flow: `model` is any nn.Module called as model(t, x), with its own weights (or,
    with config.checkpoint, those of a pretraining run of that network); time_convention="torchcfm"
    (t = 0 is noise) puts it behind prg_fast.time_reversed. Its checkpoint has model_config None:
    rebuild with build_classifier(ckpt, model=...)."""
    if isinstance(model, str):  # the config's own field `model` (a UNet preset name), not a network
        kwargs["model"], model = model, None
    check_flow(model, time_convention)
    cfg, options = configure(FinetuneConfig, config, kwargs, external_model=model is not None)
    return run_on_ranks(lambda ctx: _Finetuner(cfg, ctx, options, model, time_convention).run(), cfg.device)


class _Finetuner(Trainer):
    log_header = ("step", "loss", "ce", "fm", "train_top1", "lr", "test_top1")
    must_match = RESUME_MUST_MATCH

    def __init__(self, cfg: FinetuneConfig, ctx: Dist, options: RunOptions, user_model: Optional[nn.Module] = None,
                 time_convention: str = "prg"):
        existing = self.open_run(cfg, ctx, options, FINETUNE_FORMAT, FINETUNE_VERSION, "finetune", "finetuning",
                                 REQUIRED_KEYS)
        self.data: ImageData = load_train_data(cfg.data, cfg.hflip, cfg.crop_padding)
        self.val: Optional[ImageData] = None
        if cfg.val_size:  # carved out first, so the labelled images never include a validation image
            train_idx, val_idx = validation_split(self.data.labels, cfg.val_size, cfg.seed, self.data.num_classes)
            self.val = load_data(cfg.data, "train", augment=None).subset(val_idx)
            self.data = self.data.subset(train_idx)
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
        self._indices = self.step_batches(self.data)
        self._given, self.time_convention = user_model, time_convention
        self.begin(existing)
        self.module = _FinetuneNet(self.classifier, self.path, self.beta, cfg.label_smoothing, cfg.fm_eps)
        self.net = wrap_ddp(self.module, ctx)
        self.params = [p for p in self.classifier.parameters() if p.requires_grad]
        mode = "head only" if cfg.freeze_flow else ("from scratch" if cfg.from_scratch else "PRG")
        self.bar_desc = f"finetune ({mode})"

    def build(self) -> None:
        """The classifier (the head, and a scratch flow, initialised alike on every rank) and AdamW."""
        cfg = self.cfg
        flow = self._build_flow(self._given, self.time_convention)
        self.beta = 0.0 if cfg.freeze_flow else cfg.beta  # a frozen flow gets nothing from the FM term
        head = ClassifierHead(feature_shape(self.data.shape, cfg.save_at), self.data.num_classes, hidden=cfg.hidden)
        self.classifier = PRGClassifier(flow, head, t=cfg.t, t0=cfg.t0, steps=cfg.ode_steps, method=cfg.method,
                                        save_at=cfg.save_at, learn_t=cfg.learn_t, learn_t0=cfg.learn_t0,
                                        memory_budget=cfg.memory_budget).to(self.device)
        if cfg.freeze_flow:
            self.classifier.flow.requires_grad_(False)
        groups = [{"params": list(self.classifier.head.parameters()), "lr": cfg.head_lr or cfg.lr, "name": "head"}]
        if not cfg.freeze_flow:
            groups.append({"params": list(self.classifier.flow.parameters()), "lr": cfg.lr, "name": "flow"})
        segment = self.segment_params()
        if segment:
            # logits of the segment's ends: their own step size, and no decay (it would pull t to 1/2)
            groups.append({"params": list(segment.values()), "lr": cfg.t_lr, "weight_decay": 0.0, "name": "time"})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.running = [0.0, 0.0, 0.0, 0.0, 0]

    def lr_schedules(self):
        cfg = self.cfg
        return [Schedule(self.opt, cfg.lr, cfg.steps, cfg.warmup_steps, kind=cfg.schedule, floor=cfg.min_lr,
                         peaks={"head": cfg.head_lr or cfg.lr, "time": cfg.t_lr})]

    def _build_flow(self, user_model: Optional[nn.Module], time_convention: str) -> nn.Module:
        """The flow: pretrained weights (EMA by default), or the same architecture freshly
        initialised, with the flow-matching path; seen in prg_fast's time convention."""
        cfg, (c, h, w) = self.cfg, self.data.shape
        self.pretrain_info = None
        path_name, sigma = cfg.path, 0.0
        if cfg.pretrained is not None:
            # --checkpoint: a pretraining run; --weights: a published flow file (or a pretraining checkpoint)
            kinds = ("pretrain", "flow") if cfg.checkpoint is not None else ("flow", "pretrain")
            pre = load_model_checkpoint(cfg.pretrained, kinds)[1]
            check_data_fits(self.data, pre, checkpoint_file(cfg.pretrained), "was pretrained on")
            if user_model is not None and pre.get("time_convention", time_convention) != time_convention:
                raise ValueError(f"{cfg.pretrained} trained its network with time_convention="
                                 f"{pre['time_convention']!r}, not {time_convention!r}")
            if cfg.from_scratch:  # the same architecture, freshly initialised
                flow = build_model(pre, model=user_model, fresh=True)
            else:
                flow = build_model(pre, ema=not cfg.raw_weights, model=user_model)
                self.pretrain_info = {"checkpoint": cfg.pretrained, "step": int(pre["step"]),
                                      "weights": "raw" if cfg.raw_weights else "ema"}
            self.preset = pre.get("preset")
            if path_name is None:
                path_name, sigma = pre["path"]["name"], float(pre["path"].get("sigma", 0.0))
        elif user_model is not None:
            flow, self.preset = user_model, None
            check_model_reads(flow, self.data.shape, cfg.data, "cpu")
        else:
            flow = UNet.preset(cfg.model, in_channels=c, image_size=h)
            self.preset = cfg.model
        # the network as trained and saved; the classifier sees it in prg_fast's time convention
        self.flow_module, self.user_model, self.time_convention = flow, user_model is not None, time_convention
        if h != w and not self.user_model:
            raise ValueError(f"the UNet presets need square images; {cfg.data} has {h}x{w}")
        self.path_cfg = {"name": path_name or "otcfm", "sigma": sigma}
        self.path = get_path(self.path_cfg["name"], self.path_cfg["sigma"])
        return prg_velocity(flow, time_convention)

    def segment_params(self) -> Dict[str, torch.nn.Parameter]:
        """The learned segment's raw time parameters (t_raw, t0_raw), by name; empty when fixed."""
        return {name: getattr(self.classifier, name) for name in ("t_raw", "t0_raw") if hasattr(self.classifier, name)}

    # -- checkpoint entries -------------------------------------------------------------------
    def load_state(self, ckpt: Dict[str, Any]) -> None:
        cfg, where = self.cfg, self.files.ckpt_path
        segment = self.segment_params()
        saved_segment = ckpt.get("segment") or {}
        if sorted(segment) != sorted(saved_segment):
            raise CheckpointError(f"{where} was written with learned time parameters {sorted(saved_segment) or 'none'}, "
                                  f"but this run learns {sorted(segment) or 'none'} (learn_t={cfg.learn_t}, "
                                  f"learn_t0={cfg.learn_t0}); resume with the same arguments or use a new --out")
        self.flow_module.load_state_dict(ckpt["flow"])
        self.classifier.head.load_state_dict(ckpt["head"])
        with torch.no_grad():
            for name, param in segment.items():
                param.copy_(saved_segment[name])
        self.opt.load_state_dict(ckpt["optimizer"])
        for group in self.opt.param_groups:  # the saved groups carry the old run's settings: use this run's
            group["weight_decay"] = 0.0 if group.get("name") == "time" else cfg.weight_decay
        running = ckpt.get("running") or [0.0, 0.0, 0.0, 0.0, 0]
        self.running = [float(v) for v in running[:4]] + [int(running[4])]
        world = self.ctx.world
        self.continue_window([v * world for v in self.running[:3]] + [self.running[3]], self.running[4])
        history = ckpt["history"]
        self.loss_first = ckpt.get("loss_first", history[0][1] if history else None)
        if ckpt.get("pretrain") is not None:
            self.pretrain_info = ckpt["pretrain"]

    def state(self) -> Dict[str, Any]:
        clf = self.classifier
        own = foreign_model_entries(self.flow_module, self.time_convention) if self.user_model else {}
        segment = self.segment_params()
        return {"flow": self.flow_module.state_dict(), "head": clf.head.state_dict(),
                "optimizer": self.opt.state_dict(),
                "model_config": None if self.user_model else dict(self.flow_module.config),
                "head_config": dict(clf.head.config), "preset": self.preset, "in_channels": self.data.shape[0],
                "image_size": self.data.shape[1], "path": dict(self.path_cfg), "data": self.cfg.data,
                "num_classes": self.data.num_classes, "classes": list(self.data.classes),
                "classifier": {"t0": clf.t0, "t": clf.t, "save_at": list(clf.save_at) if clf.save_at else None,
                               "steps": clf.steps, "method": clf.method},
                **({"segment": {k: v.detach().clone() for k, v in segment.items()}} if segment else {}),
                "pretrain": self.pretrain_info, "running": list(self.running), "loss_first": self.loss_first,
                "top1": None, **own}

    # -- helpers ----------------------------------------------------------------------------------
    def test_top1(self) -> float:
        """Test top-1, each rank classifying its share of the split (counts all-reduced); the
        classifier is left in training mode."""
        correct = sharded_correct(self.classifier, self.test, self.ctx, batch_size=self.cfg.eval_batch_size)
        self._train_mode()
        return correct / max(len(self.test), 1)

    def _train_mode(self) -> None:
        self.classifier.train()
        if self.cfg.freeze_flow:
            self.classifier.flow.eval()

    def is_row(self, step: int) -> bool:
        return super().is_row(step) or bool(self.cfg.eval_every and step % self.cfg.eval_every == 0)

    # -- the step ---------------------------------------------------------------------------------
    def run(self) -> Result:
        self._train_mode()
        metrics = super().run()
        return Result(metrics, self.cfg.out, self.step, self.history, {"classifier": self.classifier})

    def train_step(self, step: int) -> torch.Tensor:
        x, y = self.data.batch(self._indices(step), device=self.device)
        loss, stats = self.net(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.record(stats)
        return stats[0]

    def flush(self, step: int, row: bool, bar) -> None:
        (loss_sum, ce_sum, fm_sum, correct), steps = self.take_window(step, end=row)
        world = self.ctx.world
        # per-rank sums of per-batch means -> divide by world; correct counts -> divide by images
        self.running = [loss_sum / world, ce_sum / world, fm_sum / world, correct, steps]
        if not row:
            return
        count = max(self.running[4], 1)
        self.history.append([step, self.running[0] / count, self.running[1] / count, self.running[2] / count,
                             self.running[3] / (count * self.cfg.batch_size), self.lr])
        self.running = [0.0, 0.0, 0.0, 0.0, 0]
        bar.set_postfix({"loss": f"{self.history[-1][1]:.4f}", "train acc": f"{self.history[-1][4]:.3f}"},
                        refresh=False)
        if self.cfg.eval_every and step % self.cfg.eval_every == 0 and step < self.cfg.steps:
            acc = self.test_top1()
            if self.ctx.main:
                self.history[-1].append(acc)
                bar.set_postfix(top1=f"{acc:.4f}", refresh=False)

    def finish(self, start_step: int, elapsed: float) -> Dict[str, Any]:
        cfg, clf = self.cfg, self.classifier
        acc = self.test_top1()
        if self.step > start_step or not os.path.isfile(self.files.ckpt_path):
            self.save(top1=acc)
        last = self.history[-1] if self.history else [self.step] + [float("nan")] * 5
        metrics: Dict[str, Any] = {
            "top1": acc,
            "test_size": len(self.test),
            "loss": last[1], "ce": last[2], "fm": last[3], "train_top1": last[4],
            "loss_start": self.loss_first if self.loss_first is not None else float("nan"),
            **self.timing(start_step, elapsed),
            "num_params_flow": sum(p.numel() for p in clf.flow.parameters()),
            "num_params_head": sum(p.numel() for p in clf.head.parameters()),
            "beta_used": self.beta,
            "fm_path": self.path_cfg["name"],
            "pretrain_step": self.pretrain_info["step"] if self.pretrain_info else None,
            "warmup_steps": cfg.warmup_steps,
            "t_final": clf.t, "t0_final": clf.t0,  # where features were read at the end (learned or fixed)
            "train_size": len(self.data),
            "labels_seed_used": self.labels_seed,
        }
        if self.val is not None:
            metrics["val_top1"] = sharded_correct(self.classifier, self.val, self.ctx,
                                                  batch_size=cfg.eval_batch_size) / len(self.val)
            metrics["val_size"] = len(self.val)
            self._train_mode()
        return self.write_metrics(
            metrics, f"step {self.step}: test top-1 {acc:.4f} ({cfg.ode_steps} {cfg.method} steps); wrote "
                     f"{cfg.out}/checkpoint.pt, metrics.json")
