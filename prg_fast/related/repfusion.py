"""RepFusion-style distillation (Yang & Wang, "Diffusion Model as Representation Learner", ICCV 2023,
arXiv 2308.10916) on prg_fast's pretrained velocity networks (`prg-fast repfusion`).

Phase 1, distillation (--steps N): the frozen velocity network v(t, x) of a pretraining checkpoint
(EMA weights) is evaluated on the clean (augmented) training image at a time t; a forward hook on
one of its layers (default: the UNet's middle block) captures that layer's output, globally average
pooled. A separate student network (a CIFAR-style ResNet, --student) learns these features: its own
pooled last-stage features go through a linear projection to the teacher's width and are regressed
onto the teacher's with MSE. No labels reach the student in this phase.

    One addition to the paper (--teacher-norm standardize, the default): the pooled teacher
    features are standardised per channel with their mean and std over the training split at each
    teacher time before the MSE. A flow UNet's pooled middle-block features are dominated by a
    sample-independent, time-dependent offset (tiny preset on digits: across-image variance summed
    over channels 0.06 against a mean vector of norm 2.0), which a raw MSE mostly spends itself on;
    --teacher-norm none gives the paper's raw-feature MSE.

    t fixed (--t T), or, with --policy, chosen per image by a small CNN policy that outputs a softmax
    over K candidate times (--policy-times K in [0, --policy-t-max]). The policy is trained with
    REINFORCE: reward = -cross-entropy of an auxiliary MLP head (trained jointly, on the detached
    pooled teacher features) at the sampled time, baseline = the batch mean reward, plus an entropy
    bonus whose weight decays linearly from --entropy-coef (0.1) to 0 at mid-distillation.

Phase 2, finetuning (--finetune-steps M, default N): a fresh linear classifier on the student's
pooled features; student and classifier trained with cross-entropy (SGD, momentum 0.9, cosine).
Test top-1 of the finetuned student goes to DIR/metrics.json.

Run directory (--out DIR): the skeleton's (prg_fast.training.trainer; --finetune-steps may grow).
Checkpoint entries (format "prg_fast.repfusion", version 1), besides the skeleton's: student,
student_config (ResNet(**student_config)), projection, classifier, policy, aux_head (None without
--policy), distill_optimizer, finetune_optimizer, policy_optimizer, teacher_dim, times (candidate
policy times), pretrain ({checkpoint, step, path, preset, data}), data, num_classes, distill_first,
loss_first, running (the log interval in progress: sums of the log's statistics and the steps; "window",
their lists, in checkpoints written before), top1 (None until finished).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classifier import parse_time
from ..data import load_data
from ..training.distributed import single_process
from ..training.evaluate import map_batches, top1_accuracy
from ..training.runs import check_number, load_train_data
from ..training.trainer import Result, RunOptions, Schedule, TrainConfig, Trainer, configure, one_of, ranged
from .common import ENCODERS, build_encoder, load_flow, pretrain_info

__all__ = ["RepFusionConfig", "repfusion", "FeatureHook", "TeacherFeatures", "TimestepPolicy",
           "reinforce_loss", "distill_loss", "entropy_weight", "REPFUSION_FORMAT"]

REPFUSION_FORMAT = "prg_fast.repfusion"
REPFUSION_VERSION = 1
DEFAULT_T = 0.1
_LOG_KEYS = ("distill", "aux_ce", "mean_t", "entropy_w", "ce", "correct")
RESUME_MUST_MATCH = ("data", "checkpoint", "steps", "batch_size", "t", "policy", "policy_times", "policy_t_max",
                     "layer", "teacher_norm", "student", "lr", "finetune_lr", "weight_decay", "policy_lr", "entropy_coef",
                     "aux_hidden", "label_smoothing", "hflip", "crop_padding", "seed", "raw_weights")


# -------------------------------------------------------------------------------------------------
# the teacher's features


class _Stop(Exception):
    """Raised by the hook to skip the rest of the teacher's forward (its output is not needed)."""


def _global_pool(h) -> torch.Tensor:
    if isinstance(h, (tuple, list)):
        h = h[0]
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"the hooked layer returned {type(h).__name__}, not a tensor")
    if h.dim() == 2:
        return h
    return h.flatten(2).mean(dim=2)  # (B, C, H, W) or (B, C, L) -> (B, C)


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or not layer or layer not in modules:
        top = [n for n in modules if n and "." not in n]
        raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}; top-level ones are {top} "
                         f"(dotted names such as 'input_blocks.2' reach deeper)")
    return modules[layer]


