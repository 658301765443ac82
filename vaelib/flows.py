"""A normalizing-flow approximate posterior for the VAE, built on zuko.

The encoder's Gaussian is kept and a conditional neural spline flow is put
in front of it:

.. math::

    u \\sim \\mathcal{N}(0, I), \\qquad
    v = f_{h}(u), \\qquad
    z = \\mu_\\phi(x) + \\sigma_\\phi(x) \\odot v, \\qquad h = \\mathrm{encoder}_\\phi(x),

where :math:`f_h` is a stack of monotonic rational-quadratic spline
transforms whose knots are functions of the encoder's output :math:`h`
(Durkan et al. 2019), and the density follows by the change of variables,

.. math::

    \\log q_\\phi(z \\mid x) = \\log \\mathcal{N}(u; 0, I)
    - \\log \\left| \\det \\frac{\\partial f_h}{\\partial u} \\right|
    - \\sum_j \\log \\sigma_{\\phi, j}(x).

With :math:`f_h` the identity this is the Gaussian encoder of
:class:`~vaelib.models.VAE`, so the flow family contains the Gaussian one.

Each spline layer is autoregressive (a MADE network computes the knots of
coordinate :math:`j` from coordinates before it). The layers are used in their
inverse direction, as in an inverse autoregressive flow (Kingma et al. 2016):
drawing ``z`` is one network pass per layer and gives the density of the draws
at no extra cost (``encode(x)`` remembers it for ``log_prob`` of those draws);
``log_prob`` of any other ``z`` inverts the layers one coordinate at a time,
``z_dim`` passes per layer.

References
----------
Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows";
Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling (2016), "Improved
Variational Inference with Inverse Autoregressive Flow";
Durkan, Bekasov, Murray and Papamakarios (2019), "Neural Spline Flows";
Rozet et al., zuko (https://github.com/probabilists/zuko).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import zuko  # type: ignore[import-untyped]
from torch import Tensor, nn
from torch.distributions import AffineTransform, Distribution, Transform

from vaelib._checks import check_nonnegative_int, check_positive_float, check_positive_int
from vaelib._runtime.threads import compute_threads
from vaelib.bounds import elbo_from_log_weights
from vaelib.models import MIN_ENCODER_SCALE, VAE, Likelihood

__all__ = ["FlowVAE", "fit_flow_posterior"]


class _Affine(AffineTransform):
    """Torch's affine map whose shape is that of its input (its parameters carry the batch shape)."""

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return shape

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return shape


class _EncoderAffine(zuko.lazy.LazyTransform):  # type: ignore[misc]
    """The map :math:`z \\mapsto (z - \\mu) / \\sigma` of the encoder's Gaussian, as a function of ``h``."""

    def forward(self, h: Tensor | None = None) -> Transform:
        assert h is not None
        loc, raw_scale = h.chunk(2, dim=-1)  # (*batch, z_dim) each
        scale = nn.functional.softplus(raw_scale) + MIN_ENCODER_SCALE
        return _Affine(-loc / scale, 1 / scale, event_dim=1)


