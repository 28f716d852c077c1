"""Diffusion models as they are published, as the probability-flow ODE that reverse / generate / odeint solve.

A diffusion network predicts noise (`epsilon`), `v_prediction`, the clean `sample` (x0) or the `score`
at a noise level given by its own time (an integer timestep of a discrete `alphas_cumprod` schedule,
a continuous VP time, a VE or EDM sigma). Its deterministic sampler is the probability-flow ODE.
`ProbabilityFlow` turns (network, schedule, prediction type) into a velocity `flow(t, y)` in the
project's time convention (t = 0 data, t = 1 noise) and in the variables in which a fixed-step solve
*is* the sampler people know:

- state  y = x / s(sigma): the sample divided by its signal scale (s = sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2)
  on a variance-preserving schedule, s = 1 on VE / EDM), with sigma = sqrt((1 - alpha_bar) / alpha_bar)
  the noise-to-signal ratio. Then dy/dsigma = eps(x, sigma): DDIM is exactly Euler in (sigma, y)
  (Song et al. 2021, eq. 14) and EDM's sampler is Heun in (sigma, x) (Karras et al. 2022, Alg. 1).
- time   t in [0, 1] <-> sigma: piecewise linear through the sampler's noise levels, the k-th level
  from the data end at t = k / N (N = `steps`, the sampler's number of steps). On that grid a
  fixed-step solve with `steps = N` (or a multiple) steps from one level to the next exactly:
  `reverse(flow, x, steps=N, method="euler")` is DDIM inversion (in the state: its latent is
  `flow.from_state(y, 1.0)`), `generate(flow, z, steps=N,
  method="euler")` is DDIM sampling, `method="heun"` on EDM's levels is EDM's deterministic sampler.
  dsigma/dt jumps at the knots, so the flow declares `jumps_at_grid_points`: the engine then reads
  every stage on a knot from inside its own step (torchdiffeq's perturb), which picks the right piece
  in both directions and keeps higher-order solvers at their order piece by piece.
- network time on the piece between levels k-1 and k: `network_time="step"` (the default for a
  discrete schedule) holds the network's time at level k's timestep, as DDIM does both ways: its
  sampling step from level k reads the network at timestep k, and its inversion step from level k-1
  up to k (diffusers' DDIMInverseScheduler, and the usual DDIM-inversion code) reads it at timestep k
  too, with the sample still at level k-1. `network_time="continuous"` reads the network at the
  schedule's own time of sigma(t) instead (the exact probability-flow ODE; the default for VP, VE, EDM).

The state transform is explicit: `flow.to_state(x, t)` and `flow.from_state(y, t)`. At the data
end s = 1 whenever the final level has alpha_bar = 1 (diffusers' `set_alpha_to_one`, EDM's sigma = 0),
so `reverse(flow, x)` takes images as they are; its output is the noise divided by s(sigma_max), and
`generate` starts from `flow.to_state(z, 1.0)`.

Everything is tensor arithmetic on the device (no host synchronisation per step), differentiable in y,
t, the network's parameters and whatever the network closes over.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["PREDICTIONS", "Schedule", "Discrete", "VP", "VE", "EDM", "EDMPreconditioning", "ProbabilityFlow",
           "from_diffusers", "prediction_name"]

PREDICTIONS = ("epsilon", "v_prediction", "sample", "score")
_ALIASES = {"eps": "epsilon", "noise": "epsilon", "v": "v_prediction", "x0": "sample", "x_0": "sample"}


def prediction_name(prediction: str) -> str:
    """The canonical prediction type (diffusers' spelling) of `prediction` or one of its aliases."""
    name = _ALIASES.get(prediction, prediction)
    if name not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or {sorted(_ALIASES)}), got {prediction!r}")
    return name


