"""Evaluating a trained VAE: importance-sampled log-likelihood and active units."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vaelib._checks import check_data, check_positive_float, check_positive_int
from vaelib._progress import progress_bar, progress_enabled
from vaelib.models import VAE

__all__ = ["active_units", "latent_activity", "log_likelihood"]

# Importance samples (k times data points) held in memory at once.
_SAMPLES_PER_PASS = {"cuda": 2**20}
_SAMPLES_PER_PASS_DEFAULT = 2**16


def _model_device_dtype(vae: VAE) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def log_likelihood(
    vae: VAE,
    x: Tensor,
    k: int = 5000,
    batch_size: int | None = None,
    *,
    progress: bool | None = None,
) -> Tensor:
    """Importance-sampled estimate of :math:`\\log p_\\theta(x)` with ``k`` samples.

    .. math::

        \\log \\hat p(x) = \\log \\frac{1}{k} \\sum_{i=1}^k
        \\frac{p_\\theta(x, z_i)}{q_\\phi(z_i \\mid x)}, \\qquad z_i \\sim q_\\phi(z \\mid x),

    the IWAE bound with large ``k`` (Burda et al. 2015, section 5.1). It is
    a stochastic lower bound that converges to :math:`\\log p(x)` as ``k`` grows.

    Work is split so memory stays bounded whatever ``k``: ``batch_size``
    data points at a time, and for each batch the ``k`` samples in chunks
    whose running ``logsumexp`` is merged with ``logaddexp``.

    Parameters
    ----------
    vae : VAE
    x : Tensor, shape (batch, x_dim)
        Data (binary for a true Bernoulli likelihood).
    k : int
        Importance samples per data point.
    batch_size : int, optional
        Data points per pass; by default chosen from the device.
    progress : bool, optional
        Show a progress bar (by default in terminals and live notebooks).

    Returns
    -------
    Tensor, shape (batch,)
        On the device and with the dtype of ``x``'s model.
    """
    k = check_positive_int(k, "k")
    x = check_data(x, "x", event_shape=vae.x_shape, likelihood=vae.likelihood)
    device, dtype = _model_device_dtype(vae)
    budget = _SAMPLES_PER_PASS.get(device.type, _SAMPLES_PER_PASS_DEFAULT)
    if batch_size is None:
        batch_size = max(1, min(x.shape[0], budget // min(k, budget)))
    batch_size = check_positive_int(batch_size, "batch_size")
    chunk = max(1, min(k, budget // batch_size))
    was_training = vae.training
    vae.eval()
    out = []
    bar = progress_bar(progress_enabled(progress), total=x.shape[0], desc=f"log p(x), k={k}", unit="x")
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device, dtype)  # (b, x_dim)
            q = vae.encode(xb)
            acc = torch.full((xb.shape[0],), -math.inf, device=device, dtype=dtype)
            for done in range(0, k, chunk):
                z = q.sample((min(chunk, k - done),))  # (c, b, z_dim)
                log_w = vae.log_joint(xb, z) - q.log_prob(z)  # (c, b)
                acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
            out.append(acc - math.log(k))
            if bar is not None:
                bar.update(xb.shape[0])
    finally:
        if bar is not None:
            bar.close()
        vae.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def latent_activity(vae: VAE, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Variance across the data of each latent's posterior mean, :math:`\\operatorname{Var}_x \\mathbb{E}_q[z_j]`.

    Returns
    -------
    Tensor, shape (z_dim,)

    References
    ----------
    Burda et al. (2015), section 5.2.
    """
    x = check_data(x, "x", event_shape=vae.x_shape, likelihood=vae.likelihood)
    device, dtype = _model_device_dtype(vae)
    means = torch.cat(
        [vae.encode(x[i : i + batch_size].to(device, dtype)).mean for i in range(0, x.shape[0], batch_size)]
    )  # (n, z_dim)
    return means.var(dim=0, unbiased=False)


def active_units(vae: VAE, x: Tensor, threshold: float = 1e-2) -> int:
    """Number of latent dimensions whose activity exceeds ``threshold`` (Burda et al. use 0.01)."""
    threshold = check_positive_float(threshold, "threshold")
    return int((latent_activity(vae, x) > threshold).sum())
