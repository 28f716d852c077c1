"""prg_fast.diffusion: a published diffusion model's probability-flow ODE, checked against the samplers.

Oracles: DDIM sampling and inversion written out here in the sample's own variable (Song et al. 2021
eq. 12, and the inversion as diffusers' DDIMInverseScheduler and the usual DDIM-inversion code run it:
network at the upper timestep, sample at the lower level), diffusers' own schedulers, and EDM's
Algorithm 1 (Karras et al. 2022, S_churn = 0). Gradients: adjoint against plain backprop through the
same solve in float64.
"""
import math

import pytest
import torch

import prg_fast
from prg_fast.diffusion import EDM, VP, Discrete, EDMPreconditioning, ProbabilityFlow, from_diffusers

T = 1000


class TinyNet(torch.nn.Module):
    """A smooth random network(x, timestep) on (B, 2, 3, 3) samples, float64."""

    def __init__(self, seed=0, time_scale=1e-3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(18, 18, generator=g, dtype=torch.float64) / 5)
        self.u = torch.nn.Parameter(torch.randn(18, generator=g, dtype=torch.float64))
        self.time_scale = time_scale

    def forward(self, x, timestep):
        t = timestep.to(x.dtype).reshape(-1, 1) * self.time_scale
        h = x.reshape(x.shape[0], -1)
        return torch.tanh(h @ self.w + torch.sin(3 * t) * self.u).reshape(x.shape) + 0.1 * x


def ddim_scheduler(beta_schedule="linear", prediction="epsilon", spacing="leading", offset=0, inverse=False):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: its schedulers are the oracle")
    cls = diffusers.DDIMInverseScheduler if inverse else diffusers.DDIMScheduler
    return cls(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction, clip_sample=False,
               timestep_spacing=spacing, steps_offset=offset)


def to_x0_eps(out, x, a, prediction):
    if prediction == "epsilon":
        return (x - (1 - a) ** 0.5 * out) / a ** 0.5, out
    if prediction == "v_prediction":
        return a ** 0.5 * x - (1 - a) ** 0.5 * out, a ** 0.5 * out + (1 - a) ** 0.5 * x
    return out, (x - a ** 0.5 * out) / (1 - a) ** 0.5


def ddim_sample(net, x, ac, timesteps, prediction, final=1.0):
    """Deterministic DDIM from the largest timestep down, each step to the next listed timestep."""
    desc = sorted((int(t) for t in timesteps), reverse=True)
    for i, t in enumerate(desc):
        a = float(ac[t])
        a_prev = float(ac[desc[i + 1]]) if i + 1 < len(desc) else final
        x0, eps = to_x0_eps(net(x, torch.full((x.shape[0],), float(t), dtype=x.dtype)), x, a, prediction)
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def ddim_invert(net, x, ac, timesteps, prediction, initial=1.0):
    """DDIM inversion: from level t_{i-1} up to t_i with the network read at t_i."""
    asc = sorted(int(t) for t in timesteps)
    for i, t in enumerate(asc):
        a = float(ac[asc[i - 1]]) if i > 0 else initial
        a_next = float(ac[t])
        x0, eps = to_x0_eps(net(x, torch.full((x.shape[0],), float(t), dtype=x.dtype)), x, a, prediction)
        x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    return x


def flow_for(net, scheduler, steps):
    scheduler.set_timesteps(steps)
    final = float(getattr(scheduler, "final_alpha_cumprod", getattr(scheduler, "initial_alpha_cumprod", 1.0)))
    schedule = Discrete(scheduler.alphas_cumprod, scheduler.timesteps, final)
    return ProbabilityFlow(net, schedule, scheduler.config.prediction_type)


def sample_x(seed=1, batch=2):
    return torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = [("linear", "epsilon", "leading", 1), ("squaredcos_cap_v2", "epsilon", "trailing", 0),
         ("linear", "v_prediction", "trailing", 0), ("squaredcos_cap_v2", "v_prediction", "leading", 1),
         ("linear", "epsilon", "linspace", 0), ("squaredcos_cap_v2", "v_prediction", "linspace", 0)]


