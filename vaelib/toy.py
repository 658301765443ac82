"""The linear-Gaussian latent variable model, where every quantity is exact.

.. math::

    z \\sim \\mathcal{N}(0, I_{d_z}), \\qquad
    x \\mid z \\sim \\mathcal{N}(W z + b, \\sigma^2 I_{d_x}).

Its marginal and posterior are Gaussian in closed form (Bishop 2006,
section 2.3.3; Tipping and Bishop 1999, probabilistic PCA):

.. math::

    p(x) = \\mathcal{N}(x; b, W W^\\top + \\sigma^2 I), \\qquad
    p(z \\mid x) = \\mathcal{N}\\big(z; \\Sigma W^\\top (x - b) / \\sigma^2, \\Sigma\\big),
    \\quad \\Sigma = (I + W^\\top W / \\sigma^2)^{-1}.

The book uses it to check each derivation to float64 precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from vaelib._checks import check_positive_float, check_positive_int

__all__ = ["Bimodal", "LinearGaussian", "as_multivariate_normal"]


def as_multivariate_normal(q: Distribution) -> MultivariateNormal:
    """Express a Gaussian ``q`` over vectors as a :class:`MultivariateNormal`.

    Accepts a ``MultivariateNormal`` (returned as is) or a diagonal Gaussian
    ``Independent(Normal(loc, scale), 1)``, so that closed-form KL divergences
    between any two of them can be looked up by ``kl_divergence``.
    """
    if isinstance(q, MultivariateNormal):
        return q
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        if q.reinterpreted_batch_ndims != 1:
            raise ValueError("q: expected Independent(Normal, 1) over vectors")
        scale = q.base_dist.scale
        return MultivariateNormal(q.base_dist.loc, scale_tril=torch.diag_embed(scale))
    raise TypeError(
        f"q: expected a Gaussian over z (MultivariateNormal or Independent(Normal, 1)), got {type(q).__name__}"
    )


@dataclass
class LinearGaussian:
    """Linear-Gaussian model ``x = W z + b + noise`` with exact inference.

    Parameters
    ----------
    W : Tensor, shape (x_dim, z_dim)
        Loading matrix.
    b : Tensor, shape (x_dim,)
        Offset.
    noise_std : float
        Standard deviation :math:`\\sigma` of the isotropic observation noise.

    Examples
    --------
    >>> toy = LinearGaussian.random(x_dim=2, z_dim=1, noise_std=0.5, seed=0)
    >>> x, z = toy.sample(3)
    >>> toy.log_marginal(x).shape
    torch.Size([3])
    """

    W: Tensor
    b: Tensor
    noise_std: float

    def __post_init__(self) -> None:
        if self.W.dim() != 2:
            raise ValueError(f"W: expected shape (x_dim, z_dim), got {tuple(self.W.shape)}")
        if self.b.shape != (self.W.shape[0],):
            raise ValueError(f"b: expected shape ({self.W.shape[0]},), got {tuple(self.b.shape)}")
        check_positive_float(self.noise_std, "noise_std")

    @classmethod
    def random(
        cls,
        x_dim: int,
        z_dim: int,
        noise_std: float = 0.5,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> LinearGaussian:
        """A model with standard normal ``W`` and ``b`` drawn from ``seed``."""
        check_positive_int(x_dim, "x_dim")
        check_positive_int(z_dim, "z_dim")
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(x_dim, z_dim, generator=g, dtype=dtype)
        b = torch.randn(x_dim, generator=g, dtype=dtype)
        return cls(W=W, b=b, noise_std=float(noise_std))

    @property
    def x_dim(self) -> int:
        return self.W.shape[0]

    @property
    def z_dim(self) -> int:
        return self.W.shape[1]

    @property
    def prior(self) -> MultivariateNormal:
        """:math:`p(z) = \\mathcal{N}(0, I)`, event shape ``(z_dim,)``."""
        zeros = self.W.new_zeros(self.z_dim)
        return MultivariateNormal(zeros, scale_tril=torch.eye(self.z_dim, dtype=self.W.dtype))

    def likelihood(self, z: Tensor) -> Independent[Any]:
        """:math:`p(x \\mid z) = \\mathcal{N}(W z + b, \\sigma^2 I)`, event shape ``(x_dim,)``.

        ``z`` has shape ``(..., z_dim)``; the result has batch shape ``(...)``.
        """
        loc = z @ self.W.T + self.b  # (..., x_dim)
        return Independent(Normal(loc, self.noise_std), 1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """:math:`\\log p(x, z) = \\log p(z) + \\log p(x \\mid z)`, broadcast over leading dims."""
        out: Tensor = self.prior.log_prob(z) + self.likelihood(z).log_prob(x)
        return out

    def marginal(self) -> MultivariateNormal:
        """:math:`p(x) = \\mathcal{N}(b, W W^\\top + \\sigma^2 I)`."""
        cov = self.W @ self.W.T + self.noise_std**2 * torch.eye(self.x_dim, dtype=self.W.dtype)
        return MultivariateNormal(self.b, covariance_matrix=cov)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact :math:`\\log p(x)`; ``x`` of shape ``(batch, x_dim)`` gives ``(batch,)``."""
        out: Tensor = self.marginal().log_prob(x)
        return out

    def posterior(self, x: Tensor) -> MultivariateNormal:
        """Exact :math:`p(z \\mid x)`, batch shape ``(batch,)``, event shape ``(z_dim,)``."""
        precision = torch.eye(self.z_dim, dtype=self.W.dtype) + self.W.T @ self.W / self.noise_std**2
        cov = torch.linalg.inv(precision)  # (z_dim, z_dim)
        loc = (x - self.b) @ self.W @ cov / self.noise_std**2  # (batch, z_dim); cov is symmetric
        return MultivariateNormal(loc, covariance_matrix=cov.expand(*loc.shape[:-1], -1, -1))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` pairs from the joint: returns ``x`` (n, x_dim) and ``z`` (n, z_dim)."""
        check_positive_int(n, "n")
        dtype = self.W.dtype
        z = torch.randn(n, self.z_dim, generator=generator, dtype=dtype)
        noise = torch.randn(n, self.x_dim, generator=generator, dtype=dtype)
        x = z @ self.W.T + self.b + self.noise_std * noise
        return x, z

    def expected_log_likelihood(self, x: Tensor, q: Distribution) -> Tensor:
        """Closed form of :math:`\\mathbb{E}_{q(z)}[\\log p(x \\mid z)]` for Gaussian ``q``.

        With :math:`q = \\mathcal{N}(m, S)`,

        .. math::

            -\\frac{d_x}{2} \\log(2 \\pi \\sigma^2)
            - \\frac{\\lVert x - W m - b \\rVert^2 + \\operatorname{tr}(W S W^\\top)}{2 \\sigma^2}.
        """
        q = as_multivariate_normal(q)
        resid = x - q.mean @ self.W.T - self.b  # (batch, x_dim)
        trace = torch.einsum("ij,...jk,ik->...", self.W, q.covariance_matrix, self.W)  # (batch,)
        var = self.noise_std**2
        const = -0.5 * self.x_dim * math.log(2 * math.pi * var)
        return const - 0.5 * ((resid**2).sum(-1) + trace) / var

    def elbo(self, x: Tensor, q: Distribution) -> Tensor:
        """Exact ELBO for a Gaussian ``q``: reconstruction minus KL to the prior.

        .. math::

            \\mathcal{L}(q) = \\mathbb{E}_q[\\log p(x \\mid z)] - \\mathrm{KL}(q \\,\\|\\, p(z)).

        Returns
        -------
        Tensor, shape (batch,)
        """
        q = as_multivariate_normal(q)
        return self.expected_log_likelihood(x, q) - kl_divergence(q, self.prior)


# The non-Gaussian exact model lives in its own module; the book reaches it as vaelib.toy.Bimodal too.
from vaelib.bimodal import Bimodal  # noqa: E402
