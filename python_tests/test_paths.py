"""prg_fast.paths: GVP / ICFM / OTCFM formulas in the project convention (t = 0 data, t = 1 noise),
u_t = d x_t / dt, and exact OT pairing (a permutation, optimal against brute force)."""
import itertools
import math

import pytest
import torch

from prg_fast import paths
from prg_fast.paths import GVP, ICFM, OTCFM, get_path, ot_cost_matrix, ot_permutation

ALL = [GVP(), ICFM(), OTCFM()]


def _batch(n=5, shape=(3, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randn(n, *shape, generator=g, dtype=dtype)


def test_gvp_formula():
    x0, x1 = _batch()
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, u_t = GVP().sample(x0, x1, t)
    for i, ti in enumerate(t.tolist()):
        c, s = math.cos(math.pi * ti / 2), math.sin(math.pi * ti / 2)
        torch.testing.assert_close(x_t[i], c * x0[i] + s * x1[i])
        torch.testing.assert_close(u_t[i], -(math.pi / 2) * s * x0[i] + (math.pi / 2) * c * x1[i])


def test_icfm_formula():
    x0, x1 = _batch()
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    x_t, u_t = ICFM().sample(x0, x1, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(x_t[i], (1 - ti) * x0[i] + ti * x1[i])
    torch.testing.assert_close(u_t, x1 - x0)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_endpoints_are_data_and_noise(path):
    # t = 0 is data and t = 1 is noise; for OTCFM the noise end is the *paired* noise
    x0, x1 = _batch()
    x1p = path.pair(x0, x1)[1]
    torch.testing.assert_close(path.sample(x0, x1, 0.0)[0], x0)
    torch.testing.assert_close(path.sample(x0, x1, 1.0)[0], x1p, atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
@pytest.mark.parametrize("t0", [0.05, 0.3, 0.7, 0.95])
def test_u_is_time_derivative_of_x(path, t0):
    """Central finite differences of x_t in t match u_t (float64, h = 1e-5)."""
    x0, x1 = _batch(n=6, seed=3)
    h = 1e-5
    t = torch.full((6,), t0, dtype=torch.float64)
    _, u = path.sample(x0, x1, t)
    xp, _ = path.sample(x0, x1, t + h)
    xm, _ = path.sample(x0, x1, t - h)
    torch.testing.assert_close((xp - xm) / (2 * h), u, atol=1e-8, rtol=1e-7)


def test_per_sample_times_broadcast():
    x0, x1 = _batch(n=4, shape=(2, 3, 3))
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    x_t, _ = ICFM().sample(x0, x1, t)
    for i in range(4):
        torch.testing.assert_close(x_t[i], ICFM().sample(x0[i : i + 1], x1[i : i + 1], t[i : i + 1])[0][0])


def test_icfm_sigma_adds_noise_but_keeps_target():
    x0, x1 = _batch(n=2000, shape=(4,), dtype=torch.float32)
    t = torch.full((2000,), 0.5)
    x_clean, u_clean = ICFM().sample(x0, x1, t)
    torch.manual_seed(1)
    x_noisy, u_noisy = ICFM(sigma=0.3).sample(x0, x1, t)
    torch.testing.assert_close(u_noisy, u_clean)
    assert abs((x_noisy - x_clean).std().item() - 0.3) < 0.02


def _cost(x0, x1, perm):
    return sum(float(((x0[i] - x1[j]) ** 2).sum()) for i, j in enumerate(perm))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", range(4))
def test_ot_permutation_is_brute_force_optimum(n, seed):
    x0, x1 = _batch(n=n, shape=(3,), seed=100 * n + seed)
    perm = ot_permutation(x0, x1).tolist()
    assert sorted(perm) == list(range(n))  # a permutation: every noise sample used exactly once
    best = min(_cost(x0, x1, p) for p in itertools.permutations(range(n)))
    assert _cost(x0, x1, perm) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_otcfm_pairs_by_permutation_never_with_replacement():
    # clustered data: a sampler with replacement would reuse the closest noise samples
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 8, generator=g) * 0.05 + 3.0
    x1 = torch.randn(64, 8, generator=g)
    _, x1p = OTCFM().pair(x0, x1)
    rows_used = {tuple(r.tolist()) for r in x1p}
    assert len(rows_used) == 64
    assert torch.equal(torch.sort(x1p, dim=0).values, torch.sort(x1, dim=0).values)
    # and the pairing lowers the transport cost below the independent coupling
    assert ((x0 - x1p) ** 2).sum() < ((x0 - x1) ** 2).sum()


def test_otcfm_target_uses_paired_noise():
    x0, x1 = _batch(n=8, shape=(5,))
    perm = ot_permutation(x0, x1)
    x_t, u_t = OTCFM().sample(x0, x1, 0.3)
    torch.testing.assert_close(u_t, x1[perm] - x0)
    torch.testing.assert_close(x_t, 0.7 * x0 + 0.3 * x1[perm])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ot_cost_matrix_is_squared_distance(dtype):
    x0, x1 = _batch(n=7, shape=(2, 3, 3), dtype=dtype)
    cost = ot_cost_matrix(x0, x1)
    expect = ((x0.reshape(7, 1, -1) - x1.reshape(1, 7, -1)) ** 2).sum(-1)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(cost, expect, atol=tol, rtol=tol)


def test_ot_permutation_images_and_float32():
    x0, x1 = _batch(n=16, shape=(1, 8, 8), dtype=torch.float32)
    perm = ot_permutation(x0, x1)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(16))


def test_get_path_and_config_roundtrip():
    for p in [GVP(), ICFM(0.1), OTCFM(0.0)]:
        q = get_path(**p.config())
        assert type(q) is type(p) and q.config() == p.config()
    assert isinstance(get_path("OTCFM"), OTCFM)
    p = ICFM()
    assert get_path(p) is p
    assert set(paths.PATHS) == {"gvp", "icfm", "otcfm"}


def test_bad_inputs():
    x0, x1 = _batch()
    with pytest.raises(ValueError, match="same shape"):
        ICFM().sample(x0, x1[:, :2], 0.5)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        ICFM().sample(x0, x1, torch.rand(3))
    with pytest.raises(TypeError, match="t must be"):
        GVP().sample(x0, x1, "0.5")
    with pytest.raises(TypeError, match="x0 must be"):
        GVP().sample(x0.numpy(), x1, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        ICFM(sigma=-1.0)
    with pytest.raises(ValueError, match="path must be one of"):
        get_path("rectified")
    with pytest.raises(ValueError, match="sigma is not used by the GVP"):
        get_path("gvp", sigma=0.1)
    with pytest.raises(TypeError, match="floating"):
        ot_permutation(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
