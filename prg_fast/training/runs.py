"""The run directory and the run-time every trainer shares (pretraining, finetuning, evaluate and
extract, the related systems): atomic file writes, RNG state save/restore, seeding, the config
merge convention, the per-step sharded batch order, the learning-rate schedule and distributed
set-up. One home, so the trainers cannot drift apart."""
import copy
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["atomic_write", "rng_state", "set_rng_state", "seed_everything", "rank_seed", "merge_config",
           "cosine_factor", "restore_rng_on_resume", "StepBatches", "Dist", "resolve_device", "init_distributed"]


def atomic_write(path: str, write) -> None:
    """write(file) into a temporary file in the same directory, then os.replace: a crash at any
    moment leaves either the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        # mkstemp makes the file 0600; a run file should get the mode any other new file gets
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    # a distinct stream per rank (different noise on every replica), distinct from the init seed
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % 2**62


def merge_config(cls, config, kwargs):
    """A validated private copy of `config` (an instance of the dataclass `cls`, or None), with
    keyword arguments overriding its fields: the shared `f(config=None, **fields)` convention."""
    if config is None:
        config = cls(**kwargs)
    elif kwargs:
        config = cls(**{**asdict(config), **kwargs})
    return copy.deepcopy(config).validate()


def cosine_factor(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate multiplier at 0-based `step` of `total`: linear warm-up over `warmup` steps,
    then a cosine from 1 down to `floor`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def restore_rng_on_resume(ckpt: Dict[str, Any], ctx: "Dist", device: torch.device, seed: int, step: int, say) -> None:
    """Continue this rank's random streams from a checkpoint; a checkpoint of another world size
    cannot be continued, so fresh streams start (the run continues correctly, it is just not
    bitwise the uninterrupted one)."""
    rng = ckpt["rng"]
    if int(ckpt["world_size"]) == ctx.world and len(rng) == ctx.world:
        set_rng_state(rng[ctx.rank], device)
    else:
        seed_everything(rank_seed(seed + step, ctx.rank))
        say(f"note: checkpoint written by {ckpt['world_size']} process(es), resuming with {ctx.world}: "
            "random streams restart")


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


# -------------------------------------------------------------------------------------------------
# distributed set-up


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but no CUDA device is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


def init_distributed(device_name: str) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them this
    is a single process. NCCL for CUDA devices, gloo for CPU."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, world, local, resolve_device(device_name, local), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0, resolve_device(device_name, 0), owns_group=False)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device = resolve_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, device, owns_group=True)