class FeatureHook:
    """A forward hook on `model.<layer>` that keeps the layer's output globally pooled to (B, C).

        with FeatureHook(flow, "middle_block") as hook:
            flow(t, x)
            f = hook.features            # (B, C)

    With stop_forward=True the hook ends the model's forward right after the layer (the rest of
    the network is not computed); call the model through `hook.run(t, x)` then."""

    def __init__(self, model: nn.Module, layer: str = "middle_block", *, stop_forward: bool = False):
        self.model, self.layer = model, layer
        self.module = resolve_layer(model, layer)
        self.stop_forward = stop_forward
        self.features: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module, inputs, output):
        self.features = _global_pool(output)
        if self.stop_forward:
            raise _Stop

    def __enter__(self) -> "FeatureHook":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def attach(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def run(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.features = None
        try:
            self.model(t, x)
        except _Stop:
            pass
        if self.features is None:
            raise RuntimeError(f"layer {self.layer!r} was not called during the forward of {type(self.model).__name__}")
        return self.features


class TeacherFeatures(nn.Module):
    """Frozen velocity network -> pooled features of one layer at times t: forward(x, t) with t a
    float or a (B,) tensor; no gradients, the network's forward stops after the layer."""

    def __init__(self, flow: nn.Module, layer: str = "middle_block"):
        super().__init__()
        self.flow = flow.requires_grad_(False).eval()
        self.hook = FeatureHook(self.flow, layer, stop_forward=True)
        self.hook.attach()
        self.train(False)

    def train(self, mode: bool = True):  # the teacher always runs in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), float(t), device=x.device)
        return self.hook.run(t.to(x.device, torch.float32), x).float()


# -------------------------------------------------------------------------------------------------
# losses and the timestep policy


def distill_loss(student_proj: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the projected student features and the (detached) teacher's."""
    if student_proj.shape != teacher.shape:
        raise ValueError(f"projected student features {tuple(student_proj.shape)} and teacher features "
                         f"{tuple(teacher.shape)} must have the same shape")
    return F.mse_loss(student_proj.float(), teacher.detach().float())


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, *, baseline=None,
                   entropy_coef: float = 0.0) -> torch.Tensor:
    """REINFORCE with a baseline and an entropy bonus, as a loss to minimise:

        -mean_i[(r_i - b) * log pi(a_i | x_i)] - entropy_coef * mean_i[H(pi(. | x_i))]

    logits (B, K) of the policy, actions (B,) the sampled indices, rewards (B,) (treated as
    constants), baseline b a number or (B,) tensor (default: the batch mean reward). Its gradient
    is minus the policy-gradient estimate: a descent step raises the probability of actions whose
    reward beat the baseline and lowers it for the others."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")
    b = logits.shape[0]
    if actions.shape != (b,) or rewards.shape != (b,):
        raise ValueError(f"actions and rewards must have shape ({b},), got {tuple(actions.shape)} and "
                         f"{tuple(rewards.shape)}")
    if actions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"actions must be integer indices, got {actions.dtype}")
    if int(actions.min()) < 0 or int(actions.max()) >= logits.shape[1]:
        raise ValueError(f"actions must lie in [0, {logits.shape[1]}), got values {int(actions.min())}..{int(actions.max())}")
    check_number("entropy_coef", entropy_coef, 0.0, float("inf"))
    rewards = rewards.detach().float()
    if baseline is None:
        baseline = rewards.mean()
    elif isinstance(baseline, torch.Tensor):
        baseline = baseline.detach().float()
    logp = F.log_softmax(logits.float(), dim=1)
    chosen = logp.gather(1, actions.long()[:, None])[:, 0]
    loss = -((rewards - baseline) * chosen).mean()
    if entropy_coef > 0:
        entropy = -(logp.exp() * logp).sum(dim=1).mean()
        loss = loss - entropy_coef * entropy
    return loss


def entropy_weight(step: int, steps: int, coef: float, decay_frac: float = 0.5) -> float:
    """The entropy-bonus weight at distillation step `step`: coef, decaying linearly to 0 at
    decay_frac * steps (mid-training) and 0 after."""
    end = decay_frac * steps
    if end <= 0:
        return 0.0
    return coef * max(0.0, 1.0 - step / end)


class TimestepPolicy(nn.Module):
    """A small CNN: image -> logits over K candidate times (`times`). The last layer starts at
    zero, so the initial policy is uniform."""

    def __init__(self, in_channels: int, times: torch.Tensor, width: int = 16):
        super().__init__()
        times = torch.as_tensor(times, dtype=torch.float32).flatten()
        if times.numel() < 2:
            raise ValueError(f"a policy needs at least two candidate times, got {times.tolist()}")
        self.register_buffer("times", times)
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(2 * width, times.numel())
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))


# -------------------------------------------------------------------------------------------------
# configuration


@dataclass
class RepFusionConfig(TrainConfig):
    """Arguments of `prg-fast repfusion` (one flag per field)."""

    checkpoint: Optional[str] = None  # pretraining run directory (or its checkpoint.pt)
    out: str = "runs/repfusion"
    steps: int = 500  # distillation steps (0: no distillation -- the plain supervised student)
    finetune_steps: Optional[int] = ranged(None, 1)  # cross-entropy steps; None: = steps
    t: Optional[float] = None  # fixed teacher time (None without policy: DEFAULT_T)
    policy: bool = False  # choose t per image with the REINFORCE policy
    policy_times: int = ranged(11, 2)  # K candidate times, evenly spaced in [0, policy_t_max]
    policy_t_max: float = 1.0
    layer: str = "middle_block"
    # standardize: per-channel standardisation of the pooled teacher features; none: the paper's raw MSE
    teacher_norm: str = one_of("standardize", ("standardize", "none"))
    student: str = one_of("resnet-small", ENCODERS)
    lr: float = ranged(0.05, 0.0, 10.0, lo_open=True)  # distillation (SGD, momentum 0.9, cosine)
    finetune_lr: float = ranged(0.05, 0.0, 10.0, lo_open=True)  # finetuning (SGD, momentum 0.9, cosine)
    weight_decay: float = ranged(5e-4, 0.0, 1.0)
    policy_lr: float = ranged(1e-3, 0.0, 10.0, lo_open=True)  # policy and auxiliary head (Adam)
    entropy_coef: float = ranged(0.1, 0.0, 100.0)  # decays linearly to 0 at mid-distillation
    aux_hidden: int = ranged(256, 1)
    label_smoothing: float = ranged(0.0, 0.0, 1.0, hi_open=True)
    warmup_frac: float = ranged(0.05, 0.0, 1.0, hi_open=True)  # of each phase
    crop_padding: int = ranged(0, 0)
    raw_weights: bool = False  # teacher: raw instead of EMA weights
    eval_batch_size: int = ranged(256, 1)

    def validate(self) -> "RepFusionConfig":
        if self.finetune_steps is None:
            if self.steps == 0:
                raise ValueError("steps=0 (no distillation) needs finetune_steps >= 1")
            self.finetune_steps = self.steps
        self.check_run_fields(min_steps=0)
        if self.policy and self.t is not None:
            raise ValueError("give either a fixed time t or policy=True (--t or --policy), not both")
        self.t = None if self.t is None else parse_time(self.t, "t")
        if parse_time(self.policy_t_max, "policy_t_max") <= 0:
            raise ValueError(f"policy_t_max must be > 0 (the policy's times span [0, policy_t_max]), "
                             f"got {self.policy_t_max!r}")
        self.checkpoint = self.pretrained_checkpoint("repfusion")  # layer: checked by resolve_layer
        return self

    @property
    def fixed_t(self) -> float:
        return DEFAULT_T if self.t is None else self.t

    def candidate_times(self) -> torch.Tensor:
        return torch.linspace(0.0, float(self.policy_t_max), int(self.policy_times))


# -------------------------------------------------------------------------------------------------
# training


def repfusion(config: Optional[RepFusionConfig] = None, **kwargs) -> Result:
    """Distil the pretrained flow's features into a student, then finetune it (see the module doc;
    the Result's networks: student and classifier).
    Call with a RepFusionConfig or with its fields as keyword arguments (and RunOptions' fields:
    ckpt_minutes, force); resumes from `out`."""
    cfg, options = configure(RepFusionConfig, config, kwargs)
    return _RepFusion(cfg, options).run()


class _RepFusion(Trainer):
    log_header = ("step", "phase", "lr") + _LOG_KEYS
    must_match = RESUME_MUST_MATCH
    bar_desc = "repfusion"

    def __init__(self, cfg: RepFusionConfig, options: RunOptions):
        existing = self.open_run(cfg, single_process(cfg.device), options, REPFUSION_FORMAT, REPFUSION_VERSION,
                                 "repfusion", "repfusion")
        self.train_data = load_train_data(cfg.data, cfg.hflip, cfg.crop_padding)
        self.test_data = load_data(cfg.data, "test", augment=None)
        self._indices = self.step_batches(self.train_data)
        self.pre_ckpt, flow = load_flow(cfg.checkpoint, self.train_data, raw_weights=cfg.raw_weights)
        self.teacher = TeacherFeatures(flow.to(self.device), cfg.layer)
        x0, _ = self.train_data.batch([0], augment=False, device=self.device)
        self.teacher_dim = int(self.teacher(x0, 0.0).shape[1])  # the hooked layer's width
        self.distill_first: Optional[float] = None
        self.begin(existing)

    def build(self) -> None:
        cfg, c, classes = self.cfg, self.train_data.shape[0], self.train_data.num_classes
        self.student = build_encoder(cfg.student, c).to(self.device)
        self.projection = nn.Linear(self.student.feature_dim, self.teacher_dim).to(self.device)
        self.classifier = nn.Linear(self.student.feature_dim, classes).to(self.device)
        self.times = cfg.candidate_times().to(self.device)
        # the times the teacher is evaluated at: the policy's candidates, or the fixed t
        self.teacher_times = self.times if cfg.policy else torch.tensor([cfg.fixed_t], device=self.device)
        self.feat_mean, self.feat_std = self._teacher_stats()
        self.policy = TimestepPolicy(c, self.times).to(self.device) if cfg.policy else None
        self.aux = (nn.Sequential(nn.Linear(self.teacher_dim, cfg.aux_hidden), nn.ReLU(),
                                  nn.Linear(cfg.aux_hidden, classes)).to(self.device) if cfg.policy else None)
        self.opt_distill = torch.optim.SGD(list(self.student.parameters()) + list(self.projection.parameters()),
                                           lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        self.opt_finetune = torch.optim.SGD(list(self.student.parameters()) + list(self.classifier.parameters()),
                                            lr=cfg.finetune_lr, momentum=0.9, nesterov=True,
                                            weight_decay=cfg.weight_decay)
        self.opt_policy = (torch.optim.Adam(list(self.policy.parameters()) + list(self.aux.parameters()),
                                            lr=cfg.policy_lr) if cfg.policy else None)
        self.running = [0.0] * len(_LOG_KEYS) + [0]

    def stream_seed(self) -> int:
        return self.cfg.seed + 1  # the streams this command has drawn since its first release

    def lr_schedules(self):
        """Each phase has its own warm-up and cosine over its own steps."""
        cfg = self.cfg
        return [Schedule(self.opt_distill, cfg.lr, cfg.steps, int(cfg.warmup_frac * cfg.steps)),
                Schedule(self.opt_finetune, cfg.finetune_lr, cfg.finetune_steps,
                         int(cfg.warmup_frac * cfg.finetune_steps), start=cfg.steps)]

    @torch.no_grad()
    def _teacher_stats(self, max_images: int = 512):
        """Per-channel mean and std of the pooled teacher features over (up to `max_images` of) the
        training split, at each teacher time: (T, C) each. With teacher_norm="none": 0 and 1."""
        n_t = len(self.teacher_times)
        if self.cfg.teacher_norm == "none":
            return (torch.zeros(n_t, self.teacher_dim, device=self.device),
                    torch.ones(n_t, self.teacher_dim, device=self.device))
        n = min(max_images, len(self.train_data))
        means, stds = [], []
        for t in self.teacher_times.tolist():
            f = map_batches(self.teacher, lambda x: self.teacher(x, t), self.train_data, indices=range(n),
                            batch_size=self.cfg.eval_batch_size, device=self.device).double()
            sd = f.std(dim=0)
            means.append(f.mean(dim=0).float())
            stds.append((sd + 1e-4 * sd.mean() + 1e-12).float())  # a constant channel does not blow up
        return torch.stack(means), torch.stack(stds)

    def teacher_target(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The distillation target: pooled teacher features of x at teacher_times[idx] (per
        sample), standardised with the statistics of that time."""
        raw = self.teacher(x, self.teacher_times[idx])
        return (raw - self.feat_mean[idx]) / self.feat_std[idx]

    @property
    def total_steps(self) -> int:
        return self.cfg.steps + self.cfg.finetune_steps

    def load_state(self, ckpt: Dict[str, Any]) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.projection.load_state_dict(ckpt["projection"])
        self.classifier.load_state_dict(ckpt["classifier"])
        self.opt_distill.load_state_dict(ckpt["distill_optimizer"])
        self.opt_finetune.load_state_dict(ckpt["finetune_optimizer"])
        if self.policy is not None:
            self.policy.load_state_dict(ckpt["policy"])
            self.aux.load_state_dict(ckpt["aux_head"])
            self.opt_policy.load_state_dict(ckpt["policy_optimizer"])
        self.distill_first = ckpt.get("distill_first")
        self.loss_first = ckpt.get("loss_first", self.distill_first)
        window = ckpt.get("window") or {}  # the interval in progress, as first saved: its values per statistic
        self.running = list(ckpt.get("running") or [sum(window.get(k, [])) for k in _LOG_KEYS] +
                            [max(map(len, window.values()), default=0)])
        self.continue_window(self.running[:-1], self.running[-1])

    def state(self) -> Dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "student_config": dict(self.student.config),
            "projection": self.projection.state_dict(),
            "classifier": self.classifier.state_dict(),
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "aux_head": self.aux.state_dict() if self.aux is not None else None,
            "distill_optimizer": self.opt_distill.state_dict(),
            "finetune_optimizer": self.opt_finetune.state_dict(),
            "policy_optimizer": self.opt_policy.state_dict() if self.opt_policy is not None else None,
            "teacher_dim": self.teacher_dim,
            "times": self.times.cpu(),
            "teacher_times": self.teacher_times.cpu(),
            "teacher_mean": self.feat_mean.cpu(),
            "teacher_std": self.feat_std.cpu(),
            "pretrain": pretrain_info(self.cfg.checkpoint, self.pre_ckpt),
            "data": self.cfg.data,
            "num_classes": self.train_data.num_classes,
            "distill_first": self.distill_first,
            "loss_first": self.loss_first,
            "running": list(self.running),
            "top1": None,
        }

    # -- one step of each phase ------------------------------------------------------------------
    def _distill_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        stats: Dict[str, torch.Tensor] = {}
        if self.policy is not None:
            logits = self.policy(x)
            actions = torch.distributions.Categorical(logits=logits.float()).sample()
        else:
            actions = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        t = self.teacher_times[actions]
        target = self.teacher_target(x, actions)
        pred = self.projection(self.student(x))
        loss = distill_loss(pred, target)
        stats["distill"] = loss.detach()
        if self.policy is not None:
            ce = F.cross_entropy(self.aux(target), y, reduction="none")
            w = entropy_weight(step, cfg.steps, cfg.entropy_coef)
            pol = reinforce_loss(logits, actions, -ce.detach(), entropy_coef=w)
            loss = loss + ce.mean() + pol
            stats.update(aux_ce=ce.mean().detach(), mean_t=t.mean(), entropy_w=self._scalar(w))
            self.opt_policy.zero_grad(set_to_none=True)
        else:
            stats["mean_t"] = self._scalar(cfg.fixed_t)
        self.opt_distill.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_distill.step()
        if self.policy is not None:
            self.opt_policy.step()
        return stats

    def _finetune_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.classifier(self.student(x))
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        self.opt_finetune.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_finetune.step()
        return {"ce": loss.detach(), "correct": (logits.argmax(1) == y).float().mean()}

    def _scalar(self, value: float) -> torch.Tensor:
        """A number as a device tensor without a host round trip (a fill, not a copy)."""
        return torch.full((), float(value), dtype=torch.float64, device=self.device)

    def _logged(self, phase: str) -> Sequence[str]:
        """The statistics a step of `phase` records (the others are None in its log rows)."""
        if phase == "finetune":
            return ("ce", "correct")
        return ("distill", "mean_t") + (("aux_ce", "entropy_w") if self.policy is not None else ())

    # -- the skeleton's step ------------------------------------------------------------------
    def is_row(self, step: int) -> bool:
        return super().is_row(step) or step == self.cfg.steps  # the distillation phase ends on a row

    def is_checkpoint(self, step: int) -> bool:
        return super().is_checkpoint(step) or step == self.cfg.steps  # and on a checkpoint

    def train_step(self, step: int) -> torch.Tensor:
        x, y = self.train_data.batch(self._indices(step), device=self.device)
        if step < self.cfg.steps:
            self.phase = "distill"
            stats = self._distill_step(step, x, y)
            if self.distill_first is None:
                self.distill_first = float(stats["distill"])  # once, at the first step
        else:
            self.phase = "finetune"
            stats = self._finetune_step(x, y)
        # every statistic of the log, on the device (0 where this phase has none); a non-finite one
        # stops the run at the end of the log interval
        self.record(torch.stack([stats[k].double() if k in stats else self._scalar(0.0) for k in _LOG_KEYS]))
        return stats.get("distill", stats.get("ce"))

    def flush(self, step: int, row: bool, bar) -> None:
        sums, steps = self.take_window(step, end=row)
        self.running = sums + [steps]  # the interval so far (saved with a checkpoint)
        if not row:  # the interval in progress is saved with the checkpoint (state()["running"])
            return
        logged = self._logged(self.phase)
        mean = {k: v / self.running[-1] for k, v in zip(_LOG_KEYS, self.running) if k in logged}
        self.history.append([step, self.phase, self.lr] + [mean.get(k) for k in _LOG_KEYS])
        bar.set_postfix({k: f"{v:.4f}" for k, v in mean.items() if k in ("distill", "ce", "aux_ce", "mean_t")},
                        refresh=False)
        self.running = [0.0] * len(_LOG_KEYS) + [0]

    def run(self) -> Result:
        self.student.train()
        metrics = super().run()
        return Result(metrics, self.cfg.out, self.step, self.history,
                      {"student": self.student, "classifier": self.classifier})

    @torch.no_grad()
    def _policy_stats(self) -> Dict[str, Any]:
        """What the trained policy chooses on the test images: the mean probability of each
        candidate time and the expected time under it."""
        probs = map_batches(self.policy, lambda x: F.softmax(self.policy(x).float(), dim=1), self.test_data,
                            batch_size=self.cfg.eval_batch_size, device=self.device)
        mean = probs.mean(dim=0)
        times = self.times.cpu()
        return {"policy_t_mean": round(float((mean * times).sum()), 4),
                "policy_probs": {f"{float(t):.3g}": round(float(p), 4) for t, p in zip(times, mean)}}

    def finish(self, start_step: int, elapsed: float) -> Dict[str, Any]:
        cfg = self.cfg
        net = nn.Sequential(self.student, self.classifier)
        top1 = top1_accuracy(net, self.test_data, batch_size=cfg.eval_batch_size, device=self.device)
        distill_rows = [h for h in self.history if h[1] == "distill"]
        ft_rows = [h for h in self.history if h[1] == "finetune"]
        metrics: Dict[str, Any] = {
            "top1": top1,
            "chance": 1.0 / self.test_data.num_classes,
            "distill_loss_first": self.distill_first,
            "distill_loss": distill_rows[-1][3 + _LOG_KEYS.index("distill")] if distill_rows else None,
            "finetune_ce": ft_rows[-1][3 + _LOG_KEYS.index("ce")] if ft_rows else None,
            "train_top1_last": ft_rows[-1][3 + _LOG_KEYS.index("correct")] if ft_rows else None,
            **self.timing(start_step, elapsed),
            "teacher_dim": self.teacher_dim,
            "teacher_t": None if cfg.policy else cfg.fixed_t,
            "student_params": sum(p.numel() for p in self.student.parameters()),
            "pretrain_step": int(self.pre_ckpt["step"]),
            "pretrain_path": self.pre_ckpt["path"]["name"],
        }
        if self.policy is not None:
            metrics.update(self._policy_stats())
        self.save(top1=top1)
        return self.write_metrics(
            metrics, f"test top-1 {top1:.4f} after {cfg.steps} distillation + {cfg.finetune_steps} "
                     f"finetuning steps; wrote {cfg.out}/metrics.json")
