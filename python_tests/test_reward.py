"""prg_fast.reward and `prg-fast reward`: the reward gradient through the sampler equals plain backprop
through the same loop (float64), each truncation's gradient equals backprop through exactly the steps
it keeps, a reward that returns NaN / a wrong shape / no graph is an error naming it, and a reward
run stopped by a signal resumes bitwise (in-process here; the command line's SIGINT in a slow test).

The reference loop is written out here, independent of the engine: Euler / Heun steps on the grid
t_i = i / K from t = 1 down to 0, the steps before the kept ones under no_grad."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ConvVelocity
from prg_fast.reward import (ClassLogProb, FullChain, LastSteps, OneStep, RandomTruncation, gradient_mode,
                             pairwise_distance, reward_values, step_generator, velocity_kl)
from prg_fast.training.reward import reward_finetune
from prg_fast.training.trainer import Interrupted

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 6


def _euler(model, x, t0, t1):
    return x + (t1 - t0) * model(torch.full((x.shape[0],), t0, dtype=x.dtype), x)


def _heun(model, x, t0, t1):
    h = t1 - t0
    k1 = model(torch.full((x.shape[0],), t0, dtype=x.dtype), x)
    k2 = model(torch.full((x.shape[0],), t1, dtype=x.dtype), x + h * k1)
    return x + h * (k1 + k2) / 2


STEP = {"euler": _euler, "heun": _heun}


def prefix_loop(model, z, steps, kept, method="euler"):
    """The sampler's first steps - kept steps, without a graph: the state at t = kept / steps."""
    x = z
    with torch.no_grad():
        for i in range(steps, kept, -1):
            x = STEP[method](model, x, i / steps, (i - 1) / steps)
    return x


def reference_loop(model, z, steps, kept, method="euler"):
    """The sampler written out: steps - kept steps without a graph, then the last kept with one."""
    x = prefix_loop(model, z, steps, kept, method)
    for i in range(kept, 0, -1):
        x = STEP[method](model, x, i / steps, (i - 1) / steps)
    return x


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = ConvVelocity(1, 6).double()
    z = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    w = torch.randn(1, 5, 5, dtype=torch.float64)

    def reward(x):  # nonlinear in x, so the gradient depends on where the chain ends
        return (torch.tanh(x) * w).flatten(1).sum(1) + 0.1 * x.square().flatten(1).sum(1)

    return model, z, reward


def _grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def _assert_close(got, want, tol=1e-10):
    for a, b in zip(got, want):
        assert (a - b).norm() <= tol * b.norm(), ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("solve", [dict(memory_budget=0), dict(memory_budget="auto"), dict(memory_budget=float("inf")),
                                   dict(adjoint=False)], ids=["budget0", "auto", "inf", "backprop"])
def test_full_chain_gradient_equals_backprop_through_the_loop(problem, method, solve):
    model, z, reward = problem
    sample = FullChain(**solve).sample(model, z, K, method)
    assert sample.kept == K and sample.t_cut == 1.0
    got = _grads(model, reward_values(reward, sample.x).sum())
    want = _grads(model, reward(reference_loop(model, z, K, K, method)).sum())
    _assert_close(got, want)


@pytest.mark.parametrize("k", [1, 3, K, K + 4])
def test_draft_k_gradient_is_backprop_through_the_last_k_steps(problem, k):
    model, z, reward = problem
    sample = LastSteps(k).sample(model, z, K, "heun")
    kept = min(k, K)
    assert sample.kept == kept
    got = _grads(model, reward(sample.x).sum())
    _assert_close(got, _grads(model, reward(reference_loop(model, z, K, kept, "heun")).sum()))
    if kept < K:  # and it is not the full chain's gradient
        full = _grads(model, reward(reference_loop(model, z, K, K, "heun")).sum())
        assert any((a - b).norm() > 1e-6 * b.norm() for a, b in zip(got, full))


