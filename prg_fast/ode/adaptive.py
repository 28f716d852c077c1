"""Adaptive steps for odeint: an embedded pair under torchdiffeq's controller, as Problem.controller.
Semantics: docs/engine.md, "Adaptive odeint"; why so: docs/engine.md, "Inside the engine": adaptive."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, ClassVar, List, Optional

import torch

from . import states
from .backprop import Backprop
from .fixed_grid import odeint_values
from .integrate import Grid, check_state
from .kept_graphs import EvaluationGraphs
from .rerun import once_differentiable
from .solvers import EmbeddedTableau
from .stored_adjoint import StoredAdjoint

# torchdiffeq's options and defaults; numbers as (lowest value, whether it is excluded)
DEFAULTS = dict(first_step=None, safety=0.9, ifactor=10.0, dfactor=0.2, max_num_steps=2 ** 31 - 1, min_step=0.0,
                max_step=math.inf, step_t=(), jump_t=(), norm=None, dtype=torch.float64)
_LOW = dict(first_step=(0, True), safety=(0, True), ifactor=(1, False), dfactor=(0, True), max_num_steps=(1, False),
            min_step=(0, False), max_step=(0, True))
CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


@dataclass
class SolveStats:
    """What an adaptive solve did (diffrax's sol.stats): accepted and rejected steps, function evaluations
    (the first step's probe and re-evaluations after jumps included), the accepted times from t[0]."""

    accepted: int = 0
    rejected: int = 0
    evaluations: int = 0
    times: List[float] = field(default_factory=list)


@dataclass(frozen=True)
class Control:
    """The controller's options, checked by `check_options`, and its step-size rule."""

    order: int
    first_step: Optional[float]
    safety: float
    ifactor: float
    dfactor: float
    max_num_steps: int
    min_step: float
    max_step: float
    step_t: tuple  # internal times after the start, increasing
    jump_t: tuple
    norm: Optional[Callable]
    dtype: torch.dtype

    def clamp(self, h: float) -> float:
        h = min(max(h, self.min_step), self.max_step) if math.isfinite(h) else self.min_step
        return h if self.dtype == torch.float64 else torch.tensor(h, dtype=self.dtype).item()

    def step_end(self, t: float, h: float):
        """(end, size, on a jump point) of a step of size h from t, stopped at step_t / jump_t points."""
        end, jump = t + h, False
        dt = end - t  # the step size a backward reads from the grid (integrate.Problem.step_at)
        for points, is_jump in ((self.step_t, False), (self.jump_t, True)):
            nxt = next((p for p in points if p > t), None)
            if nxt is not None and nxt <= end:
                end, dt, jump = nxt, nxt - t, is_jump
        return end, dt, jump

    def next_step(self, h: float, ratio: float) -> float:
        if ratio == 0 or not math.isfinite(ratio):
            return self.clamp(h * (self.ifactor if ratio == 0 else self.dfactor))
        low = self.dfactor if ratio >= 1 else 1.0
        return self.clamp(h * min(self.ifactor, max(self.safety / ratio ** (1 / self.order), low)))


def _option(options: dict, name: str):
    value = options[name]
    if name in ("step_t", "jump_t"):  # (a tensor of one time too: it is a list of times)
        value = value.detach().reshape(-1).tolist() if isinstance(value, torch.Tensor) else list(value or ())
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in value):
            raise ValueError(f"options[{name!r}] must be a 1-D sequence or tensor of finite times, "
                             f"got {options[name]!r}")
        return value
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if name not in _LOW or value is None and name == "first_step":
        return value
    low, strict = _LOW[name]
    kind = numbers.Integral if name == "max_num_steps" else numbers.Real
    if (isinstance(value, bool) or not isinstance(value, kind) or math.isnan(value) or value < low
            or strict and value == low):
        raise ValueError(f"options[{name!r}] must be a number {'>' if strict else '>='} {low}, got {options[name]!r}")
    return int(value) if kind is numbers.Integral else float(value)


def check_options(options, tableau: EmbeddedTableau, sign: float, start: float) -> Control:
    if not isinstance(options, (dict, type(None))):
        raise TypeError("options must be a dict (torchdiffeq's, e.g. dict(max_num_steps=1000)), "
                        f"got {type(options).__name__}")
    unknown = sorted(set(options or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"options: unsupported key(s) {unknown} for the adaptive method {tableau.name!r}; supported: "
                         f"{sorted(DEFAULTS)} (step_size, grid_constructor, interp and perturb are the fixed-step "
                         "methods' options)")
    options = {**DEFAULTS, **(options or {})}
    o = {name: _option(options, name) for name in DEFAULTS}
    if o["norm"] is not None and not callable(o["norm"]):
        raise TypeError(f"options['norm'] must be callable (a state -> a scalar), got {o['norm']!r}")
    if o["dtype"] not in (torch.float32, torch.float64):
        raise ValueError(f"options['dtype'] (the dtype of times) must be torch.float32 or torch.float64, "
                         f"got {o['dtype']!r}")
    if o["dfactor"] > 1 or o["max_step"] < o["min_step"]:
        raise ValueError("options: dfactor must be in (0, 1] and max_step >= min_step")
    step_t, jump_t = ({sign * v for v in o[k] if sign * v > start} for k in ("step_t", "jump_t"))
    if step_t & jump_t:
        raise ValueError("options: step_t and jump_t must not share a time")
    o.update(step_t=tuple(sorted(step_t)), jump_t=tuple(sorted(jump_t)))
    return Control(tableau.order, **o)


class Stepper:
    """One attempted step's arithmetic through the problem's Backend (`buffered`: into buffers it owns), each
    evaluation through `evaluator` as (n, i) of the accepted grid (docs/engine.md, "Inside the engine": adaptive)."""

    def __init__(self, problem, controller: "Controller", buffered: bool, evaluator: Optional[Callable]):
        self.problem, self.tableau, self.stats = problem, problem.tableau, controller.stats
        self.net_dtype, self.state_dtype = problem.net_dtype, problem.state_dtype
        self.combine, self.combine_rows = problem.backend.combine, problem.backend.combine_rows
        self.into = problem.backend.into if buffered else None
        (self.rtol, self.atol), self.norm = controller.tolerance, controller.norm
        used = lambda ws: ([j for j, w in enumerate(ws) if w != 0.0], [w for w in ws if w != 0.0])  # noqa: E731
        self.rows = [used(row) for row in self.tableau.a]
        self.b, self.e = used(self.tableau.b), used(self.tableau.error)
        self.late_fsal = self.tableau.error[-1] == 0.0  # the error estimate does not read the last stage
        self.buffers: dict = {}
        self.moduli = controller.moduli  # the state is a complex one's real view
        # t[0] - t[0].detach(): the grid moves with t[0] (time gradients)
        self.shift = None if controller.shifts is None else controller.shifts[0]
        self.evaluator: Callable = evaluator or (lambda problem, n, i, t, x: problem.evaluate(t, x))
        self.inputs: Optional[list] = None
        # evaluations whose graphs fit the stored adjoint's "auto" budget
        self.limit = controller.limit if evaluator is not None and torch.is_grad_enabled() else math.inf

    def buffer(self, name: str, like: torch.Tensor, dtype=None, avoid=None) -> Optional[torch.Tensor]:
        """A buffer of the solve (None with grad mode); of name+"'" when `name`'s is `avoid`."""
        if self.into is None:
            return None
        buf = self.buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != (dtype or like.dtype):
            buf = self.buffers[name] = torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)
        return self.buffer(name + "'", like, dtype) if buf is avoid else buf

    def lin(self, base, ks, used, hs: float, out=None, dtype=None, alpha: float = 1.0):
        """alpha base + hs sum_j w_j k_j over the used (j, w_j), into `out` when given."""
        return self.combine(base, [ks[j] for j in used[0]], [hs * w for w in used[1]], alpha, dtype, out)

    def evaluate(self, n: int, i: int, u: float, x: torch.Tensor) -> torch.Tensor:
        """Evaluation (n, i) at time u (of t), as torchdiffeq calls it: t a 0-dim tensor."""
        x = x if x.dtype == self.net_dtype else x.to(self.net_dtype)
        time = torch.full((), u, dtype=self.state_dtype, device=x.device)
        if self.inputs is not None:
            self.inputs.append(x)
        k = self.evaluator(self.problem, n, i, time if self.shift is None else time + self.shift.to(time), x)
        self.stats.evaluations += 1
        if self.stats.evaluations > self.limit:  # the stored adjoint's fallback takes it from here (kept_graphs)
            raise torch.OutOfMemoryError(f"the graphs of {self.limit} evaluations fill memory_budget='auto'")
        # the stage buffer is overwritten by the next stage: a velocity returning its input (or a view of it:
        # of its shape, so at its address) is copied
        stage = self.buffers.get("stage")
        return k.clone() if stage is not None and k.data_ptr() == stage.data_ptr() else k

    def stages(self, y, k0, times: list, hs: float, n: int):
        """(k_0 .. k_{s-2}, y1): every stage but the last (FSAL) one, and the solution."""
        ks = [k0]
        for i in range(1, len(times) - 1):
            xi = self.lin(y, ks, self.rows[i], hs, self.buffer("stage", y, self.net_dtype), self.net_dtype)
            ks.append(self.evaluate(n, i, times[i], xi))
        return ks, self.lin(y, ks, self.b, hs, self.buffer("state", y, avoid=y), self.state_dtype)

    def magnitude(self, v: torch.Tensor, out=None) -> torch.Tensor:
        """|v|, into `out` if given; of a complex state's real view (..., 2), the moduli (..., 1), as torchdiffeq's."""
        return torch.linalg.vector_norm(v, dim=-1, keepdim=True) if self.moduli else torch.abs(v, out=out)

    @torch.no_grad()
    def error_ratio(self, y, y1, ks, hs: float) -> float:
        """norm(err / (atol + rtol max(|y|, |y1|))), NaN when y1 is not finite: one synchronisation."""
        y, y1 = y.detach(), y1.detach()
        out = None if self.moduli else self.buffer("scale", y)  # (the moduli have a shape of their own)
        scale = torch.maximum(self.magnitude(y, out), self.magnitude(y1), out=out)
        scale.mul_(self.rtol).add_(self.atol)
        err = self.lin(y, [k.detach() for k in ks], self.e, hs, self.buffer("err", y), y.dtype, alpha=0.0)
        return float(scale.amax() * 0 + self.norm(err.div_(scale)))  # NaN * 0: a non-finite scale reads NaN

    def dense(self, y, ks, hs: float, theta: float, out=None, slope: bool = False) -> torch.Tensor:
        """y(t + theta h) = y + h sum_i b_i(theta) k_i; with `slope` its derivative h sum_i b_i'(theta) k_i."""
        weights = self.tableau.slopes(theta) if slope else self.tableau.weights(theta)
        return self.lin(y, ks, (range(len(ks)), weights), hs, out, self.state_dtype, alpha=0.0 if slope else 1.0)

    def move(self, at: torch.Tensor, ks, hs: float, theta: torch.Tensor) -> torch.Tensor:
        """`at` (the dense output at theta's value) + h sum_i (b_i(theta) - b_i(theta's value)) k_i: a zero whose
        derivatives in theta are the dense output's in every order (plain backprop's time gradients)."""
        rows = torch.stack([torch.ones_like(theta)] + [hs * (w - w.detach()) for w in self.tableau.weights(theta)])
        return self.combine_rows(at, ks, rows.to(self.state_dtype)[None], self.state_dtype)


class Event:
    """torchdiffeq's event handling: every output of event_fn(t, y) signed to start positive, the event where
    their minimum reaches 0 (checked at each accepted step's end, bisected on the dense output to `tol`)."""

    def __init__(self, fn: Callable, user_state: Callable, tol: float):
        self.fn, self.user_state, self.tol, self.signs = fn, user_state, tol, None

    def combined(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.fn(t, self.user_state(y))
        self.signs = torch.sign(c).detach() if self.signs is None else self.signs
        return (c * self.signs).min()

    @torch.no_grad()
    def value(self, u: float, y: torch.Tensor) -> float:
        return float(self.combined(torch.tensor(u, dtype=y.dtype), y))

    @torch.no_grad()
    def locate(self, loop: "AdaptiveLoop", last) -> float:
        t0, dt, y0, ks = last
        lo, hi = t0, t0 + dt
        while hi - lo > self.tol and lo < (lo + hi) / 2 < hi:
            mid = (lo + hi) / 2
            above = self.value(loop.user(mid), loop.stepper.dense(y0, ks, loop.sign * dt, (mid - t0) / dt)) > 0
            lo, hi = (mid, hi) if above else (lo, mid)
        return (lo + hi) / 2


class EventTime(torch.autograd.Function):
    """(event time t*, state y* there) with the implicit function theorem's gradient, as torchdiffeq's
    odeint_event (docs/engine.md, "Inside the engine": adaptive)."""

    @staticmethod
    def forward(ctx, func, event: Event, t: torch.Tensor, y: torch.Tensor):
        ctx.func, ctx.event = func, event
        ctx.save_for_backward(t, y)
        return t.detach().clone(), y.detach().clone()

    @staticmethod
    def backward(ctx, g_t, g_y):
        t, y = (v.detach().requires_grad_() for v in ctx.saved_tensors)
        with torch.enable_grad():
            dc_dt, dc_dy = torch.autograd.grad(ctx.event.combined(t.to(y.dtype), y), (t, y), materialize_grads=True)
        with torch.no_grad():
            f = ctx.func(t.to(y.dtype), y).to(y.dtype)
        rate = dc_dt.to(y.dtype) + (dc_dy * f).sum()
        if rate == 0:
            raise ValueError("the event function reaches 0 without crossing it (its rate of change along the "
                             "solution is 0 there): the event time has no derivative")
        return None, None, None, g_y - dc_dy * (g_t.to(y.dtype) + (g_y * f).sum()) / rate


class DenseSlope(torch.autograd.Function):
    """(theta - theta.detach()) slope, zero: how an adjoint's dense output moves with its time theta, to
    first order, as its adjoint is differentiable once (a second derivative through it raises)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, slope: torch.Tensor):
        ctx.slope, ctx.differentiated = slope, (theta,)
        return torch.zeros_like(slope)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        return torch.sum(g * ctx.slope, dtype=torch.float64), None


@torch.no_grad()
def initial_step(loop: "AdaptiveLoop", t: float, y: torch.Tensor, f0: torch.Tensor) -> float:
    """Hairer, Norsett & Wanner's estimate (Solving ODEs I, II.4) as torchdiffeq's: one probe."""
    st = loop.stepper
    y, f0 = y.detach(), f0.detach().to(y.dtype)
    scale = st.atol + st.magnitude(y) * st.rtol
    d0, d1 = float(st.norm(y / scale)), float(st.norm(f0 / scale))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    st.stats.evaluations += 1
    probe = torch.full((), loop.user(t + h0), dtype=y.dtype, device=y.device)
    f1 = st.problem.evaluate(probe, (y + loop.sign * h0 * f0).to(st.net_dtype)).to(y.dtype)
    d2 = float(st.norm((f1 - f0) / scale)) / h0
    h1 = max(1e-6, h0 * 1e-3) if d1 <= 1e-15 and d2 <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / loop.control.order)
    return loop.control.clamp(min(100 * h0, h1))


class AdaptiveLoop:
    """The controller: one attempted step at a time in internal time, the outputs by dense output."""

    def __init__(self, stepper: Stepper, controller: "Controller", stored: Optional[list], store_states: bool):
        self.stepper, self.control, self.sign = stepper, controller.control, controller.sign
        self.callbacks, self.user_state = controller.callbacks, controller.user_state
        self.last_ratio = 0.0
        # the accepted grid, for a backward: each step's stage times (of t), the steps ending on a jump
        # point, with `stored` a list the stage inputs of every accepted step, and each output's place:
        # (step, theta) of the dense output holding it, (step, None) for the state at a step's end
        self.n, self.stage_times, self.jumps, self.places = 0, [], set(), []
        self.stored = stored
        self.slopes: list = []  # an adjoint's dense outputs under time gradients: (output, step, d output/d theta)
        self.store_states = store_states  # store="steps": each accepted step's start state, not its stage inputs

    def user(self, tau: float, towards: Optional[float] = None) -> float:
        """tau as a time of t; with `towards`, the float next to it in that direction (jump_t)."""
        if towards is None:
            return self.sign * tau
        dt = self.stepper.state_dtype
        return torch.nextafter(torch.tensor(self.sign * tau, dtype=dt),
                               torch.tensor(self.sign * towards, dtype=dt)).item()

    def callback(self, name: str, t: float, y: torch.Tensor, h: float) -> None:
        if name in self.callbacks:
            tensor = lambda v: torch.tensor(v, dtype=self.control.dtype)  # noqa: E731
            self.callbacks[name](tensor(self.user(t)), self.user_state(y), tensor(h))

    def step(self, t: float, y: torch.Tensor, k0: torch.Tensor, h: float):
        """One attempted step: ((t, y, k0, h) to go on from, the accepted step (t, dt, y, ks) or None)."""
        st, c = self.stepper, self.control
        h = c.clamp(h)
        self.callback("callback_step", t, y, h)
        t1, dt, jump = c.step_end(t, h)
        if not t1 > t:
            raise self.underflow(t, h)
        hs = self.sign * dt
        times = [self.user(t1, t if jump else None) if ci == 1.0 else self.user(t + ci * dt) for ci in st.tableau.c]
        if self.n - 1 in self.jumps:  # k_0 was evaluated afresh just after the jump point (recorded for a backward)
            times[0] = self.user(t, t + 1.0)
        st.inputs = None if self.stored is None else [y if y.dtype == st.net_dtype else y.to(st.net_dtype)]
        ks, y1 = st.stages(y, k0, times, hs, self.n)
        last = len(times) - 1
        fsal = [] if st.late_fsal else [st.evaluate(self.n, last, times[-1], y1)]
        ratio = self.last_ratio = st.error_ratio(y, y1, ks + fsal, hs)
        if not (ratio <= 1 or min(h, dt) <= c.min_step):  # (h: dt as requested, before rounding)
            self.callback("callback_reject_step", t, y, dt)
            st.stats.rejected += 1
            h = c.next_step(dt, ratio)
            if h < dt and t + h >= t1:  # a smaller step that rounds to the same end: t's resolution reached
                raise self.underflow(t, h)
            return (t, y, k0, h), None
        if not math.isfinite(ratio):
            raise FloatingPointError(
                f"odeint ({st.tableau.name}): the state or its error estimate is not finite at t={self.user(t1):g} "
                f"(step size h={dt:.3g}), and min_step={c.min_step:g} forces steps of that size whatever their error: "
                "lower options['min_step'] (the solution may blow up there)")
        ks += fsal or [st.evaluate(self.n, last, times[-1], y1)]
        self.callback("callback_accept_step", t, y, dt)
        st.stats.accepted += 1
        st.stats.times.append(self.user(t1))
        if self.stored is not None:
            self.stored += [y] if self.store_states else st.inputs
        self.stage_times.append(times)
        self.jumps |= {self.n} if jump else set()
        self.n, st.inputs = self.n + 1, None
        k_next = st.evaluate(self.n, 0, self.user(t1, t1 + 1.0), y1) if jump else ks[-1]
        return (t1, y1, k_next, c.next_step(dt, ratio)), (t, dt, y, ks)

    def underflow(self, t: float, h: float) -> FloatingPointError:
        why = ("the last error estimate was not finite: the solution blows up there, or func returned NaN/Inf"
               if not math.isfinite(self.last_ratio) else "the problem may be stiff or singular there")
        return FloatingPointError(
            f"odeint ({self.stepper.tableau.name}): the step size underflowed at t={self.user(t):g} (h={h:.3g} no "
            f"longer moves t): {why}; loosen rtol/atol, or set options['min_step'] to accept steps of a minimum size "
            "whatever their error")

    def run(self, y: torch.Tensor, taus: List[float], outs: Optional[torch.Tensor], event: Optional[Event] = None,
            shifts: Optional[torch.Tensor] = None):
        """The states at the internal times taus (taus[0] the start; with an event, the one output is at the
        event), into `outs` when given, and the last output's internal time. `shifts`: t - t.detach()."""
        st, c = self.stepper, self.control
        t, k0 = taus[0], st.evaluate(0, 0, self.user(taus[0]), y)
        if not bool(torch.isfinite(k0).all()):
            raise FloatingPointError(f"odeint ({st.tableau.name}): func returned NaN/Inf at the initial time "
                                     f"t={self.user(t):g}")
        h = c.first_step if c.first_step is not None else initial_step(self, t, y, k0)
        st.stats.times.append(self.user(t))
        result, last, target = [y if outs is None else outs[0].copy_(y)], None, t
        if event is not None and event.value(self.user(t), y) <= 0:
            taus = [t, t]
        for j, target in enumerate(taus[1:], 1):
            for n in range(c.max_num_steps + 1):
                if not target > t:
                    break
                if n == c.max_num_steps:
                    raise RuntimeError(
                        f"odeint ({st.tableau.name}): max_num_steps={c.max_num_steps} steps did not reach the output "
                        f"time t={self.user(target):g} (reached t={self.user(t):g}, step size h={h:.3g}): raise "
                        "options['max_num_steps'], or loosen rtol/atol")
                (t, y, k0, h), accepted = self.step(t, y, k0, h)
                last = accepted or last
                if accepted and event is not None and event.value(self.user(t), y) <= 0:
                    target = event.locate(self, last)
            out = None if outs is None else outs[j]
            theta = None  # the state at a step's end, else the dense output's place in its step
            if last is not None and (target != t or shifts is not None):
                t0, dt, y0, ks = last
                theta = (target - t0) / dt
                at = st.dense(y0, ks, self.sign * dt, theta, out)
                if shifts is not None and torch.is_grad_enabled():  # the output moves with its time, and t[0]'s
                    at = st.move(at, ks, self.sign * dt, theta + self.sign * (shifts[j] - shifts[0]) / dt)
                elif shifts is not None:  # an adjoint's forward (no graph): Controller.moved adds the move
                    self.slopes.append((j, dt, st.dense(y0, ks, self.sign * dt, theta, slope=True)))
            else:
                at = y if out is None else out.copy_(y)
            self.places.append((self.n - 1, theta))
            result.append(at)
        return result, target


def _first(tree):
    return tree[0] if isinstance(tree, torch.Tensor) else tuple(_first(part) for part in tree)


def _tolerance(value, name: str, structure, y: torch.Tensor):
    """rtol / atol (a number, a tensor per component, for a tuple y0 a tuple of these) in the layout of the
    solved state y (a complex y0 solved as its real view, a tuple one flat tensor)."""
    if isinstance(structure, tuple) and isinstance(value, (tuple, list)):
        leaves = states.tuple_leaves(structure)
        if len(value) != len(leaves):
            raise ValueError(f"{name}: a tuple of tolerances needs one per component of y0 ({len(leaves)}), "
                             f"got {len(value)}")
        return torch.cat([torch.as_tensor(_tolerance(v, name, leaf, leaf), dtype=y.dtype, device=y.device)
                          .expand(leaf.shape).reshape(-1) for v, leaf in zip(value, leaves)])
    if isinstance(value, torch.Tensor) and (value.numel() != 1 or not isinstance(structure, tuple)):
        if value.requires_grad or value.is_complex() or not bool(((value >= 0) & torch.isfinite(value)).all()):
            raise ValueError(f"{name} must hold finite real numbers >= 0 and not require grad")
        value = value.detach().to(device=y.device, dtype=y.dtype)
        try:
            value = torch.broadcast_to(value, structure.shape)
        except (RuntimeError, AttributeError):
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to y0's shape") from None
        # a complex y0's real view (..., 2): one tolerance for both parts (the error ratio reads moduli)
        return value.unsqueeze(-1) if structure.is_complex() else value.reshape(y.shape)
    value = value.item() if isinstance(value, torch.Tensor) else value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0 (or a tensor of them per component), got {value!r}")
    return float(value)


def _norm(user_norm, structure, one: Callable) -> Callable:
    """The error norm on the solved state: torchdiffeq's RMS (of the moduli for a complex y0; over each
    component of a tuple, then the largest), or the user's on y0's structure."""
    if user_norm is not None:
        return lambda flat: user_norm(one(flat))
    if isinstance(structure, tuple):
        sizes = [leaf.numel() for leaf in states.tuple_leaves(structure)]
        return lambda flat: torch.stack([torch.linalg.vector_norm(p) / math.sqrt(p.numel())
                                         for p in flat.split(sizes) if p.numel()]).amax()
    scale = 1 / math.sqrt(structure.numel())
    return lambda flat: torch.linalg.vector_norm(flat) * scale


class AcceptedGraphs(EvaluationGraphs):
    """The stored adjoint's forward for an adaptive solve: "auto" as plain backprop while the graphs fit, a
    budget in bytes a window of the last graphs, no tail. Why: docs/engine.md, "Inside the engine": adaptive."""

    def __init__(self, problem, strategy, first, device: torch.device, time_grad: bool):
        self.auto = strategy.memory_budget == "auto"
        super().__init__(problem, strategy, first, device, time_grad)

    def _keep(self, count) -> None:
        self.kept_count, self.kept, self.tail, self.tail_start = count, {}, None, None
        self.keep_from, self.tail_from = (0 if count > 0 else math.inf), math.inf
        self.window = count if 0 < count < math.inf and not self.auto else None
        self.problem.controller.limit = count if self.auto else math.inf

    @property
    def as_backprop(self) -> bool:
        return self.window is None and super().as_backprop

    def run_forward(self, x: torch.Tensor, stored: list) -> List[torch.Tensor]:
        p = self.problem
        outs = p.controller.run(p, x, evaluator=self.forward_evaluate,
                                **{"states" if self.store == "steps" else "stage_inputs": stored})
        self.problem = p.controller.accepted(p, self)
        self.replay.finish(reruns=True)
        return outs

    def forward_evaluate(self, problem, n: int, i: int, t, xi: torch.Tensor) -> torch.Tensor:
        k = super().forward_evaluate(problem, n, i, t, xi)
        if self.window is not None and len(self.kept) > self.window:
            del self.kept[min(self.kept)]  # the oldest graph (its stage input is stored: it is recomputed)
        return k


@dataclass
class Controller:
    """The adaptive controller of one odeint call, as integrate.Problem.controller: `run` is the solve (plain,
    with a graph, or an adjoint's forward) and picks the grid; `accepted` is the problem on that grid."""

    control: Control
    sign: float
    taus: List[float]
    tolerance: tuple
    norm: Callable
    callbacks: dict
    user_state: Callable
    event: Optional[Event] = None
    shifts: Optional[torch.Tensor] = None  # t - t.detach(): time gradients
    moduli: bool = False
    limit: float = math.inf
    loop: Optional[AdaptiveLoop] = None
    stats: SolveStats = field(default_factory=SolveStats)
    end: float = 0.0
    graphs: ClassVar[type] = AcceptedGraphs  # the stored adjoint's forward

    def run(self, p, x: torch.Tensor, evaluator=None, stage_inputs: Optional[list] = None,
            states: Optional[list] = None) -> List[torch.Tensor]:
        buffered = evaluator is None and stage_inputs is None and states is None and not torch.is_grad_enabled()
        self.stats = SolveStats()
        st = Stepper(p, self, buffered, evaluator)
        loop = self.loop = AdaptiveLoop(st, self, states if states is not None else stage_inputs, states is not None)
        outs = torch.empty((len(self.taus),) + tuple(x.shape), dtype=x.dtype, device=x.device) if buffered else None
        result, self.end = loop.run(x, self.taus, outs, self.event, self.shifts)
        return list(outs) if buffered else result

    def moved(self, ys: torch.Tensor) -> torch.Tensor:
        """An adjoint's outputs moving with their times: zero added, whose gradient is the dense outputs'."""
        slopes = [] if self.loop is None else self.loop.slopes
        if not slopes:
            return ys
        moves = {j: DenseSlope.apply(self.sign * (self.shifts[j] - self.shifts[0]) / dt, slope)
                 for j, dt, slope in slopes}
        return ys + torch.stack([moves.get(j, torch.zeros_like(ys[0])) for j in range(len(ys))])

    def accepted(self, p, evals):
        """The problem on the accepted grid (its stage times, its outputs' places); a step's first stage is its
        previous step's last (FSAL): the same evaluation for the backward's reruns and kept graphs."""
        loop, s = self.loop, p.tableau.stages
        places = [(-1, None)] + loop.places
        for n in range(loop.n - 1):
            if n not in loop.jumps:
                evals.replay.alias((n + 1) * s, n * s + s - 1)
                if n * s + s - 1 in evals.kept:
                    evals.kept[(n + 1) * s] = evals.kept.pop(n * s + s - 1)
        times = None if p.grid.times is None else torch.tensor(self.stats.times, dtype=torch.float64,
                                                                device=p.grid.times.device)
        grid = Grid(list(self.stats.times), [n + 1 if theta is None else 0 for n, theta in places], times,
                    stage_times=loop.stage_times, dense=[None if theta is None else (n, theta) for n, theta in places])
        return p.on(grid)


def odeint(func, y0, t, spec, rtol, atol, options, return_stats: bool, event_fn=None):
    """odeint with the adaptive method spec.tableau (api.odeint's adaptive branch): the states at t
    (with event_fn: (event time, the states at t[0] and at the event)), and SolveStats if asked."""
    name = spec.tableau.name
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        raise ValueError(f"the adaptive method {name!r} takes a 1-D grid t; a per-sample grid (T, B) needs a "
                         "fixed-step method (each sample would pick its own steps)")
    t, values = odeint_values(t)
    if event_fn is not None and len(values) != 2:
        raise ValueError(f"with event_fn, t must hold 2 times (the start and one giving the direction), "
                         f"got {len(values)}")
    strategy = spec.strategy
    if not isinstance(strategy, (Backprop, StoredAdjoint)) or getattr(strategy, "reversible_coupling", None):
        raise ValueError(f"the reversible scheme needs a fixed grid (its steps are undone exactly; an adaptive "
                         f"controller picks steps from a non-reversible error estimate): method {name!r} takes "
                         "adjoint=True (the stored adjoint) or adjoint=False")
    adapted = states.adapt(func, y0, t, spec, {})
    flat_func, y, unwrap = (adapted.func, adapted.y0, adapted.unwrap) if adapted is not None else (func, y0, None)
    check_state(y, "y0", batched=False)
    if not bool(torch.isfinite(y).all()):  # (func: api.odeint checked it is callable)
        raise ValueError("y0 must be finite")
    one = (lambda flat: flat) if unwrap is None else (lambda flat: _first(unwrap(flat.unsqueeze(0))))
    sign = -1.0 if len(values) > 1 and values[1] < values[0] else 1.0
    taus = [sign * v for v in values] if event_fn is None else [sign * values[0], math.inf]
    control = check_options(options, spec.tableau, sign, taus[0])
    time_grad = t.requires_grad and torch.is_grad_enabled()
    shifts = (t - t.detach()).to(device=y.device, dtype=torch.float64) if time_grad else None
    # a placeholder grid: the controller picks the steps (the first evaluation reads its start); under time
    # gradients a tensor moving with t[0], as the accepted grid does (stored_adjoint._backward)
    start = [values[0], values[0] + sign]
    start_times = torch.tensor(start, dtype=torch.float64, device=y.device) + shifts[0] if time_grad else None
    problem = spec.problem(flat_func, y, Grid(start, [0], start_times))
    dtype, y = y.dtype, y.to(problem.state_dtype)
    tolerance = tuple(_tolerance(v, n, y0, y) for v, n in ((1e-7 if rtol is None else rtol, "rtol"),
                                                           (1e-9 if atol is None else atol, "atol")))
    callbacks = {n: getattr(func, n) for n in CALLBACKS if callable(getattr(func, n, None))}
    event = None if event_fn is None else Event(event_fn, one, float(torch.as_tensor(tolerance[1]).max()) or 1e-12)
    controller = Controller(control, sign, taus, tolerance, _norm(control.norm, y0, one), callbacks, one, event,
                            shifts, isinstance(y0, torch.Tensor) and y0.is_complex())
    problem = dataclasses.replace(problem, controller=controller)
    ys = controller.moved(strategy.run(problem, y))
    return _finish(ys.to(dtype), controller, problem, t, unwrap, event_fn, return_stats, name)


def _finish(ys, controller: Controller, problem, t, unwrap, event_fn, return_stats, name):
    if not bool(torch.isfinite(ys.detach()).all()):
        raise FloatingPointError(f"odeint ({name}): a state at the requested times is not finite (func returned "
                                 "NaN/Inf at the end of the last step)")
    t_end = torch.tensor(controller.sign * controller.end, dtype=t.dtype, device=t.device)
    if controller.event is not None and ys.requires_grad:  # the event time's gradient (implicit function theorem)
        t_end, last = EventTime.apply(problem.evaluate, controller.event, t_end, ys[-1])
        ys = torch.cat([ys[:-1], last[None]])
    out = ys if unwrap is None else unwrap(ys)
    out = (out,) if event_fn is None else (t_end, out)
    return out + (controller.stats,) if return_stats else out[0] if event_fn is None else out
