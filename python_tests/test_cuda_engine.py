"""The engine's adjoint strategies on a GPU (pytest -m cuda): each strategy, on each compiled
backend, gives plain backprop's gradients through the same solver (float64, the CPU strategy tests'
oracle), and a bf16 autocast solve stays within bf16 rounding of the float32 one. The CPU suite
(test_adjoint_strategies.py) covers every method and budget boundary; this covers the device."""
import pytest
import torch

import prg_fast
from prg_fast.ode import backends
from gradient_checks import grads, rel_err

INF = float("inf")
STRATEGIES = {
    "auto": {},  # the default: torch.cuda.mem_get_info decides
    "recompute": dict(memory_budget=0),
    "keep_all": dict(memory_budget=INF),
    "store_steps": dict(store="steps", memory_budget=0),
    "reversible": dict(reversible=True),
}


def _why_not(backend):
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return backends.unavailable_reason(backend, torch.device("cuda"))


def _backend_params():
    return [pytest.param(name, marks=pytest.mark.skipif(_why_not(name) is not None, reason=f"{name}: {_why_not(name)}"))
            for name in ("cuda", "triton")]


pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_strategy_equals_backprop_on_cuda(conv, strategy, backend, method):
    model = conv(channels=3).to("cuda", torch.float64)
    x = torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=4, method=method, backend=backend)
    strategy_kw = STRATEGIES[strategy]
    ref_kw = dict(adjoint=False, reversible=strategy_kw.get("reversible", False))
    ref = prg_fast.reverse(model, x, **ref_kw, **kw)
    out = prg_fast.reverse(model, x, **strategy_kw, **kw)
    # float64 end to end: the forward is the same arithmetic, the gradients differ by summation
    # order only (~5e-16 on the CPU; the CPU strategy tests hold them to 1e-12 as well)
    assert rel_err(out, ref) < 1e-12
    for a, b in zip(grads(out, inputs), grads(ref, inputs)):
        assert rel_err(a, b) < 1e-12, strategy


@pytest.mark.parametrize("backend", _backend_params())
def test_bf16_autocast_adjoint_on_cuda(conv, backend):
    """The state stays float32 under autocast; gradients within bf16's rounding of float32's."""
    model = conv(channels=3).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda", requires_grad=True)
    inputs = [x] + list(model.parameters())
    kw = dict(t=1.0, steps=4, method="rk4", backend=backend)
    ref = prg_fast.reverse(model, x, adjoint=False, **kw)
    ref_grads = grads(ref, inputs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = prg_fast.reverse(model, x, **kw)
    assert out.dtype == torch.float32
    # bf16 rounds to 2^-9 relative per op; on the CPU the same solve lands at ~1e-3 (state), ~3e-3 (gradients)
    assert rel_err(out, ref) < 2e-2
    for a, b in zip(grads(out, inputs), ref_grads):
        assert rel_err(a, b) < 5e-2
