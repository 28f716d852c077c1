"""Reward finetuning (`prg-fast reward`): a pretrained velocity network is trained so that its samples
-- prg_fast.generate from noise z ~ N(0, I) at t = 1 down to t = 0 in --ode-steps steps -- maximise a
differentiable reward, with the gradient through the whole sampler chain (exact adjoint) or a
truncation of it (prg_fast.reward: full, backprop, draft-K, alignprop, refl). Per optimizer step:

    loss = -mean_b reward(x_b) + kl_weight * velocity_kl + fm_weight * flow_matching_loss(data)

(the flow-matching term on the pretraining checkpoint's path, OT-CFM for a network passed without one)

The regularisers keep the network near its pretrained self. velocity_kl (the default, weight 10):
the mean squared difference between the finetuned and the pretrained velocity at one random time per
sample on the chord from its noise to its sample -- where the finetuned samples go, needing no data;
up to the noise scale it is the Girsanov KL between the two flows' SDE path measures. The
flow-matching loss on the pretraining data (weight 0 by default) anchors the flow to the data
distribution instead -- the distribution the reward deliberately moves away from -- so it fights the
reward on exactly the samples the reward wants; it is there for data-anchored finetuning.

The reward: --reward class:N (the log-probability of class N under a small image classifier trained
on --data's training split at the start of the run and kept in the checkpoint), or
package.module:factory (a callable returning the reward: an nn.Module or a function, samples (B, C,
H, W) -> (B,)); reward_finetune(reward=...) takes the callable itself. The network: the pretraining
checkpoint's (EMA weights by default), with a LoRA adapter of --lora-rank on every Linear / Conv
layer (prg_fast.models.lora; the pretrained reference is the network with the adapters off),
fully finetuned (--adapter full; the reference is a frozen copy), or with the parameters that
require grad as the network comes (--adapter none: a peft-wrapped network passed as
reward_finetune(model=...) or named by --model; the reference is a frozen copy). The flow runs in
eval mode (no dropout: the sample is a function of its noise). The noise, the truncation drawn and the KL times of
step s come from a generator seeded by (seed, s) alone, so a resumed run draws what an uninterrupted
one draws.

Run directory (--out DIR; the skeleton's, prg_fast.training.trainer): log.csv rows are step, loss,
reward, kl, fm, kept (grid steps differentiated), lr; metrics.json has reward / reward_pretrained
(mean reward of --eval-samples samples from fixed noise, finetuned / pretrained), kl (velocity_kl
on them), diversity / diversity_pretrained (prg_fast.reward.pairwise_distance), target_fraction /
target_fraction_pretrained (class:N: the share classified as N), reward_train (the last log
interval's mean), ...; DIR/samples.png and DIR/samples_pretrained.png show those samples.

Checkpoint entries (format "prg_fast.reward", version 1), besides the skeleton's: model (the
finetuned network's state_dict with the adapters merged: loads into UNet(**model_config)), trained
(the state_dict as trained, adapters separate: what resuming loads), optimizer, model_config,
preset, in_channels, image_size, data, num_classes, reward ({"spec", "classifier",
"classifier_config", "classifier_top1"}: the class reward's classifier), pretrain ({"checkpoint",
"step", "weights"} or None), running, loss_first.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..data import ImageData, load_data
from ..losses import flow_matching_loss
from ..models import ImageClassifier, add_lora, lora_disabled, merged_state_dict
from ..ode import generate
from ..ode.solvers import get_tableau
from ..paths import get_path
from ..reward import (ClassLogProb, gradient_mode, pairwise_distance, reward_loss, reward_name, reward_values,
                      step_generator, velocity_kl)
from .checkpoints import build_model, check_data_fits, load_checkpoint
from .distributed import single_process
from .flows import check_flow, check_model_reads, foreign_model_entries, import_factory, is_factory_spec, prg_velocity
from .image_classifier import train_image_classifier
from .pretrain import save_image_grid
from .rundir import CheckpointError, atomic_write, checkpoint_file
from .trainer import Result, RunOptions, Schedule, TrainConfig, Trainer, configure, one_of, ranged

__all__ = ["RewardConfig", "reward_finetune", "REWARD_FORMAT", "REWARD_VERSION"]

REWARD_FORMAT = "prg_fast.reward"
REWARD_VERSION = 1
REWARD_KEYS = ("format", "version", "step", "args", "world_size", "rng", "history", "model", "trained", "optimizer",
               "model_config", "in_channels", "image_size", "data", "reward")
RESUME_MUST_MATCH = ("data", "checkpoint", "reward", "batch_size", "ode_steps", "method", "gradient", "refl_late",
                     "adapter", "lora_rank", "lora_alpha", "kl_weight", "fm_weight", "raw_weights", "seed",
                     "classifier_steps")


@dataclass
class RewardConfig(TrainConfig):
    """Arguments of `prg-fast reward` (one flag per field)."""

    checkpoint: Optional[str] = None  # pretraining run directory (or its checkpoint.pt)
    reward: Optional[str] = None  # "class:N" or "package.module:factory"
    out: str = "runs/reward"
    steps: int = 200
    batch_size: int = 16  # samples per step
    ode_steps: int = ranged(20, 1)
    method: str = "euler"
    gradient: str = "full"  # full | backprop | draft-K | alignprop | refl (prg_fast.reward.gradient_mode)
    memory_budget: Any = "auto"  # the full chain's adjoint: "auto", None (recompute all) or bytes
    refl_late: float = ranged(0.25, 0.0, 1.0, lo_open=True)  # refl: start in the last fraction of the steps
    adapter: str = one_of("lora", ("lora", "full", "none"))
    lora_rank: int = ranged(4, 1)
    lora_alpha: Optional[float] = ranged(None, 0.0, 1e6, lo_open=True)  # None: the rank (scale 1)
    lr: float = ranged(3e-4, 0.0, 1.0, lo_open=True)  # AdamW, constant after the warm-up
    weight_decay: float = ranged(0.0, 0.0, 10.0)
    warmup: int = ranged(0, 0)
    grad_clip: float = ranged(1.0, 0.0, 1e12)  # max global gradient norm; 0 disables
    kl_weight: float = ranged(10.0, 0.0, 1e6)
    fm_weight: float = ranged(0.0, 0.0, 1e6)
    fm_eps: float = ranged(1e-5, 0.0, 0.5)
    classifier_steps: int = ranged(500, 1)  # training steps of the class:N reward's classifier
    raw_weights: bool = False  # start from the checkpoint's raw weights instead of its EMA
    eval_samples: int = ranged(64, 2)
    ckpt_every: int = 100
    log_every: int = 10

    def validate(self, external_model: bool = False, external_reward: bool = False) -> "RewardConfig":
        self.check_run_fields()
        get_tableau(self.method)
        gradient_mode(self.gradient, memory_budget=self.memory_budget, refl_late=self.refl_late)
        if not external_reward and not _is_reward_spec(self.reward):
            raise ValueError(f"reward must be class:N (the log-probability of class N under a classifier trained on "
                             f"--data) or package.module:factory (a callable returning the reward), got "
                             f"{self.reward!r}")
        if self.checkpoint is not None:
            self.checkpoint = self.pretrained_checkpoint("reward")
        elif not external_model:
            raise ValueError("reward needs --checkpoint: a pretraining run directory (prg-fast pretrain --out DIR)")
        return self


def _is_reward_spec(spec) -> bool:
    if not isinstance(spec, str):
        return False
    if spec.startswith("class:"):  # (no module can be called "class": it is a keyword)
        return _class_target(spec) is not None
    return is_factory_spec(spec)


def _class_target(spec: str) -> Optional[int]:
    """N of "class:N", else None."""
    kind, _, n = spec.partition(":")
    return int(n) if kind == "class" and n.isdigit() else None


def reward_finetune(config: Optional[RewardConfig] = None, *, model: Optional[nn.Module] = None,
                    reward: Optional[Callable] = None, time_convention: str = "prg", **kwargs) -> Result:
    """Finetune (or resume finetuning) a velocity network on a reward; see the module doc. Call
    with a RewardConfig or its fields as keyword arguments (and RunOptions' fields: ckpt_minutes,
    force). `model`: the network to finetune (its own weights, or those of config.checkpoint when
    given); `reward`: the reward callable itself, or a spec string (config.reward: class:N or
    package.module:factory). A callable reward is named in errors and logs by config.reward when
    given, else by its `name` attribute, function name or class name."""
    if isinstance(reward, str):  # the config's own field `reward` (a spec), not a callable
        kwargs["reward"], reward = reward, None
    check_flow(model, time_convention)
    if reward is not None and not callable(reward):
        raise TypeError(f"reward must be callable on samples (B, C, H, W) -> (B,), got {type(reward).__name__}")
    cfg, options = configure(RewardConfig, config, kwargs, external_model=model is not None,
                             external_reward=reward is not None)
    return _RewardTrainer(cfg, options, model, reward, time_convention).run()


class _RewardTrainer(Trainer):
    log_header = ("step", "loss", "reward", "kl", "fm", "kept", "lr")
    must_match = RESUME_MUST_MATCH

    def __init__(self, cfg: RewardConfig, options: RunOptions, user_model: Optional[nn.Module],
                 user_reward: Optional[Callable], time_convention: str):
        existing = self.open_run(cfg, single_process(cfg.device), options, REWARD_FORMAT, REWARD_VERSION, "reward",
                                 "reward finetuning", REWARD_KEYS)
        self.data: ImageData = load_data(cfg.data, "train")
        self.shape = self.data.shape
        self.mode = gradient_mode(cfg.gradient, memory_budget=cfg.memory_budget, refl_late=cfg.refl_late)
        self._given, self._existing, self._user_reward = user_model, existing, user_reward
        self._convention = time_convention
        self._indices = self.step_batches(self.data) if cfg.fm_weight > 0 else None
        self.begin(existing)
        self.bar_desc = f"reward ({cfg.gradient})"

    def build(self) -> None:
        """The network with its adapter (its initial weights a function of --seed: the skeleton seeds
        first), the reward, and AdamW."""
        cfg = self.cfg
        self.net = self._build_net(self._given, self._convention).to(self.device).eval()
        self.velocity = prg_velocity(self.net, self.time_convention)  # (the checkpoint's convention when it has one)
        self.reference = self._reference()
        self.reward, self.reward_state = self._build_reward(self._user_reward, self._existing)
        self.reward_label = cfg.reward or reward_name(self.reward)
        self.path = get_path(**self.path_cfg) if cfg.fm_weight > 0 else None  # (path_cfg: from _build_net)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.running = [0.0] * 5 + [0]

    def lr_schedules(self):
        return [Schedule(self.opt, self.cfg.lr, self.cfg.steps, self.cfg.warmup, kind="constant")]

    # -- set-up -----------------------------------------------------------------------------------
    def _build_net(self, user_model: Optional[nn.Module], time_convention: str) -> nn.Module:
        """The pretrained network (the checkpoint's, or the one passed), with its adapter."""
        cfg = self.cfg
        self.pretrain_info, self.preset, self.model_config = None, None, None
        self.path_cfg = {"name": "otcfm", "sigma": 0.0}  # the FM term's path: the pretraining's when known
        self.user_model, self.time_convention = user_model is not None, time_convention
        if cfg.checkpoint is not None:
            pre = load_checkpoint(cfg.checkpoint)
            check_data_fits(self.data, pre, checkpoint_file(cfg.checkpoint), "was pretrained on")
            net = build_model(pre, ema=not cfg.raw_weights, model=user_model)
            self.time_convention = pre.get("time_convention", time_convention)
            self.pretrain_info = {"checkpoint": cfg.checkpoint, "step": int(pre["step"]),
                                  "weights": "raw" if cfg.raw_weights else "ema"}
            self.preset, self.model_config = pre.get("preset"), pre["model_config"]
            self.path_cfg = {"name": pre["path"]["name"], "sigma": float(pre["path"].get("sigma", 0.0))}
        else:
            net = user_model
            check_model_reads(net, self.shape, cfg.data, next(net.parameters(), torch.empty(0)).device)
        if cfg.adapter == "lora":
            add_lora(net, cfg.lora_rank, cfg.lora_alpha)
            return net
        self.frozen = copy.deepcopy(net).requires_grad_(False).eval()
        if cfg.adapter == "full":
            net.requires_grad_(True)
        elif not any(p.requires_grad for p in net.parameters()):  # "none": what requires grad, as given
            raise ValueError(f"adapter 'none' trains the parameters of the network that require grad, and "
                             f"{type(net).__name__} has none (a peft-wrapped network has its adapters')")
        return net

    def _reference(self) -> Callable:
        """The pretrained velocity: the network with its adapters off, or the frozen copy."""
        if self.cfg.adapter != "lora":
            return prg_velocity(self.frozen.to(self.device), self.time_convention)

        def reference(t, x):
            with lora_disabled(self.net):
                return self.velocity(t, x)

        return reference

    def _build_reward(self, user_reward: Optional[Callable], ckpt: Optional[Dict[str, Any]]):
        """(the reward callable, what the checkpoint records of it)."""
        cfg = self.cfg
        state = {"spec": cfg.reward, "classifier": None, "classifier_config": None, "classifier_top1": None}
        if user_reward is not None:
            reward = user_reward
        elif _class_target(cfg.reward) is None:
            reward = import_factory(cfg.reward)()
            if not callable(reward):
                raise TypeError(f"--reward {cfg.reward} returned a {type(reward).__name__}, not a callable")
        else:
            target = _class_target(cfg.reward)
            if target >= self.data.num_classes:
                raise ValueError(f"--reward {cfg.reward}: {cfg.data} has classes 0..{self.data.num_classes - 1}")
            saved = (ckpt or {}).get("reward") or {}
            if saved.get("classifier") is not None:
                classifier = ImageClassifier(**saved["classifier_config"])
                classifier.load_state_dict(saved["classifier"])
                state.update(classifier_top1=saved["classifier_top1"])
            else:
                self.files.say(f"training the classifier of reward {cfg.reward} on {cfg.data} "
                               f"({cfg.classifier_steps} steps)")
                classifier, top1 = train_image_classifier(self.data, load_data(cfg.data, "test", augment=None),
                                                          steps=cfg.classifier_steps, seed=cfg.seed, device=self.device)
                state.update(classifier_top1=top1)
                self.files.say(f"reward classifier: test top-1 {top1:.4f}")
            reward = ClassLogProb(classifier.to(self.device), target)
            state.update(classifier=reward.classifier.state_dict(), classifier_config=dict(classifier.config))
        if isinstance(reward, nn.Module):
            reward = reward.to(self.device)
        return reward, state

    # -- checkpoint entries -------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        own = foreign_model_entries(self.net, self.time_convention) if self.user_model else {}
        merged = merged_state_dict(self.net) if self.cfg.adapter == "lora" else self.net.state_dict()
        return {"model": merged, "trained": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "model_config": self.model_config, "preset": self.preset, "in_channels": self.shape[0],
                "image_size": self.shape[1], "data": self.cfg.data, "num_classes": self.data.num_classes,
                "reward": dict(self.reward_state), "pretrain": self.pretrain_info, "running": list(self.running),
                "loss_first": self.loss_first, **own}

    def load_state(self, ckpt: Dict[str, Any]) -> None:
        self.net.load_state_dict(ckpt["trained"])
        self.opt.load_state_dict(ckpt["optimizer"])
        running = ckpt.get("running") or [0.0] * 5 + [0]
        self.running = [float(v) for v in running[:5]] + [int(running[5])]
        self.continue_window(self.running[:5], self.running[5])
        self.loss_first = ckpt.get("loss_first")

    # -- the step ---------------------------------------------------------------------------------
    def run(self) -> Result:
        metrics = super().run()
        return Result(metrics, self.cfg.out, self.step, self.history, {"model": self.net})

    def train_step(self, step: int) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        gen = step_generator(cfg.seed, step, dev)
        z = torch.randn((cfg.batch_size, *self.shape), generator=gen, device=dev)
        step_loss = reward_loss(self.velocity, self.reward, z, steps=cfg.ode_steps, method=cfg.method,
                                gradient=self.mode, reference=self.reference, kl_weight=cfg.kl_weight, generator=gen,
                                name=self.reward_label)
        loss, fm = step_loss.loss, torch.zeros((), device=dev)
        if cfg.fm_weight > 0:
            x, _ = self.data.batch(self._indices(step), device=dev, generator=gen)
            fm = flow_matching_loss(self.velocity, x, self.path, eps=cfg.fm_eps, generator=gen)
            loss = loss + cfg.fm_weight * fm
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        stats = torch.stack([loss.detach(), step_loss.reward, step_loss.kl, fm.detach(),
                             torch.tensor(float(step_loss.sample.kept), device=dev)])
        self.record(stats)
        return stats[0]

    def flush(self, step: int, row: bool, bar) -> None:
        sums, steps = self.take_window(step, end=row)
        self.running = list(sums) + [steps]  # kept for a checkpoint inside the interval
        if row:
            n = max(steps, 1)
            self.history.append([step, *(v / n for v in sums), self.lr])
            self.running = [0.0] * 5 + [0]
            bar.set_postfix(reward=f"{self.history[-1][2]:.4f}", refresh=False)

    # -- the end ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """Samples of the finetuned and the pretrained network from the same fixed noise: mean
        reward, velocity_kl, diversity, and (class:N) the share classified as N."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        z = torch.randn((cfg.eval_samples, *self.shape), generator=gen).to(self.device)
        out: Dict[str, Any] = {}
        for suffix, velocity in (("", self.velocity), ("_pretrained", self.reference)):
            x = generate(velocity, z, steps=cfg.ode_steps, method=cfg.method)
            out[f"reward{suffix}"] = float(reward_values(self.reward, x, self.reward_label).mean())
            out[f"diversity{suffix}"] = float(pairwise_distance(x))
            if isinstance(self.reward, ClassLogProb):
                out[f"target_fraction{suffix}"] = float((self.reward.classifier(x).argmax(1)
                                                         == self.reward.target).float().mean())
            out[f"_samples{suffix}"] = x.clamp(-1, 1).cpu()
            if not suffix:
                t = torch.rand(z.shape[0], generator=gen).to(self.device)
                out["kl"] = float(velocity_kl(velocity, self.reference, x, z, t))
        return out

    def finish(self, start_step: int, elapsed: float) -> Dict[str, Any]:
        cfg = self.cfg
        ev = self.evaluate()
        for name in ("", "_pretrained"):
            samples = ev.pop(f"_samples{name}")
            atomic_write(self.files.path(f"samples{name}.png"), lambda f: save_image_grid(samples, f))
        last = self.history[-1] if self.history else [self.step] + [float("nan")] * 6
        metrics: Dict[str, Any] = {
            **ev, "reward_train": last[2], "loss": last[1], "kl_train": last[3], "fm_train": last[4],
            "loss_start": self.loss_first if self.loss_first is not None else float("nan"),
            "classifier_top1": self.reward_state["classifier_top1"], **self.timing(start_step, elapsed),
            "num_params_trained": sum(p.numel() for p in self.params),
            "num_params": sum(p.numel() for p in self.net.parameters()),
            "pretrain_step": self.pretrain_info["step"] if self.pretrain_info else None,
        }
        return self.write_metrics(metrics, f"step {self.step}: reward {ev['reward']:.4f} (pretrained "
                                           f"{ev['reward_pretrained']:.4f}), kl {ev['kl']:.3g}; wrote {cfg.out}/"
                                           f"checkpoint.pt, metrics.json, samples.png")
