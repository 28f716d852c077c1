"""The one training skeleton of pretrain, finetune, repfusion and genrep: claiming the run directory,
seeding, resuming, the learning-rate schedules, the step loop, streaming logs, checkpoints by step
count and by wall time, and stopping cleanly on SIGINT / SIGTERM. Each trainer keeps only its own
networks, step, state and metrics, and returns the one Result.

A trainer subclasses Trainer and supplies
    build()                         its networks and optimizers (the skeleton seeds the global random
                                    state with --seed first: the same initial weights on every rank)
    lr_schedules() -> [Schedule]    its optimizers' learning rates over the run (default none)
    train_step(step) -> loss        one optimizer step; its statistics go to record() (a tensor, on
                                    the device: the host reads them once per log interval)
    flush(step, row, bar)           the interval's statistics so far (take_window(), ending the
                                    interval when `row`), kept for a checkpoint; a log row when `row`
    state() / load_state(ckpt)      its own checkpoint entries (networks, optimizers, running sums)
    finish(start_step, elapsed)     final numbers -> metrics.json
and calls open_run(...) then begin(ckpt) in its __init__; Trainer.run() does the rest (the
learning rate of the step about to run is self.lr; the schedules step after each step).

The run directory (--out DIR) of every trainer:
    DIR/checkpoint.pt   written atomically every --ckpt-every steps, every --ckpt-minutes, on SIGINT /
                        SIGTERM and at the end; the same command with the same DIR resumes it (the
                        arguments in `must_match` unchanged; --steps may grow)
    DIR/log.csv         the log rows (log_header), rewritten every --log-every steps
    DIR/metrics.json    while training the last log row with "status": "running"; at the end one flat
                        JSON object: the trainer's numbers, timing(), then every argument
The checkpoint (a dict saved by torch.save; loads with weights_only=True) holds the trainer's own
entries (its state(), documented in its module) and
    format          "prg_fast.<command>"
    version         the format's version
    step            optimizer steps completed
    args            dict: every config field of the run that wrote the checkpoint
    world_size      processes that trained
    rng             list, one entry per rank: {"torch": ByteTensor, "cuda": ByteTensor or None,
                    "numpy": dict, "python": tuple} -- the random state after `step` steps
    history         the log rows
    elapsed_s       training wall time summed over all runs so far
    torch_version   torch.__version__ of the writer

Stopping: the first SIGINT or SIGTERM lets the current step finish, writes a checkpoint (every
rank agrees on the step under torchrun) and raises Interrupted, a KeyboardInterrupt whose
exit_code is 128 + the signal number (130 for SIGINT, 143 for SIGTERM); running the same command
again resumes bitwise. A second signal aborts at once (KeyboardInterrupt): nothing is written, the
last checkpoint stays intact. torchrun forwards one signal to every worker and waits 30 s for them.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .distributed import Dist
from .rundir import CheckpointError, RunDir
from .runs import (StepBatches, check_int, check_number, gather_rng_states, lr_schedule, rank_seed,
                   restore_rng_on_resume, seed_everything)

__all__ = ["Trainer", "TrainConfig", "RunOptions", "Result", "Schedule", "Interrupted", "StopRequests", "configure",
           "ranged", "one_of"]


@dataclass
class Result:
    """What every trainer returns: its final metrics (those of metrics.json), its run directory, the
    optimizer steps completed, the log rows, and the trained networks by name, which read as
    attributes too: r.model and r.ema (pretrain), r.classifier (finetune), r.encoder (genrep),
    r.student and r.classifier (repfusion)."""

    metrics: Dict[str, Any]
    out: str
    step: int
    history: List[List[Any]] = field(default_factory=list)
    networks: Dict[str, torch.nn.Module] = field(default_factory=dict)

    def __getattr__(self, name: str):  # called only for names that are not fields
        networks = self.__dict__.get("networks", {})
        if name in networks:
            return networks[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (networks: {sorted(networks)})")


@dataclass
class Schedule:
    """The learning rate of one optimizer over the run's steps [start, start + total): a linear
    warm-up over `warmup` steps, then a cosine down to floor x the peak ("cosine") or the peak
    ("constant"), through torch's LambdaLR (runs.lr_schedule). A param group's peak is peaks[its
    "name"], else `peak`, which is also the rate the log shows."""

    optimizer: torch.optim.Optimizer
    peak: float
    total: int
    warmup: int
    kind: str = "cosine"
    floor: float = 0.0
    start: int = 0
    peaks: Dict[str, float] = field(default_factory=dict)

    def covers(self, step: int) -> bool:
        return self.start <= step < self.start + self.total


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after a finished step, its checkpoint written: run the same command
    again (same --out) to resume. exit_code: 128 + the signal number."""

    def __init__(self, command: str, signum: int, step: int, checkpoint: str):
        self.command, self.signum, self.step, self.checkpoint = command, signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} after step {step}: checkpoint written to {checkpoint}; "
                         f"run the same command again (same --out) to resume")