def test_alignprop_draws_k_per_step_and_differentiates_exactly_those_steps(problem):
    model, z, reward = problem
    mode, seen = RandomTruncation(), set()
    for step in range(12):
        sample = mode.sample(model, z, K, "euler", step_generator(0, step))
        seen.add(sample.kept)
        assert 1 <= sample.kept <= K and sample.t_cut == sample.kept / K
        if step < 3:
            got = _grads(model, reward(sample.x).sum())
            _assert_close(got, _grads(model, reward(reference_loop(model, z, K, sample.kept)).sum()))
    assert len(seen) >= 3  # it does draw
    # the draw is a function of the step's generator alone
    again = [mode.kept(K, step_generator(0, s)) for s in range(12)]
    assert again == [mode.kept(K, step_generator(0, s)) for s in range(12)]
    assert RandomTruncation(max_k=2).kept(K, step_generator(0, 0)) <= 2


def test_refl_is_one_euler_step_to_data_from_a_late_grid_time(problem):
    model, z, reward = problem
    mode, late = OneStep(late=0.5), math.ceil(0.5 * K)
    seen = set()
    for step in range(8):
        sample = mode.sample(model, z, K, "heun", step_generator(3, step))
        j = round(sample.t_cut * K)
        seen.add(j)
        assert sample.kept == 1 and 1 <= j <= late and sample.t_cut == j / K
        x = prefix_loop(model, z, K, j, "heun")  # the chain without a graph down to t_j
        want = _euler(model, x, j / K, 0.0)  # then x0 predicted in one Euler step
        _assert_close(_grads(model, reward(sample.x).sum()), _grads(model, reward(want).sum()))
    assert len(seen) >= 2


def test_gradient_mode_spellings():
    assert isinstance(gradient_mode("full"), FullChain) and gradient_mode("full", memory_budget=0).solve == {
        "memory_budget": 0}
    assert gradient_mode("backprop").solve == {"adjoint": False}
    assert gradient_mode("draft-5").k == 5 and isinstance(gradient_mode("alignprop"), RandomTruncation)
    assert gradient_mode("refl", refl_late=0.1).late == 0.1
    for bad in ("draft-0", "draft", "draft-x", "DRaFT-1", "", None, "one-step"):
        with pytest.raises(ValueError, match="gradient must be one of"):
            gradient_mode(bad)
    with pytest.raises(ValueError, match="late"):
        OneStep(0.0)


# -- the reward's checks ------------------------------------------------------------------------


def _named(fn, name):
    fn.__qualname__ = name
    return fn


@pytest.mark.parametrize("reward, error, match", [
    (_named(lambda x: x.flatten(1).sum(1) * float("nan"), "nan_reward"), FloatingPointError,
     r"reward nan_reward returned NaN/Inf for 3 of 3 samples"),
    (_named(lambda x: x.flatten(1).sum(1, keepdim=True), "column_reward"), ValueError,
     r"reward column_reward returned shape \(3, 1\) .* expected \(3,\)"),
    (_named(lambda x: x.sum(), "scalar_reward"), ValueError, r"reward scalar_reward returned shape \(\)"),
    (_named(lambda x: x.flatten(1).sum(1).detach(), "detached_reward"), ValueError,
     "reward detached_reward returned a tensor without a graph"),
    (_named(lambda x: x.flatten(1).sum(1).tolist(), "list_reward"), TypeError, "reward list_reward returned a list"),
    (_named(lambda x: (x.flatten(1).sum(1) > 0).long(), "int_reward"), TypeError,
     "reward int_reward returned torch.int64"),
])
def test_a_bad_reward_is_an_error_naming_it(problem, reward, error, match):
    model, z, _ = problem
    x = FullChain(memory_budget=0).sample(model, z, 2, "euler").x
    with pytest.raises(error, match=match):
        reward_values(reward, x)


def test_class_log_prob_reward_and_its_checks():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    reward = ClassLogProb(clf, 2)
    x = torch.randn(5, 1, 2, 2, requires_grad=True)
    r = reward_values(reward, x)
    assert torch.allclose(r, torch.log_softmax(clf(x), 1)[:, 2]) and not any(p.requires_grad for p in clf.parameters())
    with pytest.raises(ValueError, match=r"reward class:7: the classifier returned logits of shape \(5, 3\)"):
        reward_values(ClassLogProb(clf, 7), x)