@pytest.mark.parametrize("beta_schedule,prediction,spacing,offset", CASES)
def test_euler_equals_ddim_sampling_and_inversion(beta_schedule, prediction, spacing, offset):
    # the oracle is written out above; float64 throughout, so agreement is to float64 rounding
    net, steps = TinyNet(), 10
    sch = ddim_scheduler(beta_schedule, prediction, spacing, offset)
    flow = flow_for(net, sch, steps)
    ac = sch.alphas_cumprod.double()
    z = sample_x(1)
    with torch.no_grad():
        ours = generate_natural(flow, z, steps, "euler")
        ref = ddim_sample(net, z, ac, sch.timesteps, prediction)
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
        x = sample_x(2)
        ours = flow.from_state(prg_fast.reverse(flow, flow.to_state(x, 0.0), steps=steps, method="euler"), 1.0)
        torch.testing.assert_close(ours, ddim_invert(net, x, ac, sch.timesteps, prediction), rtol=1e-11, atol=1e-11)


def generate_natural(flow, z, steps, method, **kwargs):
    return flow.from_state(prg_fast.generate(flow, flow.to_state(z, 1.0), steps=steps, method=method, **kwargs), 0.0)


@pytest.mark.parametrize("beta_schedule,prediction,spacing,offset", [c for c in CASES if c[2] != "linspace"])
def test_euler_equals_diffusers_ddim_schedulers(beta_schedule, prediction, spacing, offset):
    # diffusers computes its coefficients in float32 (alphas_cumprod is float32): agreement to float32
    # rounding of those coefficients. "linspace" is left out: diffusers' DDIMScheduler.step goes from t to
    # t - T // N, which is not the next linspace timestep (its chain moves the sample between levels).
    net, steps = TinyNet(), 10
    sch = ddim_scheduler(beta_schedule, prediction, spacing, offset)
    flow = flow_for(net, sch, steps)
    z = sample_x(1)
    with torch.no_grad():
        ref = z
        for t in sch.timesteps:
            ref = sch.step(net(ref, t.double().expand(2)), t, ref).prev_sample
        torch.testing.assert_close(generate_natural(flow, z, steps, "euler"), ref, rtol=1e-5, atol=1e-5)
        inv = ddim_scheduler(beta_schedule, prediction, spacing, offset, inverse=True)
        inv.set_timesteps(steps)
        x = sample_x(2)
        ref = x
        for t in inv.timesteps:
            ref = inv.step(net(ref, t.double().expand(2)), t, ref).prev_sample
        ours = flow.from_state(prg_fast.reverse(flow, x, steps=steps, method="euler"), 1.0)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_from_diffusers_steps_and_float32():
    # from_diffusers reads the scheduler (on a copy: the user's scheduler keeps its own timesteps);
    # in float32 the flow agrees with float64 DDIM to float32 rounding
    net = TinyNet().float()
    sch = ddim_scheduler("linear", "epsilon", "leading", 1)
    sch.set_timesteps(7)
    flow = from_diffusers(torch.nn.Identity(), sch, steps=10)
    assert sch.num_inference_steps == 7 and flow.steps == 10
    flow.network = net  # the wrapper's model call is diffusers-specific; test the arithmetic with net
    ref_sch = ddim_scheduler("linear", "epsilon", "leading", 1)
    ref_sch.set_timesteps(10)
    z = sample_x(3)
    with torch.no_grad():
        ours = generate_natural(flow, z.float(), 10, "euler")
        ref = ddim_sample(TinyNet(), z, ref_sch.alphas_cumprod.double(), ref_sch.timesteps, "epsilon")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_edm_heun_equals_algorithm_1():
    torch.manual_seed(0)
    steps = 6
    denoiser = EDMPreconditioning(TinyNet(time_scale=1.0))
    flow = ProbabilityFlow(denoiser, EDM(), "sample", steps=steps)
    sig = flow.sigmas.flip(0)  # sigma_0 = sigma_max ... sigma_{N-1} = sigma_min, sigma_N = 0
    z = sample_x(4) * sig[0]
    x = z
    with torch.no_grad():
        for i in range(steps):
            s, s_next = sig[i].expand(2), sig[i + 1]
            d = (x - denoiser(x, s)) / s[0]
            x_next = x + (s_next - s[0]) * d
            if s_next != 0:
                d2 = (x_next - denoiser(x_next, s_next.expand(2))) / s_next
                x_next = x + (s_next - s[0]) * (d + d2) / 2
            x = x_next
        # Heun over the first N-1 steps on the knots themselves, then Algorithm 1's last step, Euler
        knots = flow.knots.flip(0)
        y = prg_fast.odeint(flow, z, knots[:steps], method="heun")[-1]
        y = prg_fast.odeint(flow, y, knots[steps - 1:], method="euler")[-1]
    torch.testing.assert_close(y, x, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method,order", [("heun", 2), ("rk4", 4)])
def test_round_trip_error_falls_at_the_solvers_order(method, order):
    # generate(reverse(x)) on the same ODE: its error is at most the solver's global error, O(h^order)
    # (here one order better: the leading local errors of a step and of its inverse step cancel);
    # refining every piece by m keeps the knots on the grid. A moderate sigma_max keeps h * Lipschitz small.
    net = TinyNet()
    flow = ProbabilityFlow(net, VP("linear", beta_max=4.0), "v_prediction", steps=4)
    x = sample_x(5)
    errors = []
    with torch.no_grad():
        for m in (1, 2, 4):
            z = prg_fast.reverse(flow, x, steps=4 * m, method=method)
            errors.append((prg_fast.generate(flow, z, steps=4 * m, method=method) - x).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(r > order - 0.5 for r in rates), (errors, rates)


def tiny_unet(**kwargs):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: the UNet is diffusers'")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(4, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), **kwargs).double()


# the default ("auto": every graph kept at these sizes), recompute all, keep all, steps, reversible
STRATEGIES = [dict(), dict(memory_budget=0), dict(memory_budget=float("inf")), dict(store="steps", memory_budget=0),
              dict(reversible=True)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=["auto", "budget_0", "budget_inf", "store_steps", "reversible"])
def test_exact_adjoint_on_a_tiny_unet(strategy):
    unet = tiny_unet(num_class_embeds=3)
    sch = ddim_scheduler("squaredcos_cap_v2", "v_prediction", "trailing")
    flow = from_diffusers(unet, sch, steps=2, class_labels=torch.tensor([0, 2]))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor(0.8, dtype=torch.float64)

    def grads(adjoint):
        xx, tt = x.clone().requires_grad_(), t.clone().requires_grad_()
        kw = strategy if adjoint else {k: v for k, v in strategy.items() if k == "reversible"}
        out = prg_fast.reverse(flow, xx, tt, steps=4, method="heun", adjoint=adjoint, **kw)
        params = [p for p in unet.parameters()]
        return torch.autograd.grad((out ** 2).sum(), [xx, tt] + params)

    adjoint, backprop = grads(True), grads(False)
    # some gradients vanish mathematically (a bias before a GroupNorm): their float64 rounding noise
    # scales with the largest gradient, so the absolute tolerance does too
    scale = max(g.abs().max().item() for g in backprop)
    for a, b in zip(adjoint, backprop):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale)


def test_conditioning_that_requires_grad_gets_its_exact_gradient():
    # a closed-over conditioning tensor (as encoder_hidden_states is) is an input the adjoint must see
    class Conditioned(torch.nn.Module):
        def __init__(self, net, cond):
            super().__init__()
            self.net, self.cond = net, cond

        def forward(self, x, timestep):
            return self.net(x, timestep) * (1 + self.cond.reshape(-1, 1, 1, 1))

    cond = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    sch = ddim_scheduler("linear", "epsilon", "leading", 1)
    flow = flow_for(Conditioned(TinyNet(), cond), sch, 3)
    x = sample_x(6)
    g = [torch.autograd.grad(prg_fast.reverse(flow, x, steps=3, method="rk4", adjoint=a).square().sum(), cond)[0]
         for a in (True, False)]
    torch.testing.assert_close(g[0], g[1], rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="prediction"):
        ProbabilityFlow(TinyNet(), VP(), "noise_level", steps=3)
    with pytest.raises(ValueError, match="v_prediction"):
        ProbabilityFlow(TinyNet(), EDM(), "v", steps=3)
    with pytest.raises(ValueError, match="steps"):
        ProbabilityFlow(TinyNet(), VP(), "epsilon")
    with pytest.raises(ValueError, match="network_time"):
        ProbabilityFlow(TinyNet(), VP(), "epsilon", steps=3, network_time="late")


def test_from_diffusers_names_what_is_not_a_scheduler():
    pytest.importorskip("diffusers", reason="diffusers is not installed: from_diffusers says so first")
    with pytest.raises(TypeError, match="scheduler"):
        from_diffusers(torch.nn.Identity(), object())


@pytest.mark.parametrize("scheduler,setting", [("DDIMScheduler", "clip_sample"), ("DDIMInverseScheduler", "clip_sample"),
                                               ("DDPMScheduler", "clip_sample"), ("DDIMScheduler", "thresholding")])
def test_from_diffusers_refuses_a_scheduler_that_clips_x0(scheduler, setting):
    # clip_sample=True is diffusers' default for its DDIM and DDPM schedulers; the ODE has no clipping,
    # so the flow's generate would silently differ from the scheduler's sampler: refused, the fix named
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: its schedulers are the subject")
    cls = getattr(diffusers, scheduler)
    sch = cls(num_train_timesteps=T, **{"clip_sample": False, setting: True})
    with pytest.raises(ValueError, match=rf"{setting}=True.*from_config\(scheduler.config, {setting}=False\)"):
        from_diffusers(torch.nn.Identity(), sch, steps=4)
    if setting == "clip_sample":
        with pytest.raises(ValueError, match="clip_sample"):
            from_diffusers(torch.nn.Identity(), cls(num_train_timesteps=T), steps=4)  # diffusers' default
    from_diffusers(torch.nn.Identity(), cls.from_config(sch.config, **{setting: False}), steps=4)  # the fix works

def test_from_diffusers_without_diffusers_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"prg_fast\[diffusion\]"):
        prg_fast.from_diffusers(torch.nn.Identity(), object())


