"""Shared fixtures: small velocity networks with the project's call signature model(t, x)."""
import pytest
import torch


class MLPVelocity(torch.nn.Module):
    """v(t, x) for x of shape (B, D): an MLP on [x, t]. Small, smooth, with time dependence."""

    def __init__(self, dim: int = 6, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden),
            torch.nn.Tanh(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, t, x):
        flat = x.reshape(x.shape[0], -1)
        return self.net(torch.cat([flat, t[:, None].to(flat.dtype)], dim=1)).reshape(x.shape)


class ConvVelocity(torch.nn.Module):
    """v(t, x) for images (B, C, H, W): two convolutions with a time shift."""

    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.c1 = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        self.temb = torch.nn.Linear(1, hidden)

    def forward(self, t, x):
        h = self.c1(x) + self.temb(t[:, None].to(x.dtype))[:, :, None, None]
        return self.c2(torch.nn.functional.silu(h))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mlp():
    return MLPVelocity


@pytest.fixture
def conv():
    return ConvVelocity


@pytest.fixture(scope="session")
def tiny_flow_checkpoint(tmp_path_factory):
    """A tiny OT-CFM pretraining run on digits (40 steps, one thread), made once per session for
    the tests of the related systems."""
    from prg_fast.training.pretrain import PretrainConfig, pretrain

    out = str(tmp_path_factory.getbasetemp() / "related_pretrain")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(PretrainConfig(data="digits", path="otcfm", model="tiny", steps=40, batch_size=32, lr=1e-3, warmup=0,
                                log_every=10, ckpt_every=40, num_samples=4, sample_steps=2, progress=False,
                                device="cpu", out=out))
    finally:
        torch.set_num_threads(n)
    return out