def test_velocity_kl_and_diversity():
    torch.manual_seed(0)
    a, b = ConvVelocity(1, 4), ConvVelocity(1, 4)
    x0, z, t = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.rand(4)
    assert velocity_kl(a, a, x0, z, t).item() == 0.0
    kl = velocity_kl(a, b, x0, z, t)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * z
    assert torch.allclose(kl, (a(t, xt) - b(t, xt)).square().mean())
    x0.requires_grad_(True)  # a sample with its graph: the KL term does not differentiate the chain again
    velocity_kl(a, b, x0, z, t).backward()  # the gradient reaches the finetuned network only
    assert a.c1.weight.grad is not None and b.c1.weight.grad is None and x0.grad is None
    same = torch.ones(3, 2)
    assert pairwise_distance(same).item() == 0.0
    assert pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).item() == pytest.approx(5 / math.sqrt(2))


# -- the trainer --------------------------------------------------------------------------------


def _target_reward(x):
    """A smooth reward with a graph: how close the sample is to a fixed bright square."""
    return -(x - 0.5).square().flatten(1).mean(1)


def _run(tmp_path, name, **kw):
    args = dict(data="digits", steps=4, batch_size=4, ode_steps=3, log_every=3, ckpt_every=1000, eval_samples=4,
                progress=False, device="cpu")
    args.update(kw)
    torch.manual_seed(0)
    model = ConvVelocity(1, 6)  # the same pretrained weights every time
    torch.manual_seed(sum(map(ord, name)))  # but the global random state differs between runs
    return reward_finetune(model=model, reward=_target_reward, out=str(tmp_path / name), **args)


@pytest.mark.parametrize("gradient, adapter", [("full", "lora"), ("alignprop", "full"), ("refl", "lora")])
def test_reward_run_stops_cleanly_and_resumes_bitwise(tmp_path, monkeypatch, gradient, adapter):
    from prg_fast.training.reward import _RewardTrainer
    from test_trainer import _assert_same, _signal_at

    kw = dict(gradient=gradient, adapter=adapter, fm_weight=0.5 if adapter == "full" else 0.0)
    original = _signal_at(monkeypatch, _RewardTrainer, 1)  # mid log interval
    with pytest.raises(Interrupted) as e:
        _run(tmp_path, "run", **kw)
    assert e.value.step == 2 and e.value.exit_code == 130
    monkeypatch.setattr(_RewardTrainer, "train_step", original)
    resumed, full = _run(tmp_path, "run", **kw), _run(tmp_path, "ref", **kw)
    assert resumed.metrics["resumed_from_step"] == 2 and full.metrics["resumed_from_step"] == 0
    a = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    for key in ("model", "trained", "optimizer", "history", "rng", "running"):
        _assert_same(a[key], b[key], key)
    assert resumed.metrics["reward"] == full.metrics["reward"]
    assert len(a["history"]) == 2 and a["history"][0][0] == 3  # rows at 3 and 4


def test_reward_run_moves_the_reward_and_starts_at_the_pretrained_network(tmp_path):
    res = _run(tmp_path, "r", steps=6, lr=3e-2, kl_weight=0.0)
    m = res.metrics
    assert m["reward"] > m["reward_pretrained"]  # it learned
    assert m["num_params_trained"] < m["num_params"]  # LoRA: the adapters only
    rows = res.history
    assert rows[0][3] < 1e-3  # a zero-initialised adapter: the first steps sit on the pretrained velocity
    for name in ("samples.png", "samples_pretrained.png", "metrics.json", "log.csv"):
        assert (tmp_path / "r" / name).is_file()
    # the merged weights are the adapted network's
    from prg_fast.models import lora_disabled
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    plain = ConvVelocity(1, 6)
    plain.load_state_dict(ckpt["model"])
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert torch.allclose(plain(t, x), res.model(t, x), atol=1e-5)
        with lora_disabled(res.model):
            assert not torch.allclose(plain(t, x), res.model(t, x), atol=1e-5)


