"""Distributed set-up: one process, or one per rank under torchrun (RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT), with its device; a process group made here is torn down
after the run; DistributedDataParallel only when there are several processes."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "resolve_device", "run_on_ranks", "wrap_ddp", "init_distributed", "single_process"]


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
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is visible")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def run_on_ranks(run, device_name: str):
    """run(ctx) in this process's distributed context; a process group set up here is torn down
    afterwards, whatever happens."""
    ctx = init_distributed(device_name)
    try:
        return run(ctx)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, ctx: Dist) -> torch.nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself in one process."""
    if ctx.world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def init_distributed(device_name: str) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them this
    is a single process. NCCL for CUDA devices, gloo for CPU."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, world, local, resolve_device(device_name, local), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return single_process(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device = resolve_device(device_name, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, device, owns_group=True)


def single_process(device_name: str) -> Dist:
    """The context of a command that runs in one process only (repfusion, genrep)."""
    return Dist(0, 1, 0, resolve_device(device_name, 0), owns_group=False)
