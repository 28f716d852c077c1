"""The run-time helpers every trainer shares: random state save/restore and seeding, argument
checks, the learning-rate schedule, the per-step sharded batch order and the training split with
its augmentation. The run directory is in training.rundir, distributed set-up in
training.distributed, the trainers' common loop and config convention in training.trainer."""
import math
import numbers
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .distributed import Dist

__all__ = ["rng_state", "set_rng_state", "gather_rng_states", "seed_everything", "rank_seed", "restore_rng_on_resume",
           "check_number", "check_int", "cosine_factor", "lr_schedule", "StepBatches",
           "load_train_data"]


def rng_state(device: torch.device) -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])


def gather_rng_states(ctx: "Dist", device: torch.device) -> List[Dict[str, Any]]:
    """Every rank's random state (a collective: all ranks call it), CPU tensors, rank order."""
    rng = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in rng_state(device).items()}
    if ctx.world == 1:
        return [rng]
    gathered: List[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, rng)
    return gathered


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    # a distinct stream per rank (different noise on every replica), distinct from the init seed
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % 2**62


def check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number in [lo, hi] (or open ends), else a ValueError naming the argument."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi))
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                         f"got {value!r}")
    return float(value)


def check_int(name: str, value, lo: int) -> int:
    """An integer (not a bool) >= lo, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def cosine_factor(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate multiplier at 0-based `step` of `total`: linear warm-up over `warmup` steps,
    then a cosine from 1 down to `floor`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int, *, schedule: str = "cosine",
                floor: float = 0.0, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over each group's "initial_lr" (its peak; set it before calling): linear warm-up
    over `warmup` steps, then a cosine down to `floor` x peak ("cosine") or the peak ("constant").
    `step` is the optimizer steps already taken (a resumed run): the groups' lr is set for it, and
    each scheduler.step() after optimizer.step() moves to the next."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    floor = 1.0 if schedule == "constant" else floor  # a cosine down to the peak is exactly 1.0 x the peak

    def factor(s):
        return cosine_factor(s, total, warmup, floor)

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # last_epoch = step - 1: LambdaLR's construction takes one step to `step` and sets the lr for it
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def restore_rng_on_resume(rngs: List[Dict[str, Any]], world_size: int, ctx: "Dist", seed: int, step: int,
                          say) -> None:
    """Continue this rank's random streams from a checkpoint's `rngs` (one per rank); a checkpoint
    of another world size cannot be continued, so fresh streams start (the run continues
    correctly, it is just not bitwise the uninterrupted one)."""
    if int(world_size) == ctx.world and len(rngs) == ctx.world:
        set_rng_state(rngs[ctx.rank], ctx.device)
    else:
        seed_everything(rank_seed(seed + step, ctx.rank))
        say(f"note: checkpoint written by {world_size} process(es), resuming with {ctx.world}: random "
            f"streams restart")


class StepBatches:
    """This rank's sample indices for optimizer step `step`: epoch e is a DistributedSampler's
    shuffled order for epoch e (seeded, drop_last), cut into local batches; so the data order is a
    function of (seed, step) alone and resuming at any step reproduces it."""

    def __init__(self, data, ctx: "Dist", seed: int, local_batch: int, global_batch: int):
        self.sampler = torch.utils.data.DistributedSampler(data, num_replicas=ctx.world, rank=ctx.rank,
                                                           shuffle=True, seed=seed, drop_last=True)
        self.local_batch = local_batch
        self.steps_per_epoch = len(self.sampler) // local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size ({global_batch}) is larger than the data set ({len(data)} images)")
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> List[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._epoch = list(self.sampler), epoch
        return self._order[i * self.local_batch:(i + 1) * self.local_batch]


def load_train_data(spec: str, hflip: Optional[bool], crop_padding: int):
    """The training split of `spec` with its default augmentation, flips overridden by `hflip`
    (None keeps the data set's default) and reflect-padded random crops of `crop_padding`."""
    from ..data import Augment, default_augment, load_data

    augment = default_augment(spec, "train")
    augment = Augment(hflip=augment.hflip if hflip is None else bool(hflip), crop_padding=crop_padding)
    return load_data(spec, "train", augment=augment)
