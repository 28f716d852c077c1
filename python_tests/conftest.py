"""Shared fixtures: small velocity networks with the project's call signature model(t, x)
(gradient_checks.py holds them), one intra-op thread for the modules that ask for it, "auto"
keeping every graph (everything_fits), a free localhost port for 2-process tests, and the tiny
pretraining runs the training tests start from (made once per session)."""
import socket

import pytest
import torch

from cuda_selection import QUICK_MARK, quick_items
from gradient_checks import ConvVelocity, MLPVelocity


def pytest_collection_modifyitems(config, items):
    """Mark the quick CUDA subset (python_tests/cuda_selection.py says which and why)."""
    for item in quick_items(items):
        item.add_marker(QUICK_MARK)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mlp():
    return MLPVelocity


@pytest.fixture
def conv():
    return ConvVelocity


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny networks: on the shared 2-core machine a second
    thread makes every small op wait for a descheduled neighbour. Not global, so the CPU kernel's
    multi-threaded path stays tested elsewhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def everything_fits(monkeypatch):
    """memory_budget="auto" keeps every graph (the tail covers the whole solve), whatever the
    machine has free: PRG_FAST_FREE_MEMORY_BYTES set to a petabyte."""
    from prg_fast.ode import free_memory

    monkeypatch.setenv(free_memory.FREE_MEMORY_ENV, str(10**15))


@pytest.fixture
def free_port():
    """A free TCP port on localhost (MASTER_PORT of a 2-process gloo test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny OTCFM pretraining run on digits (60 steps, one thread), made once per session for the
    finetuning and evaluation tests."""
    from prg_fast.training.pretrain import pretrain

    out = tmp_path_factory.getbasetemp() / "prg_tiny_pretrain"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(data="digits", path="otcfm", model="tiny", steps=60, batch_size=64, warmup=10, lr=1e-3,
                 out=str(out), progress=False, num_samples=4, sample_steps=2, log_every=20, ckpt_every=60)
    finally:
        torch.set_num_threads(n)
    return str(out)


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