def test_adapter_none_trains_what_requires_grad_as_given(tmp_path):
    """A network that arrives with its own trainable subset (a peft-wrapped one: peft is an optional
    extra; frozen parameters stand in for its frozen base here) trains only that subset."""
    torch.manual_seed(0)
    model = ConvVelocity(1, 6)
    model.c1.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = reward_finetune(model=model, reward=_target_reward, adapter="none", out=str(tmp_path / "n"), steps=2,
                          batch_size=2, ode_steps=2, lr=1e-2, eval_samples=2, progress=False, device="cpu")
    after = res.model.state_dict()
    assert torch.equal(after["c1.weight"], before["c1.weight"]) and torch.equal(after["c1.bias"], before["c1.bias"])
    assert not torch.equal(after["c2.weight"], before["c2.weight"])
    assert res.metrics["num_params_trained"] == sum(p.numel() for p in model.c2.parameters()) + sum(
        p.numel() for p in model.temb.parameters())
    with pytest.raises(ValueError, match="adapter 'none' trains the parameters .* has none"):
        reward_finetune(model=ConvVelocity(1, 6).requires_grad_(False), reward=_target_reward, adapter="none",
                        out=str(tmp_path / "m"), steps=1, progress=False, device="cpu")


def test_a_nan_reward_stops_the_run_naming_the_reward(tmp_path):
    broken = _named(lambda x: x.flatten(1).sum(1) * float("nan"), "broken")
    with pytest.raises(FloatingPointError, match="reward broken returned NaN"):
        reward_finetune(model=ConvVelocity(1, 6), reward=broken, out=str(tmp_path / "n"),
                        steps=2, batch_size=2, ode_steps=2, progress=False, device="cpu")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="reward must be class:N"):
        reward_finetune(model=ConvVelocity(1, 6), out=str(tmp_path / "a"), reward="nonsense", device="cpu")
    with pytest.raises(ValueError, match="gradient must be one of"):
        reward_finetune(model=ConvVelocity(1, 6), reward=_target_reward, gradient="draft-0", out=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="reward needs --checkpoint"):
        reward_finetune(reward="class:1", out=str(tmp_path / "c"))


@pytest.mark.slow
def test_cli_reward_class_target_sigint_resumes_bitwise(tiny_flow_checkpoint, tmp_path):
    """The command on a pretraining run with the built-in class reward: SIGINT writes a checkpoint
    and the same command resumes it to the uninterrupted run's weights bitwise."""
    from test_trainer import _assert_same, _flags, _interrupt_cli

    args = dict(data="digits", checkpoint=tiny_flow_checkpoint, reward="class:3", batch_size=4, ode_steps=4,
                classifier_steps=20, log_every=1, ckpt_every=1000, eval_samples=4, gradient="draft-2", fm_weight=0.1,
                progress=False, device="cpu")
    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    status, err = _interrupt_cli(["reward", *_flags({**args, "steps": 400, "out": run})], run, signal.SIGINT)
    assert status == 130 and "resume with: prg-fast reward" in err, err
    step = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["step"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for out in (run, ref):
        res = subprocess.run([sys.executable, "-m", "prg_fast", "reward", *_flags({**args, "steps": step + 1,
                                                                                  "out": out})],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
    a = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(ref, "checkpoint.pt"), weights_only=True)
    for key in ("model", "trained", "optimizer", "history", "reward"):
        _assert_same(a[key], b[key], key)
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    assert metrics["resumed_from_step"] == step and metrics["classifier_top1"] > 0.3


@pytest.mark.parametrize("flags, message", [
    (["--gradient", "draft-0"], "gradient must be one of"),
    (["--reward", "class:x"], "reward must be class:N"),
    (["--checkpoint", "/nonexistent/run"], "no pretraining checkpoint at /nonexistent/run"),
])
def test_cli_errors_are_one_line_and_status_2(tmp_path, capsys, flags, message):
    from prg_fast import cli

    args = {"--data": "digits", "--checkpoint": str(tmp_path / "none"), "--reward": "class:3",
            "--out": str(tmp_path / "out")}
    for flag, value in zip(flags[::2], flags[1::2]):
        args[flag] = value
    assert cli.main(["reward", *[x for kv in args.items() for x in kv], "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()
