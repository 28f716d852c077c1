"""The no-grad loop writes stage inputs and states into buffers it owns (StepBuffers,
stage_combine_into); results must equal the reference backend's, which allocates every output,
also for velocities that return their input or a view of it and with several saved states."""
import pytest
import torch

import prg_fast
from prg_fast.ode import ops

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason=f"compiled ops not built: {ops.CPU_ERROR}")

VELOCITIES = {
    "returns its input": lambda t, x: x,
    "returns a transposed view of its input": lambda t, x: x.transpose(0, 1),
    "returns a slice of its input (a view)": lambda t, x: x[:, :],
    "tanh": lambda t, x: torch.tanh(x) - 0.3 * x,
}


@pytest.mark.parametrize("name", list(VELOCITIES))
@pytest.mark.parametrize("method", ["rk4_38", "heun", "euler"])
def test_no_grad_solve_matches_the_reference(name, method):
    torch.manual_seed(0)
    x = torch.randn(16, 16)
    v = VELOCITIES[name]
    with torch.no_grad():
        ours = prg_fast.reverse(v, x.clone(), steps=7, method=method, save_at=[0.0, 0.5, 1.0])
        ref = prg_fast.reverse(v, x.clone(), steps=7, method=method, save_at=[0.0, 0.5, 1.0], backend="reference")
    # the same arithmetic in the same order (float32, one rounding per output element)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_the_input_is_never_written():
    x = torch.randn(32, 8)
    before = x.clone()
    with torch.no_grad():
        prg_fast.reverse(lambda t, y: y, x, steps=5, method="rk4")
    assert torch.equal(x, before)


def test_saved_states_are_not_overwritten_by_later_steps():
    x = torch.randn(4, 6)
    with torch.no_grad():
        out = prg_fast.reverse(lambda t, y: -y, x, steps=10, method="rk4", save_at=[0.2, 0.6, 1.0])
    expected = torch.stack([x * torch.exp(torch.tensor(-s)) for s in (0.2, 0.6, 1.0)])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
