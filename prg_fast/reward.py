"""Reward finetuning through the sampler: what one reward step differentiates.

A reward is any callable on generated samples, x (B, C, H, W) -> rewards (B,): a torch module (a
classifier's log-probability of a class, an aesthetic score) or a function. The sampler is
`prg_fast.generate` on the uniform grid of `steps` steps from t = 1 (noise) down to t = 0 (data);
a gradient mode says how much of that chain the reward's gradient flows through:

    FullChain()                 every step, with the exact discrete adjoint (memory_budget "auto":
                                the evaluation graphs that fit are kept, the rest recomputed; 0:
                                every evaluation recomputed, memory flat in `steps`); the exact
                                gradient of the reward of the sample. FullChain(adjoint=False) is
                                plain backprop through the same chain (memory grows with `steps`).
    LastSteps(k)                DRaFT-K (Clark et al. 2023, arXiv 2309.17400): the first steps - k
                                steps without a graph, plain backprop through the last k.
    RandomTruncation()          AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): the last k
                                steps, k ~ U{1..steps} drawn per optimizer step, with gradient
                                checkpointing (here: the adjoint with memory_budget=0, which
                                recomputes each evaluation in the backward).
    OneStep(late=0.25)          ReFL (Xu et al. 2023, ImageReward, arXiv 2304.05977): sample without
                                a graph down to a random late grid time t_j (j ~ U{1..ceil(late x
                                steps)}), then predict the sample in one Euler step from there,
                                x0 = x_tj - t_j v(t_j, x_tj), and differentiate that step only.

Every mode's `sample(model, z, steps, method, generator)` returns a RewardSample (the samples the
reward reads, with their graph, and the number of grid steps differentiated). The truncated modes'
first part is generate over [t_k, 1] and their differentiated part generate over [0, t_k], t_k =
k / steps a point of the full grid (the inner points of the two parts are the full grid's up to the
rounding of the time arithmetic).

`reward_loss` is one optimizer step's objective, -mean reward + kl_weight x velocity_kl, the
regulariser that keeps a finetuned velocity near its pretrained self; `reward_values` calls the
reward and checks what it returns (a clear error naming the reward); `pairwise_distance` measures
how diverse a batch of samples is.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .ode import generate

__all__ = ["ClassLogProb", "RewardLoss", "reward_loss", "RewardSample", "FullChain", "LastSteps", "RandomTruncation",
           "OneStep", "gradient_mode", "GRADIENTS", "reward_values", "reward_name", "velocity_kl", "pairwise_distance",
           "step_generator"]

# --gradient's spellings (draft-K takes the number of kept steps)
GRADIENTS = ("full", "backprop", "draft-K", "alignprop", "refl")


@dataclass
class RewardSample:
    """x: the samples the reward reads (with the graph of the differentiated steps); kept: grid
    steps the gradient flows through; t_cut: the time where the differentiated part starts."""

    x: torch.Tensor
    kept: int
    t_cut: float


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _randint(generator: Optional[torch.Generator], low: int, high: int) -> int:
    """An integer uniform in [low, high], from `generator` (the step's) or the global RNG."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=device).item())


def _prefix(model, z: torch.Tensor, steps: int, kept: int, method: str) -> torch.Tensor:
    """The chain's first steps - kept steps, without a graph: the state at t_k = kept / steps (the
    full grid's point k, 0 + (1 - 0) k / steps as the engine computes it)."""
    if kept >= steps:
        return z
    with torch.no_grad():
        return generate(model, z, steps=steps - kept, method=method, t=1.0, t_end=kept / steps)


class _Truncated:
    """The last `kept` steps differentiated with the generate keywords `solve` (a subclass picks
    kept and solve)."""

    solve: dict = {}

    def kept(self, steps: int, generator: Optional[torch.Generator]) -> int:
        raise NotImplementedError

    def sample(self, model: Callable, z: torch.Tensor, steps: int, method: str = "euler",
               generator: Optional[torch.Generator] = None) -> RewardSample:
        steps = _check_steps(steps)
        kept = self.kept(steps, generator)
        x = _prefix(model, z, steps, kept, method)
        t_cut = kept / steps
        return RewardSample(generate(model, x, steps=kept, method=method, t=t_cut, t_end=0.0, **self.solve), kept,
                            t_cut)


class FullChain(_Truncated):
    """Every step of the chain: generate(..., **solve) with the exact adjoint by default
    (memory_budget "auto", 0/None, bytes), or adjoint=False for plain backprop."""

    def __init__(self, **solve):
        self.solve = dict(solve)

    def kept(self, steps, generator):
        return steps

    def __repr__(self):
        return f"FullChain({', '.join(f'{k}={v!r}' for k, v in self.solve.items())})"


class LastSteps(_Truncated):
    """DRaFT-K: plain backprop (or `solve`'s strategy) through the last k steps only."""

    def __init__(self, k: int, **solve):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"LastSteps: k (the steps differentiated) must be an integer >= 1, got {k!r}")
        self.k, self.solve = int(k), {"adjoint": False, **solve}

    def kept(self, steps, generator):
        return min(self.k, steps)

    def __repr__(self):
        return f"LastSteps({self.k})"


