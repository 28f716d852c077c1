"""The run directory and the run-time every trainer shares (pretraining, finetuning, evaluate and
extract, the related systems): the run directory (RunDir: atomic checkpoint, resume checks,
metrics.json, log.csv), checkpoint reading, RNG state save/restore, seeding, the config merge
convention, the per-step sharded batch order, the learning-rate schedule and distributed set-up.
One home, so the trainers cannot drift apart."""
import copy
import csv
import io
import json
import math
import numbers
import os
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["atomic_write", "rng_state", "set_rng_state", "seed_everything", "rank_seed", "merge_config",
           "cosine_factor", "lr_schedule", "restore_rng_on_resume", "StepBatches", "Dist", "resolve_device",
           "init_distributed", "CheckpointError", "CHECKPOINT_NAME", "checkpoint_file", "read_checkpoint",
           "check_checkpoint", "RunDir", "write_json", "gather_rng_states", "run_on_ranks", "wrap_ddp",
           "load_train_data", "check_number", "check_int", "parse_times", "TIME_CONVENTIONS", "is_factory_spec",
           "import_factory", "check_flow", "prg_velocity", "step_bar", "run_timing"]

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is not of the kind asked for, or does not fit the run that
    tries to use it."""


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


def write_json(path: str, obj: Dict[str, Any]) -> None:
    """One JSON object, atomically, in a folder made if missing (metrics.json and friends)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(obj, indent=1, allow_nan=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


# -------------------------------------------------------------------------------------------------
# checkpoints and the run directory


def checkpoint_file(path: str) -> str:
    """A run directory names its checkpoint.pt; a file names itself."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def read_checkpoint(path: str, *, what: str = "checkpoint", map_location="cpu") -> Dict[str, Any]:
    """torch.load(weights_only=True) of a checkpoint file or run directory; every failure
    is a FileNotFoundError or CheckpointError that names the file."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        # TorchVersion (a str subclass) is allowed because checkpoints of the first release stored
        # torch.__version__ itself; nothing else beyond weights_only's tensors and containers
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated / foreign file
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        # torch's weights_only refusal is a long text; its one informative line names the culprit
        why = next((s for s in lines if s.startswith("WeightsUnpickler error")), lines[0] if lines else "")
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupted, truncated, or not written by "
                              f"prg_fast): {type(e).__name__}: {why}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a prg_fast checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def check_checkpoint(ckpt: Dict[str, Any], where: str, fmt: str, version: int, required: Iterable[str],
                     kind: str) -> Dict[str, Any]:
    """Refuse a checkpoint of another format, a newer version, or one lacking required entries."""
    if ckpt.get("format") != fmt:
        raise CheckpointError(f"{where} is not a prg_fast {kind} checkpoint (format {ckpt.get('format')!r}, "
                              f"expected {fmt!r})")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > version:
        raise CheckpointError(f"{where} has {kind} checkpoint version {ckpt.get('version')!r}; this prg_fast reads "
                              f"versions <= {version} (upgrade prg_fast)")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where} lacks the entries {missing}; it is incomplete or from another tool")
    return ckpt