class StopRequests:
    """While active (a context manager, main thread only): the first SIGINT / SIGTERM is recorded in
    `signum` for the loop to act on at the end of its step; a second one restores the previous
    handlers and raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say):
        self.say, self.signum, self._previous = say, None, {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt(f"a second signal ({name}): aborted at once; the last checkpoint is intact")
        self.signum = signum
        self.say(f"{name}: finishing this step, then writing a checkpoint (send it again to abort at once)")


def ranged(default, lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """A config field declared with its range, which check_fields checks (an int field: an integer
    >= lo; a float field: a finite number in [lo, hi], or open ends)."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def one_of(default, choices):
    """A config field declared with the values it takes, which check_fields checks."""
    return field(default=default, metadata={"choices": tuple(choices)})


def check_fields(config) -> None:
    """Every field of the dataclass `config` declared with `ranged` or `one_of` and every bool field
    holds what it may (None where the field is Optional), else a ValueError naming the field."""
    for f in fields(config):
        value, limits, choices = getattr(config, f.name), f.metadata.get("range"), f.metadata.get("choices")
        if value is None and "Optional" in str(f.type):
            continue
        if str(f.type) == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be True or False, got {value!r}")
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {sorted(choices)}, got {value!r}")
        if limits is not None and "int" in str(f.type):
            check_int(f.name, value, limits[0])
        elif limits is not None:
            check_number(f.name, value, limits[0], limits[1], lo_open=limits[2], hi_open=limits[3])


@dataclass
class TrainConfig:
    """The fields every trainer's config shares and their checks (a config redeclares a field to
    give it its own default; the field then loses its `ranged`, so these are checked by name)."""

    data: str = "digits"
    out: str = "runs/train"
    steps: int = 500
    batch_size: int = 128  # global: split evenly over the processes
    hflip: Optional[bool] = None  # None: the data set's default (flips for natural images, not digits)
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 25
    device: str = "auto"
    progress: bool = True

    def check_run_fields(self, min_steps: int = 1) -> None:
        check_int("steps", self.steps, min_steps)
        for name in ("batch_size", "ckpt_every", "log_every"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)  # out is checked by the RunDir that claims it
        check_fields(self)

    def pretrained_checkpoint(self, command: str) -> str:
        """--checkpoint (a pretraining run directory or checkpoint file) as an absolute path."""
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"{command} needs --checkpoint: a pretraining run directory (prg-fast pretrain --out DIR)")
        return os.path.abspath(os.path.expanduser(self.checkpoint))


@dataclass
class RunOptions:
    """How a run is kept, not what it computes (so not part of a checkpoint's arguments):
    ckpt_minutes: also checkpoint when this much wall time passed since the last one (0: off);
    force: write into a non-empty folder prg_fast did not make."""

    ckpt_minutes: float = ranged(10.0, 0.0)
    force: bool = False

    def validate(self) -> "RunOptions":
        check_fields(self)
        return self


