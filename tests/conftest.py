"""Shared fixtures: every test starts from a fixed seed; exact checks use float64."""

from __future__ import annotations

import random

import matplotlib
import pytest
import torch

import vaelib

# Figures drawn by the tests themselves go nowhere. Only this process: the kernels and
# subprocesses the tests start keep the environment's backend (inline in a kernel).
matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed every generator so each test is repeatable on its own."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tests' models are small: they run fastest on one thread, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy() -> vaelib.LinearGaussian:
    """A linear-Gaussian model with a 3-d observation and a 2-d latent, in float64."""
    return vaelib.LinearGaussian.random(x_dim=3, z_dim=2, noise_std=0.5, seed=1)


@pytest.fixture
def toy_data(toy: vaelib.LinearGaussian) -> torch.Tensor:
    """Five observations drawn from ``toy``."""
    x, _ = toy.sample(5, generator=torch.Generator().manual_seed(2))
    return x


def gaussian_q(batch: int, z_dim: int, *, seed: int, dtype: torch.dtype = torch.float64):
    """A random diagonal Gaussian with batch shape (batch,) and event shape (z_dim,)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, z_dim, generator=g, dtype=dtype)
    scale = 0.3 + torch.rand(batch, z_dim, generator=g, dtype=dtype)
    return torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)


def within_standard_errors(samples: torch.Tensor, target: torch.Tensor, n_se: float = 4.0) -> bool:
    """True if the mean of ``samples`` (leading dimension) is within ``n_se`` standard errors of ``target``."""
    n = samples.shape[0]
    se = samples.std(dim=0) / n**0.5
    return bool(((samples.mean(dim=0) - target).abs() <= n_se * se).all())


@pytest.fixture(scope="module")
def gap_setup():
    """A 2-d linear-Gaussian toy, one observation, and its gap frames over 3 shifts x 3 widths of q."""
    from vaelib.book.synthesis import gap_frames

    toy = vaelib.LinearGaussian.random(x_dim=2, z_dim=1, noise_std=0.5, seed=0, dtype=torch.float64)
    x, _ = toy.sample(1, generator=torch.Generator().manual_seed(1))
    shifts = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    widths = torch.tensor([0.8, 1.0, 2.0], dtype=torch.float64)
    frames = gap_frames(toy, x, shifts, widths, ks=(4, 64), draws=20_000, seed=0)
    return toy, x, frames