class RunDir:
    """The run directory of one command (--out DIR): DIR/checkpoint.pt written atomically with its
    format and version, the resume checks, DIR/metrics.json and DIR/log.csv. Under torchrun only the
    main process writes (`main=False` makes every write a no-op) and speaks."""

    def __init__(self, out: str, fmt: Optional[str], version: int, command: str, *, kind: Optional[str] = None,
                 required: Sequence[str] = (), main: bool = True):
        if not isinstance(out, str) or not out:
            raise ValueError(f"out must be a directory path, got {out!r}")
        self.out, self.fmt, self.version, self.command = out, fmt, version, command
        self.kind, self.required, self.main = kind or command, tuple(required), main
        self.ckpt_path = os.path.join(out, CHECKPOINT_NAME)

    def say(self, msg: str) -> None:
        if self.main:
            print(f"prg-fast {self.command}: {msg}", file=sys.stderr, flush=True)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def load(self) -> Optional[Dict[str, Any]]:
        """The run's checkpoint when DIR holds one (validated), else None. A checkpoint of another
        kind in DIR (a pretraining run, another command's run) is refused, never overwritten."""
        if not os.path.isfile(self.ckpt_path):
            return None
        ckpt = read_checkpoint(self.ckpt_path)
        if ckpt.get("format") != self.fmt:
            raise CheckpointError(f"--out {self.out} already holds a {ckpt.get('format')!r} checkpoint, not a "
                                  f"{self.fmt!r} run; use a new --out (it is not overwritten)")
        return check_checkpoint(ckpt, self.ckpt_path, self.fmt, self.version, self.required, self.kind)

    def check_resume(self, ckpt: Dict[str, Any], args: Dict[str, Any], keys: Iterable[str]) -> None:
        """Refuse to continue a run whose defining arguments differ from this one's."""
        old = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        for key in keys:
            if key in old and old[key] != args.get(key):
                raise CheckpointError(f"{self.ckpt_path} was written by a run with {key}={old[key]!r}, but this run "
                                      f"has {key}={args.get(key)!r}; resume with the same arguments or use a new --out")

    def save(self, payload: Dict[str, Any]) -> None:
        if not self.main:
            return
        os.makedirs(self.out, exist_ok=True)
        ckpt = {"format": self.fmt, "version": self.version, **payload, "torch_version": str(torch.__version__)}
        atomic_write(self.ckpt_path, lambda f: torch.save(ckpt, f))

    def write_json(self, name: str, obj: Dict[str, Any]) -> None:
        if self.main:
            write_json(self.path(name), obj)

    def write_log(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not self.main:
            return
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(list(header))
        w.writerows(rows)
        os.makedirs(self.out, exist_ok=True)
        atomic_write(self.path("log.csv"), lambda f: f.write(buf.getvalue().encode()))


def run_timing(step: int, resumed_from: int, elapsed: float, elapsed_prev: float, trained: int,
               batch_size: int) -> Dict[str, Any]:
    """The metrics.json entries every trainer reports about how far and how fast it went."""
    return {"step": step, "resumed_from_step": resumed_from, "wall_time_s": round(elapsed, 3),
            "train_time_total_s": round(elapsed_prev + elapsed, 3),
            "images_per_s": round(trained * batch_size / elapsed, 2) if trained and elapsed > 0 else None}


def step_bar(files: RunDir, step: int, total: int, enabled: bool, desc: str):
    """Start of a training loop: the run directory made, a note when `step` already reaches
    `total`, and the progress bar over optimizer steps (main process only)."""
    from tqdm.auto import tqdm

    if files.main:
        os.makedirs(files.out, exist_ok=True)
    if step >= total:
        files.say(f"{files.ckpt_path} is already at step {step} >= --steps {total}; nothing to train")
    return tqdm(total=total, initial=step, disable=not (files.main and enabled), dynamic_ncols=True,
                mininterval=1.0, desc=desc, unit="step")


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


def merge_config(cls, config, kwargs, **validate_kwargs):
    """A validated private copy of `config` (an instance of the dataclass `cls`, or None), with
    keyword arguments overriding its fields: the shared `f(config=None, **fields)` convention."""
    if config is None:
        config = cls(**kwargs)
    elif kwargs:
        config = cls(**{**asdict(config), **kwargs})
    return copy.deepcopy(config).validate(**validate_kwargs)


# -------------------------------------------------------------------------------------------------
# bring your own flow: any nn.Module called as model(t, x)

TIME_CONVENTIONS = ("prg", "torchcfm")


def is_factory_spec(spec) -> bool:
    """"package.module:factory" names a callable that returns a velocity network."""
    return isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":"))


def import_factory(spec: str):
    """The callable named by "package.module:factory" (imported)."""
    import importlib

    if not is_factory_spec(spec):
        raise ValueError(f"model factory must be written package.module:factory, got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model factory {spec!r}: cannot import {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model factory {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model factory {spec!r} is not callable")
    return obj


def check_flow(model, time_convention: str):
    """A user's velocity network (None: prg_fast builds one): an nn.Module, whose parameters are
    trained and saved; and a known time convention ("prg": t = 0 is data; "torchcfm": t = 0 is noise)."""
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(f"time_convention must be one of {TIME_CONVENTIONS} ('prg': t = 0 is data, "
                         f"'torchcfm': t = 0 is noise), got {time_convention!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module called as model(t, x), got {type(model).__name__}")
    return model


def prg_velocity(model: torch.nn.Module, time_convention: str) -> torch.nn.Module:
    """The network seen in prg_fast's convention (t = 0 data): time_reversed for torchcfm's."""
    if time_convention == "torchcfm":
        from ..ode import time_reversed

        return time_reversed(model)
    return model




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


def parse_times(value, name: str = "save_at") -> Optional[List[float]]:
    """None, a sequence of times, or comma-separated text such as "0.5,1.0" -> a list of floats."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return [float(s) for s in value.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated times such as 0.5,1.0, got {value!r}") from None
    return [float(v) for v in value]


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
    if schedule == "cosine":
        def factor(s):
            return cosine_factor(s, total, warmup, floor)
    elif schedule == "constant":
        def factor(s):
            return (s + 1) / warmup if warmup > 0 and s < warmup else 1.0
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # last_epoch = step - 1: LambdaLR's construction takes one step to `step` and sets the lr for it
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


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


def load_train_data(spec: str, hflip: Optional[bool], crop_padding: int):
    """The training split of `spec` with its default augmentation, flips overridden by `hflip`
    (None keeps the data set's default) and reflect-padded random crops of `crop_padding`."""
    from ..data import Augment, default_augment, load_data

    augment = default_augment(spec, "train")
    augment = Augment(hflip=augment.hflip if hflip is None else bool(hflip), crop_padding=crop_padding)
    return load_data(spec, "train", augment=augment)


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