class _RememberingFlow(zuko.distributions.NormalizingFlow):  # type: ignore[misc]
    """A zuko ``NormalizingFlow`` that keeps the density of its last draws.

    ``rsample`` (and so ``sample``) computes each draw's log density in the same
    single pass; ``log_prob`` of that very tensor returns it instead of inverting
    the autoregressive layers one coordinate at a time. Any other tensor takes
    the exact inverse route.
    """

    _last: tuple[Tensor, Tensor] | None = None

    def rsample(self, shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        z: Tensor
        log_q: Tensor
        z, log_q = self.rsample_and_log_prob(torch.Size(shape))
        self._last = (z, log_q)
        return z

    def log_prob(self, z: Tensor) -> Tensor:
        if self._last is not None and z is self._last[0]:
            return self._last[1]
        out: Tensor = super().log_prob(z)
        return out


class FlowVAE(VAE):
    """A :class:`~vaelib.models.VAE` whose :math:`q_\\phi(z \\mid x)` is a normalizing flow.

    ``encode(x)`` returns a zuko ``NormalizingFlow`` with batch shape
    ``(batch,)`` and event shape ``(z_dim,)``: it has ``rsample``, ``log_prob``
    and ``rsample_and_log_prob``, so :func:`~vaelib.training.fit.fit` (``"elbo"``,
    ``"iwae"``), :func:`~vaelib.evaluate.log_likelihood` and
    ``vaelib.load(path, model=...)`` work unchanged. There is no closed-form
    KL to the prior: ``elbo(x, analytic_kl=True)`` raises ``ValueError``.

    Parameters
    ----------
    encoder, decoder, x_shape, x_dim, z_dim, likelihood
        As for :class:`~vaelib.models.VAE`; the encoder's output
        ``(batch, 2 * z_dim)`` gives the Gaussian and conditions the flow.
    transforms : int
        Number of spline layers (0 gives the Gaussian encoder back).
    hidden : tuple of int
        Hidden sizes of each layer's MADE network.
    bins : int
        Spline segments per coordinate.

    Examples
    --------
    >>> vae = FlowVAE.mlp(x_dim=64, z_dim=4, hidden=(64,), transforms=2)
    >>> vae.encode(torch.zeros(3, 64)).rsample((5,)).shape
    torch.Size([5, 3, 4])

    References
    ----------
    Durkan et al. (2019), "Neural Spline Flows"; Kingma et al. (2016), "Improved
    Variational Inference with Inverse Autoregressive Flow".
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        x_shape: tuple[int, ...] | None = None,
        x_dim: int | None = None,
        z_dim: int,
        likelihood: Likelihood = "bernoulli",
        transforms: int = 3,
        hidden: tuple[int, ...] = (64, 64),
        bins: int = 8,
    ) -> None:
        check_nonnegative_int(transforms, "transforms")
        check_positive_int(bins, "bins")
        hidden = tuple(hidden)
        for size in hidden:
            check_positive_int(size, "hidden")
        super().__init__(encoder, decoder, x_shape=x_shape, x_dim=x_dim, z_dim=z_dim, likelihood=likelihood)
        spline = zuko.flows.NSF(
            features=z_dim, context=2 * z_dim, transforms=max(transforms, 1), bins=bins, hidden_features=hidden
        )
        # Inverted, so that drawing z is the single-pass direction (inverse autoregressive flow).
        layers = [_EncoderAffine(), spline.transform.inv] if transforms else [_EncoderAffine()]
        self.flow = zuko.flows.Flow(layers, spline.base)
        self.transforms = transforms
        p = next(encoder.parameters(), None)
        if p is not None:
            self.flow.to(p.device, p.dtype)

    @classmethod
    def mlp(
        cls,
        x_dim: int,
        z_dim: int,
        hidden: tuple[int, ...] = (200, 200),
        activation: str = "tanh",
        likelihood: Likelihood = "bernoulli",
        *,
        transforms: int = 3,
        flow_hidden: tuple[int, ...] = (64, 64),
    ) -> FlowVAE:
        """The networks of :meth:`~vaelib.models.VAE.mlp` with a flow posterior of ``transforms`` layers."""
        base = VAE.mlp(x_dim, z_dim, hidden, activation, likelihood)  # type: ignore[arg-type]
        return cls(
            base.encoder,
            base.decoder,
            x_dim=x_dim,
            z_dim=z_dim,
            likelihood=likelihood,
            transforms=transforms,
            hidden=flow_hidden,
        )

    def encode(self, x: Tensor) -> Distribution:  # type: ignore[override]  # a flow, not a Gaussian
        """:math:`q_\\phi(z \\mid x)`, a zuko ``NormalizingFlow``, batch shape ``x.shape[:-len(x_shape)]``."""
        batch = x.shape[: x.dim() - len(self.x_shape)]
        h = self.encoder(x.reshape(-1, *self.x_shape))  # (N, 2 * z_dim)
        return self.posterior(h.reshape(*batch, 2 * self.z_dim))

    def posterior(self, h: Tensor) -> Distribution:
        """The flow for the encoder output (or any context) ``h`` of shape ``(*batch, 2 * z_dim)``."""
        q = self.flow(h)
        return _RememberingFlow(q.transform, q.base)

    def elbo(self, x: Tensor, k: int = 1, analytic_kl: bool = False) -> Tensor:
        """Monte Carlo ELBO averaged over ``k`` samples, shape (batch,); the KL of a flow has no closed form."""
        if analytic_kl:
            raise ValueError("analytic_kl: a flow posterior has no closed-form KL to the prior; use analytic_kl=False")
        return super().elbo(x, k)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at one draw of :math:`q_\\phi(z \\mid x)` (no closed-form mean), ``(batch, *x_shape)``."""
        return self.decode(self.encode(x).sample()).mean


def fit_flow_posterior(
    log_joint: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    z_dim: int,
    *,
    transforms: int = 3,
    hidden: tuple[int, ...] = (64, 64),
    bins: int = 8,
    steps: int = 1000,
    k: int = 64,
    lr: float = 3e-3,
    anneal: float = 0.8,
    seed: int = 0,
) -> zuko.flows.Flow:
    """Fit a flow :math:`q(z \\mid x)` to the posterior of any model given by its log joint, by the ELBO.

    .. math::

        \\max_{q} \\; \\frac{1}{n} \\sum_{i=1}^{n} \\mathbb{E}_{q(z \\mid x_i)}
        \\big[\\log p(x_i, z) - \\log q(z \\mid x_i)\\big]

    by Adam on ``k`` reparameterized draws per point and step (the learning rate
    annealed on a cosine schedule, the log joint tempered over the first steps).
    The flow is a zuko neural spline flow on :math:`z` conditioned on :math:`x`,
    inverted so that drawing is one pass; the model is only evaluated, never
    changed.

    Parameters
    ----------
    log_joint : callable
        ``log_joint(x, z)`` gives :math:`\\log p(x, z)`, shape ``(k, n)`` for ``z`` of
        shape ``(k, n, z_dim)`` (e.g. ``Bimodal().log_joint``).
    x : Tensor, shape (n, x_dim)
        The observations whose posteriors are fitted (one flow, amortized over them).
    z_dim : int
        Latent dimension.
    transforms, hidden, bins : int, tuple of int, int
        Spline layers, hidden sizes of their networks, segments per spline.
    steps, k, lr : int, int, float
        Adam steps, draws per point and step, initial learning rate.
    anneal : float
        Fraction of the steps over which the log joint is tempered,
        :math:`\\beta_t \\log p(x, z)` with :math:`\\beta_t` rising linearly from
        0.01 to 1 (Rezende and Mohamed 2015, section 6.1). A flat start lets
        ``q`` spread over every mode before they sharpen; without it the
        mode-seeking ELBO can settle on one of them. 0 turns it off.
    seed : int
        Seeds the initialization and the draws; the caller's random state is left untouched.

    Returns
    -------
    zuko.flows.Flow
        ``flow(x)`` is :math:`q(z \\mid x)`, batch shape ``(n,)``, event shape ``(z_dim,)``.

    References
    ----------
    Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows";
    Durkan et al. (2019), "Neural Spline Flows".
    """
    if not callable(log_joint):
        raise TypeError(f"log_joint: expected a callable log_joint(x, z), got {type(log_joint).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected a tensor of shape (n, x_dim), got {getattr(x, 'shape', type(x).__name__)}")
    check_positive_int(z_dim, "z_dim")
    check_positive_int(transforms, "transforms")
    check_positive_int(steps, "steps")
    check_positive_int(k, "k")
    check_positive_float(lr, "lr")
    if isinstance(anneal, bool) or not isinstance(anneal, int | float) or not 0 <= anneal <= 1:
        raise ValueError(f"anneal: expected a fraction of the steps in [0, 1], got {anneal!r}")
    check_nonnegative_int(seed, "seed")
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        spline = zuko.flows.NSF(
            features=z_dim, context=x.shape[1], transforms=transforms, bins=bins, hidden_features=tuple(hidden)
        )
        flow = zuko.flows.Flow(spline.transform.inv, spline.base).to(x.device, x.dtype)
        optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        # On a CPU, one thread or torch's count, whichever is faster now (vaelib._runtime.threads).
        with compute_threads(x.device, flow, k * x.shape[0]) as timed:
            for step in range(steps):
                with timed():
                    optimizer.zero_grad()
                    z, log_q = flow(x).rsample_and_log_prob((k,))  # (k, n, z_dim), (k, n)
                    beta = min(1.0, 0.01 + 0.99 * step / (anneal * steps)) if anneal > 0 else 1.0
                    loss = -elbo_from_log_weights(beta * log_joint(x, z) - log_q).mean()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
    flow.requires_grad_(False)
    return flow
