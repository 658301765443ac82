"""What a model must offer for vaelib to train, estimate or evaluate it: one small family of protocols.

vaelib's functions take any object with the methods they use, not only a
:class:`~vaelib.models.VAE`: the exact :class:`~vaelib.toy.LinearGaussian`,
the :class:`~vaelib.bimodal.Bimodal` model, or a model of your own written with
``torch.distributions``. Each protocol names one set of those methods; all
shapes follow :func:`vaelib.bounds.log_weights`, with ``x`` of shape
``(batch, *x_shape)`` and ``z`` of shape ``(k, batch, z_dim)``.

=========================  ===============================  ====================================================
protocol                   methods                          used by
=========================  ===============================  ====================================================
:class:`JointModel`        ``prior``, ``log_joint(x, z)``   the gradient estimators (:mod:`vaelib.estimators`,
                                                            :mod:`vaelib.iwae_gradients`): a bound needs the
                                                            joint density, the analytic KL also the prior
:class:`AmortizedModel`    ``encode(x)``,                   the evaluation (:mod:`vaelib.evaluate`): importance
                           ``log_joint(x, z)``              samples from the encoder, weighted by the joint
:class:`EncoderDecoder`    ``prior``, ``encode(x)``,        the rate and the distortion
                           ``decode(z)``                    (:mod:`vaelib.rate_distortion`), which need the
                                                            prior and the likelihood apart
=========================  ===============================  ====================================================

A :class:`~vaelib.models.VAE` is all three. ``prior`` is :math:`p(z)`,
``log_joint(x, z)`` is :math:`\\log p(x, z)` of shape ``(k, batch)``,
``encode(x)`` is :math:`q(z \\mid x)` with batch shape ``(batch,)`` and event
shape ``(z_dim,)`` and ``decode(z)`` is :math:`p(x \\mid z)`, each a
``torch.distributions.Distribution``. The protocols are runtime checkable, so
``isinstance(model, AmortizedModel)`` tells whether a model has the methods
(not their shapes).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor
from torch.distributions import Distribution

__all__ = ["AmortizedModel", "EncoderDecoder", "JointModel"]


@runtime_checkable
class JointModel(Protocol):
    """A prior over z and a joint density: what a bound and its gradient estimators need.

    ``LinearGaussian``, ``Bimodal`` and ``VAE`` are joint models. The ``"analytic_kl"``
    estimator also needs the likelihood :math:`p(x \\mid z)`, as ``decode(z)`` or
    ``likelihood(z)``, returning a distribution.
    """

    @property
    def prior(self) -> Distribution: ...

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor: ...


@runtime_checkable
class AmortizedModel(Protocol):
    """A latent variable model with an amortized posterior: what the evaluation functions need.

    ``encode(x)`` returns :math:`q(z \\mid x)`, a ``torch.distributions.Distribution``
    with batch shape ``(batch,)`` and event shape ``(z_dim,)``; ``log_joint(x, z)``
    returns :math:`\\log p(x, z)` of shape ``(k, batch)`` for ``z`` of shape
    ``(k, batch, z_dim)``. Optional attributes refine the checks: ``x_shape`` (the
    shape of one data point) and ``likelihood`` (``"bernoulli"`` or ``"gaussian"``).
    """

    def encode(self, x: Tensor) -> Distribution: ...

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor: ...


@runtime_checkable
class EncoderDecoder(Protocol):
    """A prior, an encoder and a decoder apart: what the rate and the distortion need, as a ``VAE`` has."""

    @property
    def prior(self) -> Distribution: ...

    def encode(self, x: Tensor) -> Distribution: ...

    def decode(self, z: Tensor) -> Distribution: ...
