"""The engine's two guarantees a piecewise-in-time velocity builds on (prg_fast.diffusion uses both):
generate walks reverse's grid backwards bit for bit, and a velocity declaring jumps_at_grid_points is
read from inside each step."""
import pytest
import torch

import prg_fast


class Recorder(torch.nn.Module):
    def __init__(self, jumps=False):
        super().__init__()
        self.jumps_at_grid_points = jumps
        self.times = []

    def forward(self, t, x):
        self.times.append(float(t.reshape(-1)[0]))
        # a velocity that jumps at t = 1/3: 1 below, 2 from there on
        return x * 0 + torch.where(t.reshape(-1, 1) < 1 / 3, 1.0, 2.0).to(x.dtype)


@pytest.mark.parametrize("steps", [3, 7, 10])
def test_generate_visits_reverses_grid_backwards(steps):
    up, down = Recorder(), Recorder()
    x = torch.zeros(2, 1, dtype=torch.float64)
    prg_fast.reverse(up, x, steps=steps, method="euler")
    prg_fast.generate(down, x, steps=steps, method="euler")
    # euler reads each step's start: reverse the points k/steps (k < steps), generate the others, backwards
    grid_up = up.times + [1.0]
    assert down.times == grid_up[::-1][:-1]


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_a_declared_jump_is_read_from_inside_each_step(method):
    # with the jump on the grid (3 steps, knot 1/3) every step sees one constant velocity: exact solve
    x = torch.zeros(1, 1, dtype=torch.float64)
    up = prg_fast.reverse(Recorder(jumps=True), x, steps=3, method=method)
    torch.testing.assert_close(up, torch.full_like(x, 1 / 3 + 2 * 2 / 3), rtol=1e-12, atol=1e-12)
    down = prg_fast.generate(Recorder(jumps=True), x, steps=3, method=method)
    torch.testing.assert_close(down, torch.full_like(x, -(1 / 3 + 2 * 2 / 3)), rtol=1e-12, atol=1e-12)