class Schedule:
    """Noise levels. `levels(steps)` -> (sigmas, times): float64 tensors of steps + 1 entries from the
    data end up, the sampler's noise-to-signal ratios and the network's time at each; `model_time(sigma)`
    the network's time of any sigma (differentiable); `variance_preserving`: x = y / sqrt(1 + sigma^2)
    (True) or x = y (False)."""

    variance_preserving = True
    natural_network_time = "continuous"

    def levels(self, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _sigma_of_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    alpha_bar = alpha_bar.double()
    return ((1 - alpha_bar) / alpha_bar).sqrt()


class Discrete(Schedule):
    """A discrete schedule as a diffusers scheduler holds it: `alphas_cumprod` (alpha_bar of every
    training timestep), the sampler's `timesteps` (any order; the network reads them as they are) and
    `final_alpha_cumprod`, the level below the smallest timestep (1.0 = diffusers' set_alpha_to_one).
    Levels: the final one, then the timesteps ascending. Between training timesteps the network time of
    a sigma is the linear interpolation of the table (used by network_time="continuous" only)."""

    natural_network_time = "step"

    def __init__(self, alphas_cumprod, timesteps, final_alpha_cumprod: float = 1.0):
        table = torch.as_tensor(alphas_cumprod).detach().double().cpu()
        steps = torch.as_tensor(timesteps).detach().double().cpu().flatten()
        if table.dim() != 1 or table.numel() < 2 or not bool(((table > 0) & (table <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D sequence of at least 2 values in (0, 1]")
        if steps.numel() < 1 or not bool(((steps >= 0) & (steps <= table.numel() - 1)).all()):
            raise ValueError(f"timesteps must lie in [0, {table.numel() - 1}] (the training timesteps), got {steps.tolist()}")
        ordered = steps.sort().values
        if not bool((ordered[1:] > ordered[:-1]).all()):
            raise ValueError(f"timesteps must be distinct, got {steps.tolist()}")
        if not 0 < float(final_alpha_cumprod) <= 1:
            raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod!r}")
        self.table_sigmas = _sigma_of_alpha_bar(table)  # increasing with the timestep
        self.timesteps = ordered
        self.final_sigma = float(_sigma_of_alpha_bar(torch.tensor(float(final_alpha_cumprod))))

    def levels(self, steps: int):
        if steps != self.timesteps.numel():
            raise ValueError(f"this discrete schedule holds {self.timesteps.numel()} timesteps; steps must equal it, got {steps}")
        ts = self.timesteps
        sigmas = torch.cat([torch.tensor([self.final_sigma], dtype=torch.float64), _table_lookup(self.table_sigmas, ts)])
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("the final level must lie below the smallest timestep's (final_alpha_cumprod too small)")
        # the final level has no timestep of its own; on a discrete schedule the network reads the
        # timestep above it (network_time="step") or, continuous, the table's time of its sigma
        return sigmas, torch.cat([self.model_time(sigmas[:1]), ts])

    def model_time(self, sigma):
        table = self.table_sigmas.to(sigma.device)
        i = torch.searchsorted(table, sigma.detach().contiguous()).clamp(1, table.numel() - 1)
        lo, hi = table[i - 1], table[i]
        return ((i - 1).to(sigma.dtype) + (sigma - lo) / (hi - lo)).clamp(0, table.numel() - 1)


def _table_lookup(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """table at (possibly fractional) timesteps, linearly interpolated."""
    lo = timesteps.floor().long().clamp(0, table.numel() - 1)
    hi = (lo + 1).clamp(max=table.numel() - 1)
    w = timesteps - lo.double()
    return table[lo] + w * (table[hi] - table[lo])


class VP(Schedule):
    """Continuous variance-preserving schedule (score SDE, Song et al. 2021): network time s in [eps, 1].
    kind="linear": log alpha_bar = -(beta_min s + (beta_max - beta_min) s^2 / 2);
    kind="cosine": alpha_bar = f(s) / f(0), f(s) = cos^2((s + 0.008) / 1.008 * pi / 2) (Nichol & Dhariwal).
    Levels: s uniform from eps to s_max (the score-SDE sampler's grid); s_max defaults to 1, and to
    0.999 for the cosine schedule, whose alpha_bar reaches 0 (sigma = inf) at s = 1."""

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3,
                 s_max: Optional[float] = None, cosine_offset: float = 0.008):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        s_max = (0.999 if kind == "cosine" else 1.0) if s_max is None else s_max
        if not 0 < eps < s_max <= 1 or (kind == "cosine" and s_max == 1):
            raise ValueError(f"need 0 < eps < s_max <= 1 (s_max < 1 for the cosine schedule), got eps={eps!r}, s_max={s_max!r}")
        self.kind, self.beta_min, self.beta_max, self.eps, self.offset = kind, beta_min, beta_max, eps, cosine_offset
        self.s_max = s_max

    def _angle(self, s):
        return (s + self.offset) / (1 + self.offset) * (math.pi / 2)

    def sigma(self, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            minus_log = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s
            return torch.expm1(minus_log).sqrt()
        f0 = math.cos(self._angle(0.0)) ** 2
        return (f0 / torch.cos(self._angle(s)) ** 2 - 1).sqrt()

    def model_time(self, sigma):
        log1p = torch.log1p(sigma * sigma)  # -log alpha_bar
        if self.kind == "linear":
            d = self.beta_max - self.beta_min
            return (torch.sqrt(self.beta_min ** 2 + 2 * d * log1p) - self.beta_min) / d
        f0 = math.cos(self._angle(0.0)) ** 2
        angle = torch.acos(torch.sqrt(f0 * torch.exp(-log1p)))
        return angle / (math.pi / 2) * (1 + self.offset) - self.offset

    def levels(self, steps: int):
        s = torch.linspace(self.eps, self.s_max, steps + 1, dtype=torch.float64)
        return self.sigma(s), s


class VE(Schedule):
    """Variance-exploding schedule (NCSN / score SDE): sigma geometric from sigma_min (t = 0) to
    sigma_max (t = 1); the network reads sigma itself."""

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def model_time(self, sigma):
        return sigma

    def levels(self, steps: int):
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        sigmas = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        return sigmas, sigmas.clone()


class EDM(Schedule):
    """EDM (Karras et al. 2022): x = y, the network (a denoiser D(x, sigma), prediction "sample") reads
    sigma. Levels: 0, then sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i = N-1 .. 0 (eq. 5): `generate(..., method="heun")` is Algorithm 1 with S_churn = 0, except that
    Algorithm 1 takes its last step (to sigma = 0, where D's eps = (x - D) / sigma is undefined) with Euler."""

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max or rho <= 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min!r}, {sigma_max!r}, {rho!r}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def model_time(self, sigma):
        return sigma

    def levels(self, steps: int):
        if steps < 2:
            raise ValueError(f"EDM's schedule needs steps >= 2, got {steps}")
        i = torch.arange(steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = (hi + i / (steps - 1) * (lo - hi)) ** self.rho  # sigma_0 = sigma_max ... sigma_min
        sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), sigmas.flip(0)])
        return sigmas, sigmas.clone()


class EDMPreconditioning(torch.nn.Module):
    """EDM's denoiser from a raw network F (Karras et al. 2022, Table 1):
    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4."""

    def __init__(self, network: Callable, sigma_data: float = 0.5):
        super().__init__()
        self.network, self.sigma_data = network, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd2 = self.sigma_data ** 2
        s = _per_sample(sigma, x)
        norm = torch.sqrt(s * s + sd2)
        out = self.network(x / norm, torch.log(sigma) / 4)
        return (sd2 / (s * s + sd2)) * x + (s * self.sigma_data / norm) * out


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) values as (B, 1, ..., 1) in x's dtype, to broadcast against x."""
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