class RandomTruncation(_Truncated):
    """AlignProp: the last k steps, k ~ U{1..min(max_k, steps)} per call, each evaluation
    recomputed in the backward (memory_budget=0: per-evaluation gradient checkpointing)."""

    def __init__(self, max_k: Optional[int] = None, **solve):
        if max_k is not None and (isinstance(max_k, bool) or not isinstance(max_k, numbers.Integral) or max_k < 1):
            raise ValueError(f"RandomTruncation: max_k must be None or an integer >= 1, got {max_k!r}")
        self.max_k, self.solve = max_k, {"memory_budget": 0, **solve}

    def kept(self, steps, generator):
        return _randint(generator, 1, steps if self.max_k is None else min(self.max_k, steps))

    def __repr__(self):
        return f"RandomTruncation(max_k={self.max_k})"


class OneStep:
    """ReFL: no graph down to a random late grid time t_j, j ~ U{1..ceil(late x steps)}; then the
    sample predicted in one Euler step from there, x_tj - t_j v(t_j, x_tj), differentiated."""

    def __init__(self, late: float = 0.25):
        if isinstance(late, bool) or not isinstance(late, numbers.Real) or not 0.0 < late <= 1.0:
            raise ValueError(f"OneStep: late (the fraction of the last steps it starts from) must be in (0, 1], "
                             f"got {late!r}")
        self.late = float(late)

    def sample(self, model: Callable, z: torch.Tensor, steps: int, method: str = "euler",
               generator: Optional[torch.Generator] = None) -> RewardSample:
        steps = _check_steps(steps)
        j = _randint(generator, 1, max(1, math.ceil(self.late * steps)))
        x = _prefix(model, z, steps, j, method)
        t_cut = j / steps
        return RewardSample(generate(model, x, steps=1, method="euler", t=t_cut, t_end=0.0, adjoint=False), 1, t_cut)

    def __repr__(self):
        return f"OneStep(late={self.late})"


def gradient_mode(spec: str, *, memory_budget: Union[str, float, None] = "auto", refl_late: float = 0.25):
    """The gradient mode a --gradient spelling names: full (exact adjoint with `memory_budget`),
    backprop (plain autograd through the whole chain), draft-K (DRaFT-K: the last K steps),
    alignprop (random truncation with checkpointing), refl (one step from a random late time)."""
    if not isinstance(spec, str):
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {spec!r}")
    if spec == "full":
        return FullChain(memory_budget=memory_budget)
    if spec == "backprop":
        return FullChain(adjoint=False)
    if spec == "alignprop":
        return RandomTruncation()
    if spec == "refl":
        return OneStep(refl_late)
    if spec.startswith("draft-") and spec[len("draft-"):].isdigit() and int(spec[len("draft-"):]) >= 1:
        return LastSteps(int(spec[len("draft-"):]))
    raise ValueError(f"gradient must be one of {GRADIENTS} (draft-K with K >= 1 the steps kept, e.g. draft-1), "
                     f"got {spec!r}")


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """The generator of optimizer step `step`: a function of (seed, step) alone, so a resumed run
    draws the noise and truncations an uninterrupted one draws."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 17) % 2**62)


# -------------------------------------------------------------------------------------------------
# the reward and the regulariser


def reward_name(reward) -> str:
    """What an error calls the reward: its `name` attribute, a function's qualified name, or a
    module's class name."""
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(reward, torch.nn.Module):
        return type(reward).__name__
    return getattr(reward, "__qualname__", None) or type(reward).__name__