def configure(cls, config, kwargs: Dict[str, Any], **validate_kwargs) -> Tuple[Any, RunOptions]:
    """The trainers' `f(config=None, **fields)` convention: a validated private copy of `config` (an
    instance of the dataclass `cls`, or None) with keyword arguments overriding its fields, and the
    RunOptions taken out of those keyword arguments first."""
    options = RunOptions(**{k: kwargs.pop(k) for k in ("ckpt_minutes", "force") if k in kwargs}).validate()
    if config is None:
        config = cls(**kwargs)
    elif kwargs:
        config = cls(**{**asdict(config), **kwargs})
    return copy.deepcopy(config).validate(**validate_kwargs), options


class Trainer(ABC):
    """The skeleton (see the module doc); a subclass's __init__ calls open_run(), loads what it needs
    before its networks are built, then calls begin()."""

    clock = staticmethod(time.perf_counter)  # seconds; what wall-time checkpoints and timings read
    log_header: Sequence[str] = ()
    must_match: Sequence[str] = ()  # arguments a resumed run must share with the checkpoint's
    bar_desc = "train"

    # -- set-up ---------------------------------------------------------------------------------
    def open_run(self, cfg: TrainConfig, ctx: Dist, options: RunOptions, fmt: str, version: int, command: str,
                 kind: str, required: Sequence[str] = ()) -> Optional[Dict[str, Any]]:
        """Set the run's config and process context, and claim --out for this command (refused
        before any work if another command's run, a file or an unrelated non-empty folder is
        there); the checkpoint to resume from, or None."""
        self.cfg, self.ctx, self.device, self.options = cfg, ctx, ctx.device, options
        if cfg.batch_size % ctx.world:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                             f"({ctx.world})")
        self.local_batch = cfg.batch_size // ctx.world
        self.files = RunDir(self.cfg.out, fmt, version, command, kind=kind, required=required, main=self.ctx.main)
        self.step, self.resumed_from, self.history, self.elapsed_prev = 0, 0, [], 0.0
        self.loss_first: Optional[float] = None
        self.window_steps, self.window_sum = 0, None
        self.lr: Optional[float] = None
        return self.files.claim(force=options.force)

    def step_batches(self, data) -> StepBatches:
        """This rank's sample indices of each step, a function of (seed, step) alone."""
        return StepBatches(data, self.ctx, self.cfg.seed, self.local_batch, self.cfg.batch_size)

    def begin(self, ckpt: Optional[Dict[str, Any]]) -> None:
        """build() with the global random state seeded by --seed (the same initial weights on every
        rank and in every run); continue from `ckpt` (arguments checked, state and random streams
        restored) or seed the fresh run's streams (stream_seed()); then the learning-rate schedules,
        at this run's peaks (also over a resumed optimizer's saved groups)."""
        seed_everything(self.cfg.seed)
        self.build()
        if ckpt is None:
            seed_everything(self.stream_seed())
        else:
            self._resume(ckpt)
        self.schedules = []
        for s in self.lr_schedules():
            for group in s.optimizer.param_groups:
                group["initial_lr"] = s.peaks.get(group.get("name"), s.peak)
                group.pop("peak_lr", None)  # what finetuning checkpoints of the first release called initial_lr
            self.schedules.append((s, lr_schedule(s.optimizer, s.total, s.warmup, schedule=s.kind, floor=s.floor,
                                                  step=max(self.step - s.start, 0))))

    def stream_seed(self) -> int:
        """The seed of a fresh run's random streams: one stream per rank, apart from the initial
        weights' seed."""
        return rank_seed(self.cfg.seed, self.ctx.rank)

    def lr_schedules(self) -> Sequence[Schedule]:
        return ()

    def lr_at(self, step: int) -> Optional[float]:
        """The logged learning rate of 0-based step `step`: its schedule's peak x factor."""
        for s, sched in self.schedules:
            if s.covers(step):
                return sched.lr_lambdas[0](step - s.start) * s.peak
        return self.lr

    def _resume(self, ckpt: Dict[str, Any]) -> None:
        self.files.check_resume(ckpt, asdict(self.cfg), self.must_match)
        try:
            self.load_state(ckpt)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # load_state_dict on a misfit
            raise CheckpointError(f"{self.files.ckpt_path}: the saved state does not fit this run: "
                                  f"{e}") from e
        self.step = self.resumed_from = int(ckpt["step"])
        self.history = [list(h) for h in ckpt.get("history", [])]
        self.elapsed_prev = float(ckpt.get("elapsed_s", 0.0))
        rng = ckpt["rng"]  # one state per rank; the related systems' first release saved a single one
        restore_rng_on_resume(rng if isinstance(rng, list) else [rng], ckpt.get("world_size", 1), self.ctx,
                              self.cfg.seed, self.step, self.files.say)
        self.files.say(f"resuming from {self.files.ckpt_path} at step {self.step}")

    # -- what a trainer supplies ----------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    def is_row(self, step: int) -> bool:
        """Whether step `step` (1-based count) ends a log interval."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def is_checkpoint(self, step: int) -> bool:
        """Whether step `step` (1-based count) is checkpointed by step count."""
        return step % self.cfg.ckpt_every == 0 or step == self.total_steps

    @abstractmethod
    def build(self) -> None: ...

    @abstractmethod
    def train_step(self, step: int): ...

    @abstractmethod
    def flush(self, step: int, row: bool, bar) -> None: ...

    @abstractmethod
    def state(self) -> Dict[str, Any]: ...

    @abstractmethod
    def load_state(self, ckpt: Dict[str, Any]) -> None: ...

    @abstractmethod
    def finish(self, start_step: int, elapsed: float) -> Dict[str, Any]: ...

    # -- the loop -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Training wall time over all runs so far."""
        return self.elapsed_prev + self.clock() - self.t_start

    def run(self) -> Dict[str, Any]:
        """Train to total_steps, then finish(); the final metrics."""
        start_step, self.t_start = self.step, self.clock()
        if self.step >= self.total_steps:
            self.files.say(f"{self.files.ckpt_path} is already at step {self.step} >= --steps {self.total_steps}; "
                           f"nothing to train")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.files.main and self.cfg.progress),
                   dynamic_ncols=True, mininterval=1.0, desc=self.bar_desc, unit="step")
        last_save = self.t_start
        with StopRequests(self.files.say) as stop:
            while self.step < self.total_steps:
                self.lr = self.lr_at(self.step)
                loss = self.train_step(self.step)
                for s, sched in self.schedules:
                    if s.covers(self.step):
                        sched.step()
                if self.loss_first is None:
                    self.loss_first = float(loss)  # the one host read outside the log intervals
                self.step += 1
                bar.update(1)
                minutes = self.options.ckpt_minutes
                stop_now, time_due = self._agree(stop.signum is not None,
                                                 minutes > 0 and self.clock() - last_save >= 60 * minutes)
                row = self.is_row(self.step)
                save = stop_now or time_due or self.is_checkpoint(self.step)
                if row or save:
                    self.flush(self.step, row, bar)
                if row:
                    self.write_progress("running")
                if save:
                    self.save()
                    last_save = self.clock()
                if stop_now:
                    bar.close()
                    self.write_progress("interrupted")
                    raise Interrupted(self.files.command, stop.signum or signal.SIGTERM, self.step,
                                      self.files.ckpt_path)
        bar.close()
        metrics = self.finish(start_step, self.clock() - self.t_start)
        if self.ctx.world > 1:
            dist.barrier()  # every rank returns only once rank 0 has written its files
        return metrics

    def _agree(self, stop: bool, due: bool):
        """(stop, checkpoint due) as every rank sees them: any rank's request counts for all, so
        all ranks stop (and take part in the checkpoint's collectives) at the same step."""
        if self.ctx.world == 1:
            return stop, due
        flags = torch.tensor([float(stop), float(due)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def record(self, stats: torch.Tensor) -> None:
        """Add one step's statistics (a 1-D tensor on the device, the loss first) to the log
        interval in progress: summed on the device, so a step costs no host synchronisation, in
        float64, so the sum is the one a float64 sum of the steps' values gives on the host."""
        stats = stats.detach().to(self._sum_dtype())
        self.window_sum = stats if self.window_sum is None else self.window_sum + stats
        self.window_steps += 1

    def _sum_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "mps" else torch.float64  # (MPS has no float64)

    def continue_window(self, sums: Sequence[float], steps: int) -> None:
        """A resumed run's log interval in progress (its sums over the steps and the ranks so far, as
        take_window gave them at the checkpoint): the next steps add to them in the order the
        uninterrupted run adds them, so the interval's figures come out the same (rank 0 holds the
        sums, the other ranks start from zero)."""
        if steps:
            sums = torch.tensor([float(v) for v in sums], dtype=self._sum_dtype(), device=self.device)
            self.window_sum = sums if self.ctx.rank == 0 else torch.zeros_like(sums)
        self.window_steps = int(steps)

    def take_window(self, step: int, end: bool = True):
        """(the log interval's recorded statistics so far, summed over its steps and over the ranks,
        its steps per rank). `end`: the interval ends here and the next starts empty; else (a
        checkpoint inside the interval) it goes on summing. A non-finite statistic stops the run
        with what to do."""
        sums, steps = self.window_sum.double().clone(), self.window_steps
        if self.ctx.world > 1:
            dist.all_reduce(sums)
        if end:
            self.window_sum, self.window_steps = None, 0
        values = [float(v) for v in sums.cpu()]  # the interval's host read
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"the loss became non-finite between steps {step - steps} and {step} "
                                     f"(statistics {values}); lower the learning rate (--lr {self.cfg.lr:g})")
        return values, steps

    # -- files ----------------------------------------------------------------------------------
    def save(self, **final) -> None:
        """The checkpoint (atomically) and log.csv; `final` adds the finished run's entries."""
        rngs = gather_rng_states(self.ctx, self.device)  # a collective: every rank takes part
        self.files.save({"step": self.step, **self.state(), "args": asdict(self.cfg), "world_size": self.ctx.world,
                         "rng": rngs, "history": self.history, "elapsed_s": self.elapsed(), **final})
        self.files.write_log(self.log_header, self.history)

    def write_progress(self, status: str) -> None:
        """log.csv and a running metrics.json (the last log row), so a long run is visible as it goes."""
        last = dict(zip(self.log_header, self.history[-1])) if self.history else {}
        self.files.write_log(self.log_header, self.history)
        self.files.write_json("metrics.json", {"command": self.files.command, "status": status, **last,
                                               "step": self.step, "steps": self.total_steps,
                                               "loss_start": self.loss_first,
                                               "train_time_total_s": round(self.elapsed(), 3)})

    def timing(self, start_step: int, elapsed: float) -> Dict[str, Any]:
        """The metrics.json entries about how far, how fast and where this invocation went."""
        trained = self.step - start_step
        return {"command": self.files.command, "step": self.step, "resumed_from_step": self.resumed_from,
                "wall_time_s": round(elapsed, 3), "train_time_total_s": round(self.elapsed_prev + elapsed, 3),
                "images_per_s": round(trained * self.cfg.batch_size / elapsed, 2) if trained and elapsed > 0
                else None, "world_size": self.ctx.world, "device_used": str(self.device),
                "torch_version": str(torch.__version__)}

    def write_metrics(self, metrics: Dict[str, Any], summary: str) -> Dict[str, Any]:
        """metrics.json of the finished run (`metrics`, then every argument not already named), and
        the one-line `summary` of it on stderr."""
        for key, value in asdict(self.cfg).items():
            metrics.setdefault(key, value)
        self.files.write_json("metrics.json", metrics)
        self.files.say(summary)
        return metrics