class ProbabilityFlow(torch.nn.Module):
    """The probability-flow ODE of `network` (called network(x, model_time) -> prediction, x in the
    network's own variable, model_time of shape (B,)) on `schedule`, as a velocity flow(t, y) for
    reverse / generate / odeint / PRGClassifier: see the module docstring for the variables.

    `steps` is the sampler's number of steps N (a discrete schedule's number of timesteps); solving
    with N steps (or a multiple) on [0, 1] steps exactly from level to level. `network_time`:
    "step" (network time held at the upper level of each piece: DDIM's convention) or "continuous"
    (the schedule's time of sigma(t)); default: the schedule's natural one."""

    jumps_at_grid_points = True  # dsigma/dt jumps at the knots k / N: read from inside each step

    def __init__(self, network: Callable, schedule: Schedule, prediction: str = "epsilon", steps: Optional[int] = None,
                 network_time: Optional[str] = None):
        super().__init__()
        if not callable(network):
            raise TypeError(f"network must be callable as network(x, model_time), got {type(network).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a prg_fast.diffusion.Schedule (Discrete, VP, VE, EDM), got {type(schedule).__name__}")
        self.prediction = prediction_name(prediction)
        if self.prediction == "v_prediction" and not schedule.variance_preserving:
            raise ValueError("prediction='v_prediction' is defined on a variance-preserving schedule (Discrete, VP)")
        if steps is None:
            if not isinstance(schedule, Discrete):
                raise ValueError("steps (the sampler's number of steps N) is required for a continuous schedule")
            steps = schedule.timesteps.numel()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        network_time = schedule.natural_network_time if network_time is None else network_time
        if network_time not in ("step", "continuous"):
            raise ValueError(f"network_time must be 'step' or 'continuous', got {network_time!r}")
        self.network, self.schedule, self.steps, self.network_time = network, schedule, steps, network_time
        sigmas, times = schedule.levels(steps)
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("the schedule's noise levels must increase from the data end")
        # knots as reverse's uniform grid computes them on [0, 1] (0 + (1 - 0) * k / N), so they are its grid points
        knots = torch.tensor([k / steps for k in range(steps)] + [1.0], dtype=torch.float64)
        self.register_buffer("knots", knots, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("model_times", times, persistent=False)

    def extra_repr(self) -> str:
        return (f"prediction={self.prediction!r}, schedule={type(self.schedule).__name__}, steps={self.steps}, "
                f"network_time={self.network_time!r}")

    def _piece(self, t: torch.Tensor):
        """(j, sigma, dsigma/dt) at t (B,): j in 1..N the piece [knot j-1, knot j) holding t (a knot
        itself starts its piece: the engine reads a knot one float step inside the step it takes)."""
        knots = self.knots
        j = torch.searchsorted(knots.to(t.dtype), t.detach().contiguous(), right=True).clamp(1, self.steps)
        lo, hi = knots[j - 1], knots[j]
        s_lo, s_hi = self.sigmas[j - 1], self.sigmas[j]
        rate = (s_hi - s_lo) / (hi - lo)
        sigma = s_lo + (t.to(torch.float64) - lo) * rate  # differentiable in t
        return j, sigma, rate

    def _times(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=like.device) if not isinstance(t, torch.Tensor) else t
        return t.reshape(-1).expand(like.shape[0]) if t.numel() == 1 else t

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """x / y at noise-to-signal ratio sigma: sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2), or 1 (VE, EDM)."""
        return torch.rsqrt(1 + sigma * sigma) if self.schedule.variance_preserving else torch.ones_like(sigma)

    def to_state(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """The ODE's state y = x / scale at time t (a number, 0-dim or (B,) tensor) from the sample x."""
        _, sigma, _ = self._piece(self._times(t, x))
        return x / _per_sample(self.scale(sigma), x)

    def from_state(self, y: torch.Tensor, t=1.0) -> torch.Tensor:
        """The sample x = scale * y at time t from the ODE's state y."""
        _, sigma, _ = self._piece(self._times(t, y))
        return y * _per_sample(self.scale(sigma), y)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        j, sigma, rate = self._piece(self._times(t, y))
        scale = self.scale(sigma)
        x = y * _per_sample(scale, y)
        if self.network_time == "step":
            model_time = self.model_times[j]
        else:
            model_time = self.schedule.model_time(sigma)
        out = self.network(x, model_time)
        return _per_sample(rate, y) * self._epsilon(out, x, y, sigma, scale)

    def _epsilon(self, out, x, y, sigma, scale) -> torch.Tensor:
        """The noise the prediction implies at level sigma (x = scale * (x0 + sigma * eps))."""
        if self.prediction == "epsilon":
            return out
        if self.prediction == "sample":
            return (y - out) / _per_sample(sigma, y)
        noise_std = _per_sample(sigma * scale, y)  # sqrt(1 - alpha_bar) on VP, sigma on VE
        if self.prediction == "score":
            return -noise_std * out
        return _per_sample(scale, y) * out + noise_std * x  # v = sqrt(a) eps - sqrt(1 - a) x0


class DiffusersNetwork(torch.nn.Module):
    """A diffusers model (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, ...) as
    network(x, timestep): called model(x, timestep, **conditioning, return_dict=False)[0]. The
    conditioning tensors (class_labels, encoder_hidden_states, ...) are held here, so the adjoint
    sees those that require grad; a model with learned variance (2C output channels) gives its first C."""

    def __init__(self, model: torch.nn.Module, **conditioning):
        super().__init__()
        self.model, self.conditioning = model, dict(conditioning)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = self.model(x, timestep, **self.conditioning, return_dict=False)[0]
        if out.dim() == x.dim() and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out


def scheduler_timesteps(scheduler, steps: Optional[int]) -> torch.Tensor:
    """The timesteps a diffusers scheduler samples with: its own when set_timesteps has run and
    `steps` is None or agrees, else those of a fresh copy after set_timesteps(steps) (the user's
    scheduler is left as it is)."""
    current = getattr(scheduler, "num_inference_steps", None)
    if steps is None or steps == current:
        if current is None:
            raise ValueError("the scheduler has no timesteps yet: pass steps= (or call scheduler.set_timesteps first)")
        return torch.as_tensor(scheduler.timesteps)
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(steps)
    return torch.as_tensor(fresh.timesteps)


def from_diffusers(model: torch.nn.Module, scheduler, *, steps: Optional[int] = None, network_time: Optional[str] = None,
                   prediction: Optional[str] = None, **conditioning) -> ProbabilityFlow:
    """The probability-flow ODE of a diffusers model on a diffusers scheduler's discrete schedule:

        flow = prg_fast.from_diffusers(unet, scheduler, steps=50)     # DDIMScheduler(clip_sample=False), ...
        z = flow.from_state(prg_fast.reverse(flow, x, steps=50, method="euler"), 1.0)  # == DDIM inversion
        x = flow.from_state(prg_fast.generate(flow, flow.to_state(noise, 1.0), steps=50, method="euler"), 0.0)

    Reads `alphas_cumprod`, the prediction type (`config.prediction_type`, or `prediction=`), the
    timesteps (after set_timesteps(steps) on a copy, with the scheduler's timestep_spacing and
    steps_offset) and the final level (`final_alpha_cumprod` / `initial_alpha_cumprod`, else 1).
    `conditioning` (class_labels=..., encoder_hidden_states=..., added_cond_kwargs=...) is passed to
    every call; tensors in it that require grad get exact gradients. A scheduler that clips the
    predicted x0 (clip_sample=True, diffusers' default for DDIM and DDPM, or thresholding=True) is
    refused: no ODE clips, so its sampler and the flow would differ.

    diffusers' DDIMScheduler.step goes from timestep t to t - T // N (T training timesteps), which is
    the next timestep of its own list for "leading" spacing and for "trailing" when N divides T; with
    "linspace" it is not, and diffusers' chain silently moves the sample from one level to another
    between steps. The flow always steps from each listed timestep to the next."""
    try:
        import diffusers  # noqa: F401  (only to say clearly what is missing)
    except ImportError as err:
        raise ImportError("prg_fast.from_diffusers needs diffusers: pip install 'prg_fast[diffusion]' "
                          "(or pip install diffusers)") from err
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a diffusers model (an nn.Module), got {type(model).__name__}")
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None or not hasattr(scheduler, "config"):
        raise TypeError(f"scheduler must be a diffusers scheduler with alphas_cumprod (DDIMScheduler, DDPMScheduler, "
                        f"...), got {type(scheduler).__name__}")
    for setting in ("clip_sample", "thresholding"):  # clip_sample=True is diffusers' DDIM/DDPM default
        if getattr(scheduler.config, setting, False):
            raise ValueError(f"scheduler has {setting}=True: it clips each predicted x0, which no ODE does, so "
                             f"generate would not equal its sampler; pass type(scheduler).from_config("
                             f"scheduler.config, {setting}=False) (the same schedule, unclipped)")
    if prediction is None:
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    final = getattr(scheduler, "final_alpha_cumprod", getattr(scheduler, "initial_alpha_cumprod", 1.0))
    schedule = Discrete(table, scheduler_timesteps(scheduler, steps), final_alpha_cumprod=float(final))
    return ProbabilityFlow(DiffusersNetwork(model, **conditioning), schedule, prediction, network_time=network_time)
