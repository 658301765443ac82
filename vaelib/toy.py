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

The book uses it to check each derivation to float64 precision, and
:func:`linear_gaussian_vae` turns it into a :class:`~vaelib.models.VAE` whose encoder is its
exact posterior (or a poorer one), so that a VAE's bounds can be checked against exact values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from vaelib._checks import check_positive_float, check_positive_int
from vaelib.models import MIN_DECODER_SCALE, MIN_ENCODER_SCALE, VAE

__all__ = ["LinearGaussian", "as_multivariate_normal", "linear_gaussian_vae"]


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


def linear_gaussian_vae(
    toy: LinearGaussian,
    *,
    mean_factor: float = 1.0,
    scale_factor: float = 1.0,
) -> VAE:
    """A float64 :class:`~vaelib.models.VAE` whose generative model is ``toy`` and whose encoder is its exact posterior.

    The decoder is one linear layer, ``z -> (W z + b, s)`` with a constant raw
    scale :math:`s = \\operatorname{softplus}^{-1}(\\sigma - \\sigma_{\\min})`,
    :math:`\\sigma_{\\min}` = ``MIN_DECODER_SCALE``, so that
    :math:`p_\\theta(x \\mid z) = \\mathcal{N}(W z + b, \\sigma^2 I)` exactly.
    The encoder is one linear layer holding the posterior's mean map and the
    raw form of its standard deviations (offset by ``MIN_ENCODER_SCALE``):

    .. math::

        q_\\phi(z \\mid x) = \\mathcal{N}\\big(a\\, \\Sigma W^\\top (x - b) / \\sigma^2,\\ c^2 \\Sigma\\big),
        \\qquad \\Sigma = (I + W^\\top W / \\sigma^2)^{-1},

    with ``a = mean_factor`` and ``c = scale_factor``. The defaults
    ``a = c = 1`` give :math:`q_\\phi(z \\mid x) = p_\\theta(z \\mid x)`, so every
    importance weight equals :math:`p_\\theta(x)` and the ELBO is tight; other
    values give a poorer encoder (a shrunk mean, a wider or narrower scale)
    whose ELBO ``toy.elbo(x, vae.encode(x))`` has a closed form.

    Parameters
    ----------
    toy : LinearGaussian
        The generative model :math:`x = W z + b + \\varepsilon`,
        :math:`\\varepsilon \\sim \\mathcal{N}(0, \\sigma^2 I)`.
    mean_factor : float
        Multiplies the posterior mean (finite).
    scale_factor : float
        Multiplies the posterior standard deviations (positive).

    Returns
    -------
    VAE
        Gaussian likelihood, ``x_dim = toy.x_dim``, ``z_dim = toy.z_dim``, float64.

    Raises
    ------
    ValueError
        If :math:`\\Sigma` is not diagonal: the encoder's Gaussian is diagonal, so
        only models with ``z_dim == 1`` or with orthogonal columns of ``W`` are
        supported. Also if :math:`\\sigma` is not above ``MIN_DECODER_SCALE`` or
        a scaled posterior standard deviation not above ``MIN_ENCODER_SCALE``.
    TypeError
        If ``toy`` is not a :class:`LinearGaussian`.

    References
    ----------
    Bishop (2006), *Pattern Recognition and Machine Learning*, section 2.3.3 (the posterior);
    Tipping and Bishop (1999), probabilistic PCA.
    """
    if not isinstance(toy, LinearGaussian):
        raise TypeError(f"toy: expected a vaelib.LinearGaussian, got {type(toy).__name__}")
    for name, value in (("mean_factor", mean_factor), ("scale_factor", scale_factor)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if scale_factor <= 0:
        raise ValueError(f"scale_factor: expected a positive number, got {scale_factor!r}")
    if toy.noise_std <= MIN_DECODER_SCALE:
        raise ValueError(f"toy: noise_std must exceed MIN_DECODER_SCALE = {MIN_DECODER_SCALE}, got {toy.noise_std}")
    W = toy.W.detach().to(torch.float64)  # (x_dim, z_dim)
    b = toy.b.detach().to(torch.float64)  # (x_dim,)
    x_dim, z_dim = W.shape
    var = toy.noise_std**2
    precision = torch.eye(z_dim, dtype=torch.float64) + W.T @ W / var  # (z_dim, z_dim)
    off_diagonal = precision - torch.diag(precision.diagonal())
    if bool(off_diagonal.abs().max() > 1e-12 * precision.diagonal().max()):
        raise ValueError(
            f"toy: the exact posterior covariance (I + W^T W / sigma^2)^-1 is not diagonal (z_dim = {z_dim} "
            "and W's columns are not orthogonal); a diagonal Gaussian encoder can hold it only when "
            "z_dim == 1 or W has orthogonal columns"
        )
    post_var = 1.0 / precision.diagonal()  # (z_dim,): the diagonal of Sigma
    q_scale = scale_factor * post_var.sqrt()  # (z_dim,)
    if bool((q_scale <= MIN_ENCODER_SCALE).any()):
        raise ValueError(
            f"scale_factor: the encoder's scales {q_scale.tolist()} must exceed MIN_ENCODER_SCALE = {MIN_ENCODER_SCALE}"
        )
    gain = mean_factor * post_var[:, None] * W.T / var  # (z_dim, x_dim): q's mean is gain (x - b)

    def inverse_softplus(y: Tensor) -> Tensor:  # log(e^y - 1), stable for large y
        return y + torch.log(-torch.expm1(-y))

    encoder = nn.Linear(x_dim, 2 * z_dim, dtype=torch.float64)
    decoder = nn.Linear(z_dim, 2 * x_dim, dtype=torch.float64)
    with torch.no_grad():
        decoder.weight.zero_()
        decoder.weight[:x_dim] = W
        decoder.bias[:x_dim] = b
        decoder.bias[x_dim:] = inverse_softplus(torch.tensor(toy.noise_std - MIN_DECODER_SCALE, dtype=torch.float64))
        encoder.weight.zero_()
        encoder.weight[:z_dim] = gain
        encoder.bias[:z_dim] = -(gain @ b)
        encoder.bias[z_dim:] = inverse_softplus(q_scale - MIN_ENCODER_SCALE)
    return VAE(encoder, decoder, x_dim=x_dim, z_dim=z_dim, likelihood="gaussian")
