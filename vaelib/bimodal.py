"""An exact latent variable model whose posterior is bimodal.

.. math::

    z \\sim \\mathcal{N}(0, 1), \\qquad
    x \\mid z \\sim \\mathcal{N}(z^2, \\sigma^2).

The likelihood sees only :math:`z^2`, so :math:`z` and :math:`-z` explain
``x`` equally well: the posterior is symmetric and, for
:math:`x > \\sigma^2 / 2`, has two modes at
:math:`z = \\pm \\sqrt{x - \\sigma^2 / 2}`. No Gaussian ``q`` can match it, which
is what makes the model instructive: the ELBO's optimum sits on one mode
(the reverse KL is mode-seeking) while the Gaussian minimizing
:math:`\\mathrm{KL}(p(z \\mid x) \\,\\|\\, q)` matches the posterior's moments and
spans both (Bishop 2006, sections 10.1.2 and 10.7).

The latent is one-dimensional, so the evidence and every divergence are
integrals over a line, computed by the trapezoid rule on a fine uniform grid.
The integrands are smooth and decay faster than a Gaussian, so the rule
converges geometrically in the grid spacing (Trefethen and Weideman 2014);
the default grid gives :math:`\\log p(x)` to about :math:`10^{-12}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence

from vaelib._checks import check_positive_float, check_positive_int

__all__ = ["Bimodal"]


def _check_x(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (batch, 1), got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected shape (batch, 1) with batch >= 1, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: expected finite values, got NaN or infinite entries")
    return x


def _loc_scale(q: object) -> tuple[Tensor, Tensor]:
    """The mean and standard deviation, each (batch,), of a Gaussian ``q`` over a 1-d ``z``."""
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal) and q.event_shape == (1,):
        return q.base_dist.loc[..., 0], q.base_dist.scale[..., 0]
    if isinstance(q, MultivariateNormal) and q.event_shape == (1,):
        return q.loc[..., 0], q.covariance_matrix[..., 0, 0].sqrt()
    raise TypeError(
        "q: expected a Gaussian over z with event shape (1,) (Independent(Normal, 1) or "
        f"MultivariateNormal), got {type(q).__name__}"
    )


@dataclass
class Bimodal:
    """The model :math:`z \\sim \\mathcal{N}(0, 1)`, :math:`x \\mid z \\sim \\mathcal{N}(z^2, \\sigma^2)`.

    Shapes follow :class:`~vaelib.toy.LinearGaussian` with ``x_dim = z_dim = 1``:
    ``x`` is ``(batch, 1)``, ``z`` is ``(..., batch, 1)``, and ``q`` is a
    Gaussian with batch shape ``(batch,)`` and event shape ``(1,)``
    (see :meth:`gaussian`). Everything is float64.

    Parameters
    ----------
    noise_std : float
        Standard deviation :math:`\\sigma` of the observation noise.
    grid_size : int
        Number of trapezoid-rule nodes for the integrals over ``z``.

    Examples
    --------
    >>> model = Bimodal(noise_std=0.5)
    >>> x = torch.tensor([[2.0]], dtype=torch.float64)
    >>> q = model.gaussian(1.3, 0.2)
    >>> bool(model.elbo(x, q) < model.log_marginal(x))
    True
    """

    noise_std: float = 0.5
    grid_size: int = 8001

    x_dim = 1
    z_dim = 1

    def __post_init__(self) -> None:
        self.noise_std = check_positive_float(self.noise_std, "noise_std")
        self.grid_size = check_positive_int(self.grid_size, "grid_size")
        if self.grid_size < 101:
            raise ValueError(f"grid_size: expected at least 101 nodes, got {self.grid_size}")

    @staticmethod
    def gaussian(loc: Tensor | float, scale: Tensor | float) -> Independent[Any]:
        """:math:`q(z) = \\mathcal{N}(m, s^2)` with batch shape ``loc.shape`` and event shape ``(1,)``."""
        loc = torch.as_tensor(loc, dtype=torch.float64)
        scale = torch.as_tensor(scale, dtype=torch.float64)
        if not bool((scale > 0).all()):
            raise ValueError(f"scale: expected positive values, got {scale}")
        return Independent(Normal(loc[..., None], scale[..., None]), 1)

    @property
    def prior(self) -> Independent[Any]:
        """:math:`p(z) = \\mathcal{N}(0, 1)`, event shape ``(1,)``."""
        zeros = torch.zeros(1, dtype=torch.float64)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def likelihood(self, z: Tensor) -> Independent[Any]:
        """:math:`p(x \\mid z) = \\mathcal{N}(z^2, \\sigma^2)`; ``z`` (..., 1) gives batch shape ``(...)``."""
        return Independent(Normal(z**2, self.noise_std), 1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """:math:`\\log p(z) + \\log p(x \\mid z)`; ``z`` (..., batch, 1) and ``x`` (batch, 1) give (..., batch)."""
        out: Tensor = self.prior.log_prob(z) + self.likelihood(z).log_prob(x)
        return out

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` pairs from the joint: returns ``x`` (n, 1) and ``z`` (n, 1)."""
        check_positive_int(n, "n")
        z = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        return z**2 + self.noise_std * noise, z

    # -- quadrature -----------------------------------------------------------------

    def _grid(self, x: Tensor, *extents: float) -> tuple[Tensor, float]:
        """Nodes (grid, 1, 1) covering the posterior of every ``x`` and each given half-width."""
        half = math.sqrt(max(float(x.max()), 0.0)) + 8.0 + 4.0 * self.noise_std
        half = max(half, *extents) if extents else half
        z = torch.linspace(-half, half, self.grid_size, dtype=torch.float64)
        return z.reshape(-1, 1, 1), 2 * half / (self.grid_size - 1)

    def _q_extent(self, q: Distribution) -> float:
        loc, scale = _loc_scale(q)
        return float((loc.abs() + 12 * scale).max().detach())  # the grid is not differentiated

    def log_marginal(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x) = \\log \\int \\mathcal{N}(z; 0, 1)\\, \\mathcal{N}(x; z^2, \\sigma^2)\\, dz`.

        By the trapezoid rule in log space (the integrand vanishes at the ends).

        Returns
        -------
        Tensor, shape (batch,)
        """
        _check_x(x)
        z, dz = self._grid(x)
        return torch.logsumexp(self.log_joint(x, z), dim=0) + math.log(dz)  # (grid, batch) -> (batch,)

    def posterior_log_density(self, x: Tensor, z_grid: Tensor) -> Tensor:
        """:math:`\\log p(z \\mid x) = \\log p(x, z) - \\log p(x)` at the points ``z_grid`` (n,).

        Returns
        -------
        Tensor, shape (n, batch)
        """
        _check_x(x)
        if not isinstance(z_grid, Tensor) or z_grid.dim() != 1:
            raise ValueError(f"z_grid: expected a 1-d tensor of points, got {getattr(z_grid, 'shape', z_grid)}")
        z = z_grid.to(torch.float64).reshape(-1, 1, 1)  # (n, 1, 1)
        return self.log_joint(x, z) - self.log_marginal(x)

    def _posterior_on_grid(self, x: Tensor, *extents: float) -> tuple[Tensor, Tensor, float]:
        z, dz = self._grid(x, *extents)
        log_post = self.log_joint(x, z) - self.log_marginal(x)  # (grid, batch)
        return z, log_post, dz

    def posterior_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior mean :math:`\\mathbb{E}[z \\mid x]` and variance, each (batch,), by quadrature."""
        _check_x(x)
        z, log_post, dz = self._posterior_on_grid(x)
        p = log_post.exp() * dz  # (grid, batch)
        z = z[:, :, 0]  # (grid, 1)
        mean = (p * z).sum(0)
        return mean, (p * (z - mean) ** 2).sum(0)

    def moment_matched(self, x: Tensor) -> Independent[Any]:
        """The Gaussian minimizing :math:`\\mathrm{KL}(p(z \\mid x) \\,\\|\\, q)`: the posterior's mean and variance.

        For an exponential family :math:`q`, the stationarity condition of the
        forward KL is :math:`\\mathbb{E}_q[T(z)] = \\mathbb{E}_{p(z \\mid x)}[T(z)]`
        (Bishop 2006, section 10.7; Minka 2001).
        """
        mean, var = self.posterior_moments(x)
        return self.gaussian(mean, var.sqrt())

    # -- the ELBO and divergences of a Gaussian q -----------------------------------

    def elbo(self, x: Tensor, q: Distribution) -> Tensor:
        """Closed-form ELBO of :math:`q = \\mathcal{N}(m, s^2)`.

        With :math:`\\mathbb{E}_q[z^2] = m^2 + s^2` and
        :math:`\\mathbb{E}_q[z^4] = m^4 + 6 m^2 s^2 + 3 s^4`,

        .. math::

            \\mathcal{L}(q) = -\\tfrac12 \\log(2 \\pi \\sigma^2)
            - \\frac{x^2 - 2 x\\, \\mathbb{E}_q[z^2] + \\mathbb{E}_q[z^4]}{2 \\sigma^2}
            - \\mathrm{KL}(q \\,\\|\\, \\mathcal{N}(0, 1)).

        Returns
        -------
        Tensor, shape (batch,)
        """
        _check_x(x)
        m, s = _loc_scale(q)
        ez2 = m**2 + s**2
        ez4 = m**4 + 6 * m**2 * s**2 + 3 * s**4
        var = self.noise_std**2
        x = x[:, 0]
        recon = -0.5 * math.log(2 * math.pi * var) - (x**2 - 2 * x * ez2 + ez4) / (2 * var)
        return recon - kl_divergence(self.gaussian(m, s), self.prior)

    def elbo_quadrature(self, x: Tensor, q: Distribution) -> Tensor:
        """:math:`\\int q(z) \\,[\\log p(x, z) - \\log q(z)]\\, dz` by the trapezoid rule, shape (batch,)."""
        _check_x(x)
        z, dz = self._grid(x, self._q_extent(q))
        log_q = q.log_prob(z)  # (grid, batch)
        return (log_q.exp() * (self.log_joint(x, z) - log_q)).sum(0) * dz

    def kl_to_posterior(self, x: Tensor, q: Distribution) -> Tensor:
        """:math:`\\mathrm{KL}(q \\,\\|\\, p(z \\mid x)) = \\int q \\log(q / p(z \\mid x))\\, dz`, shape (batch,).

        The gap of the ELBO: :math:`\\log p(x) = \\mathcal{L}(q) + \\mathrm{KL}(q \\,\\|\\, p(z \\mid x))`.
        """
        _check_x(x)
        z, log_post, dz = self._posterior_on_grid(x, self._q_extent(q))
        log_q = q.log_prob(z)  # (grid, batch)
        return (log_q.exp() * (log_q - log_post)).sum(0) * dz

    def kl_from_posterior(self, x: Tensor, q: Distribution) -> Tensor:
        """:math:`\\mathrm{KL}(p(z \\mid x) \\,\\|\\, q) = \\int p(z \\mid x) \\log(p(z \\mid x) / q(z))\\, dz`.

        Returns
        -------
        Tensor, shape (batch,)
        """
        _check_x(x)
        z, log_post, dz = self._posterior_on_grid(x, self._q_extent(q))
        return (log_post.exp() * (log_post - q.log_prob(z))).sum(0) * dz

    def chi_square(self, x: Tensor, q: Distribution) -> Tensor:
        """:math:`\\chi^2(p(z \\mid x) \\,\\|\\, q) = \\int p(z \\mid x)^2 / q(z)\\, dz - 1`, shape (batch,).

        It is the relative variance of the importance weight
        :math:`w = p(x, z) / q(z)`, :math:`z \\sim q`:
        :math:`\\mathrm{Var}_q[w] / p(x)^2` (Agapiou et al. 2017).
        The integrand peaks near :math:`z^2 \\approx x + \\sigma^2 / (4 s^2)`, so the
        grid is widened to reach it.
        """
        _check_x(x)
        _, s = _loc_scale(q)
        reach = math.sqrt(max(float(x.max()), 0.0) + self.noise_std**2 / (4 * float(s.min()) ** 2)) + 4.0
        z, log_post, dz = self._posterior_on_grid(x, self._q_extent(q), reach)
        log_ratio = 2 * log_post - q.log_prob(z)  # (grid, batch)
        return torch.expm1(torch.logsumexp(log_ratio, dim=0) + math.log(dz))
