"""Flow-matching pretraining (`prg-fast pretrain`): a velocity network learns the path's target
velocity on an image data set; one process, or many under torchrun (DistributedDataParallel). The
network is a UNet preset or any nn.Module called as model(t, x) (pretrain(model=...)). The EMA is
torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn at the ramped decay; the warm-up is
torch's LambdaLR; both give bitwise the numbers of the hand-written versions of the first release
(python_tests/test_runs.py resumes run directories that release wrote).

Run directory (--out DIR; the skeleton's, prg_fast.training.trainer): metrics.json has loss (mean over
the last log interval), loss_start (the first step's loss), images_per_s, ...; log.csv rows are step,
loss, lr; DIR/samples.png is a grid drawn with prg_fast.generate from the EMA weights at the end.

Checkpoint entries (format "prg_fast.pretrain", version 1; read it with `load_checkpoint` and
rebuild the network with `build_model`), besides the skeleton's:
    model           state_dict of the velocity network (unwrapped: no DDP "module." prefix)
    ema             state_dict of the EMA of the weights (same keys): what sampling and finetuning use
    optimizer       torch.optim state_dict (Adam or AdamW, per args["optimizer"])
    model_config    dict: prg_fast.models.UNet(**model_config) rebuilds the architecture (None for a
                    network prg_fast did not build; it then also holds model_class and time_convention)
    preset          UNet preset name ("tiny", "cifar", "prg32"), or the package.module:factory used
    in_channels     image channels the network reads
    image_size      image height (= width)
    path            dict: {"name": "gvp" | "icfm" | "otcfm", "sigma": float}; prg_fast.paths.get_path(**path)
    data            the DATA spec trained on ("digits", "cifar10:PATH", "folder:PATH")
    num_classes     classes in that data set (for a classifier head)
    running         {"sum": float, "count": int, "first": float}: the loss interval in progress (exact
                    log on resume) and the first step's loss

Randomness: the data order is a function of (seed, epoch) through DistributedSampler; t, noise,
augmentation and dropout come from the global RNGs, seeded per rank and saved in the checkpoint, so
a resumed run reproduces an uninterrupted one exactly (same arguments, same world size, same device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..data import ImageData
from ..losses import PREDICTIONS, flow_matching_loss, prediction_weighting
from ..models import UNet
from ..models.unet import PRESETS
from ..ode import generate
from ..ode.solvers import get_tableau
from ..paths import PATHS, get_path
from .checkpoints import PRETRAIN_FORMAT, PRETRAIN_KEYS, PRETRAIN_VERSION, build_model, load_checkpoint
from .distributed import Dist, run_on_ranks, wrap_ddp
from .flows import (check_flow, check_model_reads, foreign_model_entries, import_factory, is_factory_spec,
                    prg_velocity)
from .rundir import CheckpointError, atomic_write
from .runs import load_train_data
from .trainer import Result, RunOptions, Schedule, TrainConfig, Trainer, configure, one_of, ranged

# load_checkpoint and build_model live in checkpoints.py; they stay
# importable from here, where they were first
__all__ = ["PretrainConfig", "pretrain", "load_checkpoint", "build_model", "CheckpointError", "save_image_grid"]

# arguments that define what a checkpoint is; resuming with different values is refused
RESUME_MUST_MATCH = ("data", "path", "sigma", "model", "dropout", "batch_size", "optimizer")


@dataclass
class PretrainConfig(TrainConfig):
    """Arguments of `prg-fast pretrain` (the command line maps one flag to each field)."""

    path: str = one_of("otcfm", PATHS)
    prediction: str = "velocity"  # what the UNet predicts: the path's velocity, or epsilon / v (diffusion-style)
    model: str = "tiny"  # a UNet preset, or "package.module:factory" (bring your own flow)
    steps: int = 2000
    out: str = "runs/pretrain"
    sigma: float = ranged(0.0, 0.0)
    lr: float = ranged(2e-4, 0.0, 1.0, lo_open=True)
    optimizer: str = one_of("adam", ("adam", "adamw"))
    weight_decay: float = ranged(0.0, 0.0, 10.0)
    warmup: int = ranged(500, 0)  # linear learning-rate warm-up steps (torchcfm's CIFAR recipe uses 5000)
    grad_clip: float = ranged(1.0, 0.0)  # max global gradient norm; 0 disables
    ema_decay: float = ranged(0.9999, 0.0, 1.0)  # decay min(ema_decay, (1 + n) / (10 + n)) at step n
    crop_padding: int = ranged(0, 0)
    dropout: Optional[float] = ranged(None, 0.0, 0.99)  # None: the preset's
    eps: float = ranged(1e-5, 0.0, 0.5)  # t ~ U(eps, 1)
    ckpt_every: int = 1000
    log_every: int = 50
    bf16: bool = False  # bf16 autocast (CUDA only)
    num_samples: int = ranged(64, 1)
    sample_steps: int = ranged(20, 1)
    sample_method: str = "rk4"

    def validate(self) -> "PretrainConfig":
        self.check_run_fields()
        if self.prediction not in PREDICTIONS or (self.prediction != "velocity" and self.sigma):
            raise ValueError(f"prediction must be one of {PREDICTIONS} (epsilon / v with sigma = 0), got "
                             f"{self.prediction!r} with sigma={self.sigma!r}")
        if self.path == "gvp" and self.sigma:
            raise ValueError(f"sigma is not used by the GVP path; got sigma={self.sigma!r}")
        if self.model not in PRESETS and not is_factory_spec(self.model):
            raise ValueError(f"model must be a UNet preset, one of {sorted(PRESETS)}, or package.module:factory (a "
                             f"callable returning a velocity network), got {self.model!r}")
        get_tableau(self.sample_method)  # raises with the list of methods
        return self


# -------------------------------------------------------------------------------------------------
# training


def pretrain(config: Optional[PretrainConfig] = None, *, model: Optional[torch.nn.Module] = None,
             time_convention: str = "prg", **kwargs) -> Result:
    """Train (or resume training of) a velocity network by flow matching; see the module doc. The
    Result's networks: model (the trained network, unwrapped) and ema (its EMA weights).
    Call with a PretrainConfig or with its fields as keyword arguments (and RunOptions' fields:
    ckpt_minutes, force). Every process of a torchrun job calls it; only rank 0 writes files.

    Bring your own flow: `model` is any nn.Module called as model(t, x) (else config.model names a
    UNet preset or a "package.module:factory" that returns one); with time_convention="torchcfm"
    (t = 0 is noise) it is trained through prg_fast.time_reversed, so it stays in its own convention.
    Its checkpoint then has model_config None: rebuild it with build_model(ckpt, model=...)."""
    if isinstance(model, str):  # the config's own field `model` (a UNet preset name), not a network
        kwargs["model"], model = model, None
    cfg, options = configure(PretrainConfig, config, kwargs)
    if model is None and is_factory_spec(cfg.model):
        model = import_factory(cfg.model)()
    check_flow(model, time_convention)
    return run_on_ranks(lambda ctx: _Pretrainer(cfg, ctx, options, model, time_convention).run(), cfg.device)


class _Pretrainer(Trainer):
    log_header = ("step", "loss", "lr")
    must_match = RESUME_MUST_MATCH

    def __init__(self, cfg: PretrainConfig, ctx: Dist, options: RunOptions,
                 user_model: Optional[torch.nn.Module] = None, time_convention: str = "prg"):
        self.bar_desc = f"pretrain {cfg.model}/{cfg.path}"
        if cfg.bf16 and ctx.device.type != "cuda":
            raise ValueError("bf16 autocast is for CUDA devices; this run is on the CPU (drop --bf16)")
        existing = self.open_run(cfg, ctx, options, PRETRAIN_FORMAT, PRETRAIN_VERSION, "pretrain",
                                 "pretraining", PRETRAIN_KEYS)
        self.data: ImageData = load_train_data(cfg.data, cfg.hflip, cfg.crop_padding)
        c, h, w = self.data.shape
        if h != w and user_model is None:
            raise ValueError(f"the UNet presets need square images; {cfg.data} has {h}x{w}")
        self._indices = self.step_batches(self.data)
        self.path = get_path(cfg.path, cfg.sigma)
        if cfg.prediction != "velocity" and user_model is not None:
            raise ValueError("prediction epsilon / v is for the UNet presets; a network of your own returns a velocity")
        self.user_model, self.time_convention, self._given = user_model is not None, time_convention, user_model
        self.begin(existing)
        self.net = wrap_ddp(self.model, ctx)
        self.velocity = prg_velocity(self.net, time_convention)  # what the loss trains, in prg_fast's time

    def build(self) -> None:
        cfg, (c, h, _) = self.cfg, self.data.shape
        overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
        if cfg.prediction != "velocity":  # the UNet converts its prediction to the velocity itself
            overrides.update(prediction=cfg.prediction, prediction_path=cfg.path)
        if self._given is None:
            self.model = UNet.preset(cfg.model, in_channels=c, image_size=h, **overrides).to(self.device)
        else:
            self.model = self._given.to(self.device)
            check_model_reads(self.model, self.data.shape, cfg.data, self.device)
        # the copy of the initial weights counts as one average (n_averaged = 1), so the first update
        # already averages (decay 0.1 at step 0) instead of AveragedModel's plain copy
        self.averaged = AveragedModel(self.model, multi_avg_fn=self._ema_step)
        self.averaged.n_averaged.fill_(1)
        self.ema = self.averaged.module.requires_grad_(False).eval()
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.running = [0.0, 0]

    def lr_schedules(self):
        # a warm-up, then the peak (pretraining has no decay)
        return [Schedule(self.opt, self.cfg.lr, self.cfg.steps, self.cfg.warmup, kind="constant")]

    # -- checkpoint entries -------------------------------------------------------------------
    def load_state(self, ckpt: Dict[str, Any]) -> None:
        where = self.files.ckpt_path
        if ckpt["model_config"] != self._model_config():
            raise CheckpointError(f"{where} holds a network of another shape ({ckpt['model_config']}) than this run "
                                  f"builds ({self._model_config()}); did the data change? Use a new --out")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        running = ckpt.get("running") or {"sum": 0.0, "count": 0}
        self.running = [float(running["sum"]), int(running["count"])]
        self.continue_window([self.running[0] * self.ctx.world], self.running[1])
        history = ckpt["history"]
        self.loss_first = running.get("first", history[0][1] if history else None)
        self.averaged.n_averaged.fill_(int(ckpt["step"]) + 1)

    def state(self) -> Dict[str, Any]:
        cfg = self.cfg
        own = foreign_model_entries(self.model, self.time_convention) if self.user_model else {}
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "model_config": self._model_config(),
                "preset": cfg.model if not self.user_model or is_factory_spec(cfg.model) else None,
                "in_channels": self.data.shape[0], "image_size": self.data.shape[1],
                "path": {"name": cfg.path, "sigma": float(cfg.sigma)}, "data": cfg.data,
                "num_classes": self.data.num_classes,
                "running": {"sum": self.running[0], "count": self.running[1], "first": self.loss_first}, **own}

    # -- helpers ----------------------------------------------------------------------------------
    def _model_config(self) -> Optional[Dict[str, Any]]:
        return None if self.user_model else dict(self.model.config)

    def _ema_step(self, ema_params, params, n_averaged) -> None:
        # the (1 + n) / (10 + n) ramp at 0-based step n = n_averaged - 1 lets the average follow the
        # fast early changes; without it a 0.9999 average of a short run would still be mostly the
        # random initial weights
        n = int(n_averaged) - 1
        get_ema_multi_avg_fn(min(self.cfg.ema_decay, (1 + n) / (10 + n)))(ema_params, params, n_averaged)

    @torch.no_grad()
    def _update_ema(self) -> None:
        self.averaged.update_parameters(self.model)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # -- the step -----------------------------------------------------------------------------------
    def run(self) -> Result:
        cfg = self.cfg
        if self.step < cfg.steps and cfg.warmup > cfg.steps:
            # the warm-up is a fixed step count, not a fraction of the run: say so rather than let a
            # short run train quietly below the learning rate it was given
            peak = cfg.lr * self.schedules[0][1].lr_lambdas[0](cfg.steps - 1)
            self.files.say(f"note: warm-up ({cfg.warmup} steps) is longer than the run ({cfg.steps} steps); the "
                           f"learning rate peaks at {peak:.3g}, not --lr {cfg.lr:g} (use --warmup to shorten it)")
        self.model.train()
        metrics = super().run()
        return Result(metrics, cfg.out, self.step, self.history, {"model": self.model, "ema": self.ema})

    def train_step(self, step: int) -> torch.Tensor:
        x, _ = self.data.batch(self._indices(step), device=self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            loss = flow_matching_loss(self.velocity, x, self.path, eps=self.cfg.eps,
                                      weighting=prediction_weighting(self.path, self.cfg.prediction))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        self.record(loss.reshape(1))
        return loss.detach()

    def flush(self, step: int, row: bool, bar) -> None:
        (loss_sum,), steps = self.take_window(step, end=row)
        self.running = [loss_sum / self.ctx.world, steps]  # every rank's loss, averaged: the global batch's
        if row:
            mean = self.running[0] / max(self.running[1], 1)
            self.history.append([step, mean, self.lr])
            self.running = [0.0, 0]
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)

    def finish(self, start_step: int, elapsed: float) -> Dict[str, Any]:
        cfg = self.cfg
        metrics: Dict[str, Any] = {
            "loss": self.history[-1][1] if self.history else float("nan"),
            "loss_start": self.loss_first if self.loss_first is not None else float("nan"),
            **self.timing(start_step, elapsed),
            "num_params": sum(p.numel() for p in self.model.parameters()),
        }
        if not self.ctx.main:
            return metrics
        samples = self.sample(cfg.num_samples)
        atomic_write(self.files.path("samples.png"), lambda f: save_image_grid(samples, f))
        return self.write_metrics(metrics, f"step {self.step}: loss {metrics['loss']:.4f} (first step "
                                           f"{metrics['loss_start']:.4f}); wrote {cfg.out}/checkpoint.pt, "
                                           f"metrics.json, samples.png")

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n samples from the EMA network: noise from a generator seeded by the run's seed (the
        same grid for the same weights), integrated t = 1 -> 0 with prg_fast.generate."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        z = torch.randn((n, *self.data.shape), generator=gen).to(self.device)
        images = generate(prg_velocity(self.ema, self.time_convention), z, steps=self.cfg.sample_steps,
                          method=self.cfg.sample_method)
        return images.clamp(-1, 1).cpu()


def save_image_grid(images: torch.Tensor, file, *, nrow: Optional[int] = None, min_size: int = 32) -> None:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (a path or a binary file object).
    Images smaller than `min_size` pixels are enlarged (nearest neighbour) so 8x8 digits stay visible."""
    from einops import rearrange
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pad = torch.full((rows * nrow - n, *x.shape[1:]), 255, dtype=torch.uint8)
    x = torch.nn.functional.pad(torch.cat([x, pad]), (1, 1, 1, 1), value=255)  # white 1-pixel border
    grid = rearrange(x, "(r c) ch h w -> (r h) (c w) ch", c=nrow).numpy()
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, math.ceil(min_size / images.shape[-1]))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(file, format="PNG")