def test_per_sample_times_exact_gradient():
    # each sample its own [t0, t] (partial inversions), t requiring grad: adjoint == backprop
    sch = ddim_scheduler("linear", "v_prediction", "leading", 1)
    flow = flow_for(TinyNet(), sch, 4)
    x = sample_x(7)

    def grads(adjoint):
        xx = x.clone().requires_grad_()
        t = torch.tensor([0.6, 0.9], dtype=torch.float64, requires_grad=True)
        out = prg_fast.reverse(flow, xx, t, steps=3, method="rk4", adjoint=adjoint)
        return torch.autograd.grad(out.square().sum(), [xx, t] + list(flow.parameters()))

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", [VP("linear"), VP("cosine"), prg_fast.diffusion.VE(), EDM()],
                         ids=["vp_linear", "vp_cosine", "ve", "edm"])
def test_model_time_inverts_each_schedules_levels(schedule):
    # network_time="continuous" reads the schedule's time of sigma(t): at the levels it must be the level's own
    sigmas, times = schedule.levels(8)
    inner = sigmas > 0  # EDM's sigma = 0 level has no network time (log 0)
    torch.testing.assert_close(schedule.model_time(sigmas[inner]), times[inner], rtol=1e-9, atol=1e-12)


def test_discrete_model_time_reads_the_table():
    sch = ddim_scheduler("squaredcos_cap_v2")
    schedule = Discrete(sch.alphas_cumprod, [999, 500, 3])
    steps = torch.tensor([3.0, 40.0, 500.0, 998.0], dtype=torch.float64)
    sigma = schedule.table_sigmas[steps.long()]
    torch.testing.assert_close(schedule.model_time(sigma), steps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["score", "sample"])
def test_ve_euler_is_the_probability_flow_step(prediction):
    # VE: x = x0 + sigma eps; the probability-flow Euler step in sigma is x + (sigma' - sigma) eps_hat, with
    # eps_hat = -sigma * score or (x - x0_hat) / sigma
    net = TinyNet(time_scale=0.1)
    flow = ProbabilityFlow(net, prg_fast.diffusion.VE(0.1, 10.0), prediction, steps=3)
    sig = flow.sigmas
    z = sample_x(8) * sig[-1]
    x = z
    with torch.no_grad():
        for k in (3, 2, 1):
            out = net(x, sig[k].expand(2))
            eps = -sig[k] * out if prediction == "score" else (x - out) / sig[k]
            x = x + (sig[k - 1] - sig[k]) * eps
        torch.testing.assert_close(prg_fast.generate(flow, z, steps=3, method="euler"), x, rtol=1e-12, atol=1e-12)
