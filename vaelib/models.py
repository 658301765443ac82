"""The variational autoencoder: a Gaussian encoder, a decoder, a standard normal prior.

.. math::

    p(z) = \\mathcal{N}(0, I), \\quad
    p_\\theta(x \\mid z) = \\text{Bernoulli or Gaussian}(\\text{decoder}_\\theta(z)), \\quad
    q_\\phi(z \\mid x) = \\mathcal{N}\\big(\\mu_\\phi(x), \\operatorname{diag} \\sigma^2_\\phi(x)\\big).

The distributions are built with ``validate_args=False``: their argument checks
read values back to the host, which would stall a GPU on every training step;
vaelib checks its inputs once, up front, instead.

Reference: Kingma and Welling (2013), "Auto-Encoding Variational Bayes", and
Kingma and Welling (2019), "An Introduction to Variational Autoencoders".
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from vaelib._checks import LIKELIHOODS, check_choice, check_positive_int
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights

__all__ = ["VAE", "MLPConfig"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}

# Smallest standard deviation of a Gaussian decoder: keeps log p(x | z) finite
# on pixels that are constant in the data (the border of the digits).
MIN_DECODER_SCALE = 1e-3


@dataclass(frozen=True)
class MLPConfig:
    """Architecture of a fully connected VAE; enough to rebuild it from a file."""

    x_dim: int
    z_dim: int
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        check_positive_int(self.x_dim, "x_dim")
        check_positive_int(self.z_dim, "z_dim")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for h in self.hidden:
            check_positive_int(h, "hidden")
        check_choice(self.activation, "activation", tuple(ACTIVATIONS))
        check_choice(self.likelihood, "likelihood", LIKELIHOODS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """A VAE built from any encoder and decoder networks.

    Parameters
    ----------
    encoder : nn.Module
        Maps ``x`` of shape ``(..., x_dim)`` to ``(..., 2 * z_dim)``: the mean and
        the pre-softplus standard deviation of :math:`q_\\phi(z \\mid x)`.
    decoder : nn.Module
        Maps ``z`` of shape ``(..., z_dim)`` to ``(..., x_dim)`` logits for a
        Bernoulli likelihood, or ``(..., 2 * x_dim)`` (mean, pre-softplus
        standard deviation) for a Gaussian one.
    x_dim, z_dim : int
        Data and latent dimensions.
    likelihood : {"bernoulli", "gaussian"}
        Family of :math:`p_\\theta(x \\mid z)`.

    Notes
    -----
    Use :meth:`VAE.mlp` for the fully connected networks of the book; pass your
    own modules for anything else (convolutions, other data).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        x_dim: int,
        z_dim: int,
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.x_dim = check_positive_int(x_dim, "x_dim")
        self.z_dim = check_positive_int(z_dim, "z_dim")
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.config: MLPConfig | None = None
        # A buffer, so the prior follows the model's device and dtype.
        self.register_buffer("_prior_loc", torch.zeros(z_dim))

    @classmethod
    def mlp(
        cls,
        x_dim: int,
        z_dim: int,
        hidden: tuple[int, ...] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
    ) -> VAE:
        """Fully connected encoder and decoder with the same hidden sizes.

        ``VAE.mlp(784, 50, hidden=(200, 200))`` is the one-stochastic-layer
        architecture of Burda et al. (2015).
        """
        config = MLPConfig(x_dim, z_dim, tuple(hidden), activation, likelihood)
        out = x_dim if likelihood == "bernoulli" else 2 * x_dim
        encoder = _mlp([x_dim, *config.hidden, 2 * z_dim], activation)
        decoder = _mlp([z_dim, *reversed(config.hidden), out], activation)
        model = cls(encoder, decoder, x_dim=x_dim, z_dim=z_dim, likelihood=likelihood)
        model.config = config
        return model

    # -- the three distributions ----------------------------------------------------

    @property
    def prior(self) -> Independent:
        """:math:`p(z) = \\mathcal{N}(0, I)`, event shape ``(z_dim,)``."""
        loc = self._prior_loc
        return Independent(Normal(loc, torch.ones_like(loc), validate_args=False), 1, validate_args=False)

    def encode(self, x: Tensor) -> Independent:
        """:math:`q_\\phi(z \\mid x)`, a diagonal Gaussian with batch shape ``x.shape[:-1]``."""
        h = self.encoder(x)  # (..., 2 * z_dim)
        loc, raw_scale = h.chunk(2, dim=-1)  # (..., z_dim) each
        scale = nn.functional.softplus(raw_scale) + 1e-6
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)

    def decode(self, z: Tensor) -> Independent:
        """:math:`p_\\theta(x \\mid z)`, batch shape ``z.shape[:-1]``, event shape ``(x_dim,)``.

        The Bernoulli is built with ``validate_args=False`` so that grey values in
        [0, 1] score as a cross-entropy; binarize data for a true likelihood.
        """
        h = self.decoder(z)
        if self.likelihood == "bernoulli":
            return Independent(Bernoulli(logits=h, validate_args=False), 1, validate_args=False)
        loc, raw_scale = h.chunk(2, dim=-1)
        scale = nn.functional.softplus(raw_scale) + MIN_DECODER_SCALE
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)

    # -- bounds ---------------------------------------------------------------------

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """:math:`\\log p(z) + \\log p_\\theta(x \\mid z)`; ``z`` (k, batch, z_dim) gives (k, batch)."""
        return self.prior.log_prob(z) + self.decode(z).log_prob(x)

    def log_weights(self, x: Tensor, k: int = 1) -> Tensor:
        """Log importance weights :math:`\\log p(x, z_i) - \\log q(z_i \\mid x)`, shape (k, batch)."""
        return log_weights(x, self.encode(x), self.log_joint, k)

    def elbo(self, x: Tensor, k: int = 1, analytic_kl: bool = False) -> Tensor:
        """Monte Carlo ELBO averaged over ``k`` samples, shape (batch,).

        With ``analytic_kl=True`` the KL to the prior is computed in closed form
        (Kingma and Welling 2013, appendix B) and only the reconstruction term
        is sampled:

        .. math::

            \\mathcal{L}(x) \\approx \\frac{1}{k}\\sum_{i=1}^k \\log p_\\theta(x \\mid z_i)
            - \\mathrm{KL}\\big(q_\\phi(z \\mid x) \\,\\|\\, p(z)\\big).
        """
        check_positive_int(k, "k")
        self._check_dtype(x)
        if not analytic_kl:
            return elbo_from_log_weights(self.log_weights(x, k))
        q = self.encode(x)
        z = q.rsample((k,))  # (k, batch, z_dim)
        reconstruction = self.decode(z).log_prob(x).mean(dim=0)  # (batch,)
        return reconstruction - kl_divergence(q, self.prior)

    def iwae(self, x: Tensor, k: int = 5) -> Tensor:
        """Importance weighted bound with ``k`` samples, shape (batch,)."""
        check_positive_int(k, "k")
        self._check_dtype(x)
        return iwae_from_log_weights(self.log_weights(x, k))

    def _dtype(self) -> torch.dtype:
        """The dtype of the networks' parameters (of the prior's buffer for networks without any)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), self._prior_loc.dtype)

    def _check_dtype(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        dtype = self._dtype()
        if x.dtype != dtype:
            raise TypeError(f"x: expected {dtype} data (the model's dtype), got {x.dtype}; convert with x.to({dtype})")

    # -- generation -----------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True) -> Tensor:
        """Draw ``n`` images: ``z ~ p(z)``, then the decoder's mean (or a sample), (n, x_dim)."""
        check_positive_int(n, "n")
        z = self.prior.sample((n,))  # (n, z_dim)
        px = self.decode(z)
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the encoder mean: :math:`\\mathbb{E}[x \\mid z = \\mu_\\phi(x)]`, (batch, x_dim)."""
        return self.decode(self.encode(x).mean).mean