def reward_values(reward: Callable, x: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
    """reward(x), checked: a floating tensor of shape (B,), finite, and -- when x carries a graph --
    with a graph back to x (a reward computed under no_grad or detached would give a zero gradient
    silently). Anything else is an error naming the reward."""
    name = name or reward_name(reward)
    r = reward(x)
    b = x.shape[0]
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"reward {name} returned a {type(r).__name__}; expected a tensor of shape ({b},), one reward "
                        f"per sample")
    if r.shape != (b,):
        raise ValueError(f"reward {name} returned shape {tuple(r.shape)} for {b} samples of shape "
                         f"{tuple(x.shape[1:])}; expected ({b},), one reward per sample")
    if not r.is_floating_point():
        raise TypeError(f"reward {name} returned {r.dtype} values; expected a floating tensor")
    bad = ~torch.isfinite(r.detach())
    if bad.any():
        where = bad.nonzero().flatten()[:8].tolist()
        raise FloatingPointError(f"reward {name} returned NaN/Inf for {int(bad.sum())} of {b} samples (indices "
                                 f"{where}); the samples there were finite: {bool(torch.isfinite(x[where]).all())}")
    if x.requires_grad and torch.is_grad_enabled() and not r.requires_grad:
        raise ValueError(f"reward {name} returned a tensor without a graph back to the samples (computed under "
                         f"no_grad, detached, or through numpy?): its gradient would be zero")
    return r


class ClassLogProb(torch.nn.Module):
    """reward(x) = log p(target | x) under `classifier` (a module x -> logits), which is frozen and put
    in eval mode here (its parameters are not trained; the gradient flows through it to x)."""

    def __init__(self, classifier: torch.nn.Module, target: int):
        super().__init__()
        if not isinstance(classifier, torch.nn.Module):
            raise TypeError(f"classifier must be an nn.Module returning logits, got {type(classifier).__name__}")
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0:
            raise ValueError(f"target must be a class index >= 0, got {target!r}")
        self.classifier = classifier.requires_grad_(False).eval()
        self.target, self.name = int(target), f"class:{int(target)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        if logits.dim() != 2 or not 0 <= self.target < logits.shape[1]:
            raise ValueError(f"reward {self.name}: the classifier returned logits of shape {tuple(logits.shape)}; "
                             f"expected (B, classes) with more than {self.target} classes")
        return torch.log_softmax(logits.float(), dim=1)[:, self.target]


def velocity_kl(model: Callable, reference: Callable, x0: torch.Tensor, z: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """mean over samples and elements of (model(t, x_t) - reference(t, x_t))^2 with x_t = (1 - t) x0
    + t z, the chord from the noise z to the sample x0 it generated (both held fixed): where the
    finetuned flow carries z, for a straight flow. Its integral over t is, up to the noise scale,
    the KL divergence between the path measures of two SDEs sharing these drifts (Girsanov); here
    one time per sample. The reference runs without a graph."""
    x0, z = x0.detach(), z.detach()
    tb = t.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
    xt = (1 - tb) * x0 + tb * z
    with torch.no_grad():
        ref = reference(t, xt)
    return (model(t, xt) - ref).float().square().mean()


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Diversity of a batch: the mean Euclidean distance between two different samples, divided by
    sqrt(elements per sample) (a root-mean-square per element)."""
    flat = x.detach().flatten(1).double()
    if flat.shape[0] < 2:
        raise ValueError(f"pairwise_distance needs at least 2 samples, got {flat.shape[0]}")
    return torch.pdist(flat).mean() / math.sqrt(flat.shape[1])


@dataclass
class RewardLoss:
    """loss: what backward() is called on; reward, kl: the batch's mean reward and velocity_kl
    (detached; kl 0 without a regulariser); sample: what the reward read."""

    loss: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor
    sample: RewardSample


def reward_loss(model: Callable, reward: Callable, z: torch.Tensor, *, steps: int, method: str = "euler",
                gradient=None, reference: Optional[Callable] = None, kl_weight: float = 0.0,
                generator: Optional[torch.Generator] = None, name: Optional[str] = None) -> RewardLoss:
    """One step's objective on noise z: the samples of `gradient`'s mode (default FullChain(): the
    exact adjoint through every step), then -mean reward + kl_weight x velocity_kl(model,
    reference) at one time per sample drawn from `generator` (which also draws the truncation)."""
    gradient = FullChain() if gradient is None else gradient
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, numbers.Real) or not kl_weight >= 0:
        raise ValueError(f"kl_weight must be a number >= 0, got {kl_weight!r}")
    if kl_weight > 0 and reference is None:
        raise ValueError("kl_weight > 0 needs reference: the pretrained velocity the model is kept near")
    sample = gradient.sample(model, z, steps, method, generator)
    r = reward_values(reward, sample.x, name)
    loss, kl = -r.mean(), torch.zeros((), device=z.device)
    if kl_weight > 0:
        device = generator.device if generator is not None else z.device
        t = torch.rand(z.shape[0], generator=generator, device=device).to(z.device)
        kl = velocity_kl(model, reference, sample.x, z, t)
        loss = loss + kl_weight * kl
    return RewardLoss(loss, r.detach().mean(), kl.detach(), sample)
