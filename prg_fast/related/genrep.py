"""GenRep-style contrastive learning from generated views (Jahanian et al., "Generative Models as a
Data Source for Multiview Representation Learning", ICLR 2022) with prg_fast's pretrained flows
(`prg-fast genrep`).

The encoder never sees a real training image while it learns:

    anchor latent z ~ N(0, I) (the flow's noise end, shaped like an image),
    neighbour latents z' = z + sigma * eps, eps ~ N(0, I) truncated at +-2 per coordinate
    (so |z' - z| <= 2 sigma per coordinate; sigma default 0.2, as GenRep's BigBiGAN setting),
    both integrated noise -> data (t = 1 -> 0) with prg_fast.generate, without gradients.

As in GenRep, the views are generated offline (--pool anchors x --neighbors neighbours each, kept in
DIR/views.pt, quantised to 8 bits like real images) and each training step pairs an anchor with one
of its neighbours; --pool 0 generates fresh pairs at every step instead. Both views get the usual
SimCLR pixel augmentations (random resized crop, flip where the data set allows it, colour jitter,
grayscale for RGB), then an encoder (a CIFAR-style ResNet) with a 2-layer projection MLP is trained
with the SimCLR NT-Xent loss (temperature 0.1). Evaluation: a linear probe (logistic regression,
regularisation chosen by cross-validation on the real training split) on the encoder's pooled
features of the real training split, top-1 on the real test split -> DIR/metrics.json.

Run directory (--out DIR): the skeleton's (prg_fast.training.trainer), and DIR/views.pt (the
generated pool, atomic, reused on resume) and DIR/views.png (some anchor/neighbour pairs).
Checkpoint entries (format "prg_fast.genrep", version 1), besides the skeleton's: encoder,
encoder_config (ResNet(**encoder_config)), projector, optimizer, pretrain ({checkpoint, step, path,
preset, data}), data, loss_first, running ([NT-Xent sum, steps] of the log interval in progress;
"window", its list of losses, in checkpoints written before), top1.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import default_augment, load_data
from ..ode import generate
from ..ode.solvers import get_tableau
from ..training.evaluate import knn_accuracy, linear_probe, map_batches
from ..training.distributed import single_process
from ..training.rundir import CheckpointError, atomic_write, read_checkpoint
from ..training.runs import check_int, check_number
from ..training.trainer import (Interrupted, Result, RunOptions, Schedule, StopRequests, TrainConfig, Trainer,
                                configure, one_of, ranged)
from .common import ENCODERS, ViewAugment, build_encoder, load_flow, pretrain_info

__all__ = ["GenRepConfig", "genrep", "nt_xent_loss", "neighbour_latents", "generate_views",
           "GENREP_FORMAT"]

GENREP_FORMAT = "prg_fast.genrep"
GENREP_VERSION = 1
VIEWS_FORMAT = "prg_fast.genrep.views"
VIEWS_DEFINED_BY = ("checkpoint", "sigma", "truncation", "pool", "neighbors", "ode_steps", "method", "seed",
                    "raw_weights")  # the arguments a view pool on disk must have been generated with
RESUME_MUST_MATCH = ("data", "checkpoint", "batch_size", "sigma", "truncation", "temperature", "pool", "neighbors",
                     "ode_steps", "method", "encoder", "proj_dim", "lr", "weight_decay", "crop_scale", "hflip", "seed",
                     "raw_weights")


# -------------------------------------------------------------------------------------------------
# the loss and the views


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss for B positive pairs (z1[i], z2[i]), each (B, D):

        l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),  s = cosine similarity,

    over the 2B views (the other 2B - 2 views are the negatives), averaged over both directions of
    every pair."""
    if not isinstance(z1, torch.Tensor) or not isinstance(z2, torch.Tensor):
        raise TypeError("z1 and z2 must be tensors")
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both have shape (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"NT-Xent needs at least 2 pairs (the other pairs are the negatives), got {z1.shape[0]}")
    check_number("temperature", temperature, 0.0, float("inf"), lo_open=True)
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def neighbour_latents(z: torch.Tensor, sigma: float, n: int = 1, *, truncation: float = 2.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n neighbours of each anchor latent: z + sigma * eps with eps ~ N(0, I) truncated to
    [-truncation, truncation] per coordinate (GenRep: 2 sigma). z (B, ...) -> (B, n, ...)."""
    check_number("sigma", sigma, 0.0, float("inf"))
    check_number("truncation", truncation, 0.0, float("inf"), lo_open=True)
    check_int("n", n, 1)
    eps = torch.empty((z.shape[0], n, *z.shape[1:]), dtype=torch.float32)
    torch.nn.init.trunc_normal_(eps, a=-truncation, b=truncation, generator=generator)
    return z[:, None] + sigma * eps.to(z.device, z.dtype)


@torch.no_grad()
def generate_views(flow: nn.Module, z: torch.Tensor, *, steps: int, method: str) -> torch.Tensor:
    """Images for latents z: prg_fast.generate (t = 1 -> 0), clamped to [-1, 1]."""
    return generate(flow, z, steps=steps, method=method).clamp(-1, 1)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _dequantise(q: torch.Tensor, device) -> torch.Tensor:
    return q.to(device).float() / 127.5 - 1


# -------------------------------------------------------------------------------------------------
# configuration


@dataclass
class GenRepConfig(TrainConfig):
    """Arguments of `prg-fast genrep` (one flag per field)."""

    data: str = "digits"  # real data: image shape, and the linear probe's train / test splits
    checkpoint: Optional[str] = None  # pretraining run directory (the generator)
    out: str = "runs/genrep"
    steps: int = 500  # contrastive steps (0: no training -- the random-encoder baseline)
    batch_size: int = 128  # positive pairs per step (2B views)
    # sigma = 0 is allowed on purpose: the positive is then the anchor itself (SimCLR on generated images)
    sigma: float = ranged(0.2, 0.0, 10.0)
    truncation: float = ranged(2.0, 0.0, 100.0, lo_open=True)  # eps truncated at +- truncation (GenRep: 2)
    temperature: float = ranged(0.1, 0.0, 100.0, lo_open=True)
    pool: int = ranged(1024, 0)  # anchors generated offline (0: fresh pairs every step)
    neighbors: int = ranged(4, 1)  # neighbours per anchor in the pool (GenRep: 20)
    ode_steps: int = ranged(10, 1)  # prg_fast.generate steps
    method: str = "rk4"
    encoder: str = one_of("resnet-small", ENCODERS)
    proj_dim: int = ranged(128, 1)
    lr: float = ranged(1e-3, 0.0, 10.0, lo_open=True)  # AdamW, cosine
    weight_decay: float = ranged(1e-4, 0.0, 10.0)
    # smallest crop area fraction (None: 0.2 for >= 32 px images, 0.5 below)
    crop_scale: Optional[float] = ranged(None, 0.0, 1.0, lo_open=True)
    raw_weights: bool = False
    gen_batch_size: int = ranged(256, 1)
    # linear-probe inverse regularisation; None: chosen by 5-fold CV on the train split
    probe_C: Optional[float] = ranged(None, 0.0, 1e6, lo_open=True)
    eval_batch_size: int = ranged(256, 1)

    def validate(self) -> "GenRepConfig":
        self.check_run_fields(min_steps=0)
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (the other pairs are the negatives), got {self.batch_size}")
        if 0 < self.pool < self.batch_size:
            raise ValueError(f"pool ({self.pool}) must be 0 (online generation) or >= batch_size ({self.batch_size})")
        get_tableau(self.method)
        self.checkpoint = self.pretrained_checkpoint("genrep")
        return self


# -------------------------------------------------------------------------------------------------
# training


def genrep(config: Optional[GenRepConfig] = None, **kwargs) -> Result:
    """Contrastive learning on generated anchor / neighbour views, then a linear probe on real data
    (see the module doc); the Result's network: encoder. Call with a GenRepConfig or its fields (and RunOptions' fields:
    ckpt_minutes, force); resumes from `out`."""
    cfg, options = configure(GenRepConfig, config, kwargs)
    return _GenRep(cfg, options).run()


class _GenRep(Trainer):
    log_header = ("step", "lr", "nt_xent")
    must_match = RESUME_MUST_MATCH
    bar_desc = "genrep"

    def __init__(self, cfg: GenRepConfig, options: RunOptions):
        existing = self.open_run(cfg, single_process(cfg.device), options, GENREP_FORMAT, GENREP_VERSION, "genrep",
                                 "genrep")
        self.train_data = load_data(cfg.data, "train", augment=None)
        self.test_data = load_data(cfg.data, "test", augment=None)
        self.pre_ckpt, flow = load_flow(cfg.checkpoint, self.train_data, raw_weights=cfg.raw_weights)
        self.flow = flow.to(self.device)
        c, h, w = self.train_data.shape
        hflip = default_augment(cfg.data).hflip if cfg.hflip is None else bool(cfg.hflip)
        lo = cfg.crop_scale if cfg.crop_scale is not None else (0.2 if min(h, w) >= 32 else 0.5)
        self.augment = ViewAugment(crop_scale=(lo, 1.0), hflip=hflip)
        self.gen_time = 0.0
        self.pool: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.begin(existing)

    def build(self) -> None:
        cfg = self.cfg
        self.encoder = build_encoder(cfg.encoder, self.train_data.shape[0]).to(self.device)
        d = self.encoder.feature_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, cfg.proj_dim)).to(self.device)
        self.opt = torch.optim.AdamW(list(self.encoder.parameters()) + list(self.projector.parameters()), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.running = [0.0, 0]

    def stream_seed(self) -> int:
        return self.cfg.seed + 1  # the streams this command has drawn since its first release

    def lr_schedules(self):
        return [Schedule(self.opt, self.cfg.lr, self.cfg.steps, int(0.05 * self.cfg.steps))]

    def load_state(self, ckpt: Dict[str, Any]) -> None:
        self.encoder.load_state_dict(ckpt["encoder"])
        self.projector.load_state_dict(ckpt["projector"])
        self.opt.load_state_dict(ckpt["optimizer"])
        history = ckpt.get("history", [])
        self.loss_first = ckpt.get("loss_first", history[0][2] if history else None)
        window = [float(v) for v in ckpt.get("window", [])]  # the interval in progress, as first saved
        running = ckpt.get("running", [sum(window), len(window)])
        self.running = [float(running[0]), int(running[1])]
        self.continue_window(self.running[:1], self.running[1])

    def state(self) -> Dict[str, Any]:
        return {"encoder": self.encoder.state_dict(), "encoder_config": dict(self.encoder.config),
                "projector": self.projector.state_dict(), "optimizer": self.opt.state_dict(),
                "pretrain": pretrain_info(self.cfg.checkpoint, self.pre_ckpt), "data": self.cfg.data,
                "loss_first": self.loss_first, "running": list(self.running), "top1": None}

    # -- the generated pool ----------------------------------------------------------------------
    def _load_or_generate_pool(self) -> None:
        """The offline pool: anchors (P, C, H, W) and neighbours (P, K, C, H, W), uint8. Written to
        DIR/views.pt in chunks (atomically), so an interrupted generation continues where it was."""
        from tqdm.auto import tqdm

        cfg, path = self.cfg, self.files.path("views.pt")
        meta = {"pretrain_step": int(self.pre_ckpt["step"]), **{k: getattr(cfg, k) for k in VIEWS_DEFINED_BY}}
        state = None
        if os.path.isfile(path):
            state = read_checkpoint(path, what="genrep view pool (remove it to regenerate)")
            if state.get("format") != VIEWS_FORMAT:
                raise CheckpointError(f"{path} is not a genrep view pool; remove it or use a new --out")
            if state["meta"] != meta:
                raise CheckpointError(f"{path} was generated with {state['meta']}, this run asks for {meta}; "
                                      f"use a new --out")
        shape = self.train_data.shape
        if state is None:
            state = {"format": VIEWS_FORMAT, "meta": meta, "done": 0,
                     "anchors": torch.zeros((cfg.pool, *shape), dtype=torch.uint8),
                     "neighbors": torch.zeros((cfg.pool, cfg.neighbors, *shape), dtype=torch.uint8),
                     "gen_time_s": 0.0}
        chunk = max(1, cfg.gen_batch_size // (1 + cfg.neighbors))
        done = int(state["done"])
        if done < cfg.pool:
            bar = tqdm(total=cfg.pool, initial=done, disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0,
                       desc="genrep: generating views", unit="anchor")
            last_save = time.perf_counter()
            with StopRequests(self.files.say) as stop:
                while done < cfg.pool:
                    n = min(chunk, cfg.pool - done)
                    self._generate_chunk(state, done, n)
                    done += n
                    bar.update(n)
                    if done == cfg.pool or time.perf_counter() - last_save > 60 or stop.signum is not None:
                        atomic_write(path, lambda f: torch.save(state, f))
                        # metrics.json says whose folder this is before the first checkpoint
                        self.files.write_json("metrics.json", {"command": "genrep", "status": "generating views",
                                                               "views_done": done, "pool": cfg.pool})
                        last_save = time.perf_counter()
                    if stop.signum is not None:
                        bar.close()
                        raise Interrupted("genrep", stop.signum, 0, path)
            bar.close()
        self.gen_time = float(state["gen_time_s"])
        self.pool = (state["anchors"], state["neighbors"])

    def _generate_chunk(self, state: Dict[str, Any], done: int, n: int) -> None:
        """Anchors [done, done + n) of the pool and their neighbours, into `state`. Their latents
        depend only on (seed, index): resumable and reproducible."""
        cfg, shape = self.cfg, self.train_data.shape
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + done)
        z = torch.randn((n, *shape), generator=gen)
        zn = neighbour_latents(z, cfg.sigma, cfg.neighbors, truncation=cfg.truncation, generator=gen)
        lat = torch.cat([z[:, None], zn], dim=1).flatten(0, 1).to(self.device)
        imgs = generate_views(self.flow, lat, steps=cfg.ode_steps, method=cfg.method)
        imgs = _quantise(imgs).reshape(n, 1 + cfg.neighbors, *shape)
        state["anchors"][done:done + n] = imgs[:, 0]
        state["neighbors"][done:done + n] = imgs[:, 1:]
        state["done"] = done + n
        state["gen_time_s"] = float(state["gen_time_s"]) + time.perf_counter() - t0

    def _pairs(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """B (anchor, neighbour) image pairs for `step`."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        if self.pool is not None:
            anchors, neighbors = self.pool
            idx = torch.randperm(cfg.pool, generator=gen)[:cfg.batch_size]
            j = torch.randint(0, cfg.neighbors, (cfg.batch_size,), generator=gen)
            return _dequantise(anchors[idx], self.device), _dequantise(neighbors[idx, j], self.device)
        t0 = time.perf_counter()
        z = torch.randn((cfg.batch_size, *self.train_data.shape), generator=gen)
        zn = neighbour_latents(z, cfg.sigma, 1, truncation=cfg.truncation, generator=gen)[:, 0]
        imgs = generate_views(self.flow, torch.cat([z, zn]).to(self.device), steps=cfg.ode_steps, method=cfg.method)
        self.gen_time += time.perf_counter() - t0
        return imgs[:cfg.batch_size], imgs[cfg.batch_size:]

    def _save_examples(self) -> None:
        if self.pool is None:
            return
        from ..training.pretrain import save_image_grid

        anchors, neighbors = self.pool
        n = min(8, anchors.shape[0])
        k = min(7, neighbors.shape[1])
        rows = torch.cat([anchors[:n, None], neighbors[:n, :k]], dim=1).flatten(0, 1)
        atomic_write(self.files.path("views.png"),
                      lambda f: save_image_grid(_dequantise(rows, "cpu"), f, nrow=1 + k))

    # -- the skeleton's step ------------------------------------------------------------------
    def run(self) -> Result:
        self.t_run = time.perf_counter()
        if self.cfg.pool > 0 and self.cfg.steps > 0:
            self._load_or_generate_pool()
            self._save_examples()
        self.encoder.train()
        metrics = super().run()
        return Result(metrics, self.cfg.out, self.step, self.history, {"encoder": self.encoder})

    def train_step(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        a, p = self._pairs(step)
        z = self.projector(self.encoder(torch.cat([self.augment(a), self.augment(p)])))
        loss = nt_xent_loss(z[:cfg.batch_size], z[cfg.batch_size:], cfg.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.record(loss.detach().reshape(1))  # a non-finite loss stops the run at the interval's end
        return loss.detach()

    def flush(self, step: int, row: bool, bar) -> None:
        (loss_sum,), steps = self.take_window(step, end=row)
        self.running = [loss_sum, steps]  # the interval so far (saved with a checkpoint)
        if row:
            self.history.append([step, self.lr, self.running[0] / self.running[1]])
            bar.set_postfix(loss=f"{self.history[-1][2]:.4f}", refresh=False)
            self.running = [0.0, 0]

    def finish(self, start_step: int, elapsed: float) -> Dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        tr_x, te_x = (map_batches(self.encoder, lambda x: self.encoder(x).float(), data,
                                  batch_size=cfg.eval_batch_size, device=self.device)
                      for data in (self.train_data, self.test_data))
        tr_y, te_y = self.train_data.labels, self.test_data.labels
        probe = linear_probe(tr_x, tr_y, te_x, te_y, seed=cfg.seed, C=cfg.probe_C)
        knn = knn_accuracy(tr_x, tr_y, te_x, te_y, k=min(20, len(tr_y)))["top1"]
        probe_time = time.perf_counter() - t0
        metrics: Dict[str, Any] = {
            "top1": probe["top1"],
            "chance": 1.0 / self.test_data.num_classes,
            "probe_train_top1": probe.get("train_top1"),
            "probe_C": probe.get("C"),
            "knn_top1": knn,
            "nt_xent_first": self.loss_first,
            "nt_xent": self.history[-1][2] if self.history else None,
            **self.timing(start_step, elapsed),
            "wall_time_s": round(time.perf_counter() - self.t_run, 3),  # this invocation: generation + training + probe
            "train_loop_time_s": round(elapsed, 3),
            "generation_time_s": round(self.gen_time, 3),
            "probe_time_s": round(probe_time, 3),
            "feature_dim": int(tr_x.shape[1]),
            "encoder_params": sum(p.numel() for p in self.encoder.parameters()),
            "generated_images": (cfg.pool * (1 + cfg.neighbors) if cfg.pool else 2 * cfg.batch_size * self.step)
            if cfg.steps else 0,
            "pretrain_step": int(self.pre_ckpt["step"]),
            "pretrain_path": self.pre_ckpt["path"]["name"],
        }
        self.save(top1=probe["top1"])
        return self.write_metrics(
            metrics, f"linear-probe test top-1 {probe['top1']:.4f} after {self.step} contrastive steps on "
                     f"generated views; wrote {cfg.out}/metrics.json")
