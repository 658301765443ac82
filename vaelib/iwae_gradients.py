"""Gradient estimators of the importance weighted bound, as surrogates to differentiate.

With :math:`z_i = g_\\phi(\\epsilon_i, x)`, :math:`\\log w_i = \\log p_\\theta(x, z_i) - \\log q_\\phi(z_i \\mid x)`
and normalized weights :math:`\\tilde w_i = w_i / \\sum_j w_j`, the reparameterized gradient of
:math:`\\mathcal{L}_k = \\log \\frac{1}{k} \\sum_i w_i` splits, for the encoder, into a path term
through :math:`z_i` and a score term through :math:`q_\\phi`'s parameters:

.. math::

    \\nabla_\\phi \\mathcal{L}_k
    = \\sum_i \\tilde w_i \\frac{\\partial \\log w_i}{\\partial z_i} \\frac{\\partial z_i}{\\partial \\phi}
    - \\sum_i \\tilde w_i \\nabla_\\phi \\log q_\\phi(z_i \\mid x) \\big|_{z_i\\ \\text{fixed}} .

``"reparam"``
    both terms (Burda, Grosse and Salakhutdinov 2015, eq. 14).
``"stl"``
    "sticking the landing": the score term is dropped (Roeder, Wu and Duvenaud 2017). Its mean
    is zero at ``k = 1``, so STL is then unbiased, and every draw is zero when ``q`` is the exact
    posterior; for ``k > 1`` the dropped term does not average to zero and STL is biased
    (Tucker et al. 2018, section 3).
``"dreg"``
    doubly reparameterized: a second reparameterization turns the score term into a path term,
    giving :math:`\\sum_i \\tilde w_i^2 \\, \\partial_{z_i} \\log w_i \\, \\partial_\\phi z_i`,
    unbiased for every ``k`` (Tucker, Lawson, Gu and Maddison 2018, eq. 7).

For the decoder every estimator is the usual :math:`\\sum_i \\tilde w_i \\nabla_\\theta \\log w_i`.
The value of every surrogate is the bound estimate itself. The chapter "Tighter bounds and their
gradients" measures their signal-to-noise ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from vaelib._checks import check_choice, check_positive_int
from vaelib.bounds import iwae_from_log_weights
from vaelib.protocols import JointModel

__all__ = ["IWAE_ESTIMATORS", "iwae_gradient_samples", "iwae_surrogate", "stop_gradient"]

IWAE_ESTIMATORS = ("reparam", "stl", "dreg")


def stop_gradient(q: Distribution) -> Distribution:
    """The same Gaussian ``q`` with its parameters detached: ``log_prob`` then sees only its argument.

    Accepts ``Independent(Normal, 1)`` (the VAE's encoder) and ``MultivariateNormal``.
    """
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        base = Normal(q.base_dist.loc.detach(), q.base_dist.scale.detach(), validate_args=False)
        return Independent(base, q.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(q, MultivariateNormal):
        return MultivariateNormal(q.loc.detach(), scale_tril=q.scale_tril.detach(), validate_args=False)
    raise TypeError(
        f"q: expected Independent(Normal) or MultivariateNormal (parameters that can be detached), "
        f"got {type(q).__name__}"
    )


def iwae_surrogate(
    x: Tensor,
    q: Distribution,
    model: JointModel,
    k: int = 5,
    *,
    estimator: str = "reparam",
) -> Tensor:
    """A surrogate whose value is the IWAE bound estimate and whose gradient is the chosen estimator.

    .. math::

        \\hat{\\mathcal{L}}_k(x) = \\log \\frac{1}{k} \\sum_{i=1}^k w_i, \\qquad
        \\nabla_\\phi^{\\mathrm{DReG}} = \\sum_{i=1}^k \\tilde w_i^2
        \\frac{\\partial \\log w_i}{\\partial z_i} \\frac{\\partial z_i}{\\partial \\phi}

    One ``backward()`` of ``-surrogate.mean()`` gives the estimator's gradient for the encoder (the
    parameters of ``q``) and the decoder (those inside ``model.log_joint``).

    Parameters
    ----------
    x : Tensor, shape (batch, x_dim)
    q : Distribution
        Gaussian approximate posterior built from the encoder's parameters, batch shape ``(batch,)``,
        event shape ``(z_dim,)``; ``Independent(Normal, 1)`` or ``MultivariateNormal``.
    model : LinearGaussian or VAE
        Supplies ``log_joint(x, z)``.
    k : int
        Importance samples per data point.
    estimator : {"reparam", "stl", "dreg"}

    Returns
    -------
    Tensor, shape (batch,)
        Equal in value to ``iwae_from_log_weights(log_w)`` for the ``k`` draws, whatever the estimator.

    References
    ----------
    Roeder, Wu and Duvenaud (2017), "Sticking the landing"; Tucker, Lawson, Gu and Maddison (2018),
    "Doubly reparameterized gradient estimators for Monte Carlo objectives", eqs. (5)-(7).
    """
    check_positive_int(k, "k")
    check_choice(estimator, "estimator", IWAE_ESTIMATORS)
    q_stopped = stop_gradient(q) if estimator != "reparam" else q  # checks q's type first
    z = q.rsample((k,))  # (k, batch, z_dim), the path to phi through z
    # With q's parameters stopped, log w depends on phi only through z: the score term is gone.
    log_w = model.log_joint(x, z) - q_stopped.log_prob(z)  # (k, batch)
    if estimator == "dreg" and z.requires_grad:
        # d logsumexp / d log w_i = w~_i, so the plain backward brings w~_i * dlog w_i/dz_i into z_i;
        # the hook multiplies what reaches z_i by one more w~_i (held fixed), making it w~_i^2.
        # The decoder's gradient does not pass through z, so it keeps the single w~_i.
        w_tilde = torch.softmax(log_w.detach(), dim=0).unsqueeze(-1)  # (k, batch, 1)
        z.register_hook(lambda grad: grad * w_tilde)
    return iwae_from_log_weights(log_w)  # (batch,)


def iwae_gradient_samples(
    x: Tensor,
    encode: Callable[[Tensor], Distribution],
    model: JointModel,
    params: list[Tensor],
    *,
    estimator: str,
    n: int,
    k: int = 5,
) -> Tensor:
    """``n`` independent gradient estimates of the summed IWAE bound with respect to ``params``.

    .. math:: g^{(s)} = \\nabla \\sum_{x} \\hat{\\mathcal{L}}_k^{(s)}(x), \\qquad s = 1, \\dots, n

    Parameters
    ----------
    x : Tensor, shape (batch, x_dim)
    encode : callable
        ``encode(x)`` builds ``q`` (``vae.encode``, or a closure over leaf tensors).
    model : LinearGaussian or VAE
    params : list of Tensor
        Tensors with ``requires_grad=True`` (encoder and/or decoder parameters).
    estimator : {"reparam", "stl", "dreg"}
    n : int
        Number of independent estimates.
    k : int
        Importance samples per estimate.

    Returns
    -------
    Tensor, shape (n, total number of parameters)
        One flattened gradient per row; :func:`vaelib.estimators.gradient_statistics` summarizes it.

    References
    ----------
    Rainforth et al. (2018), "Tighter variational bounds are not necessarily better", section 3.
    """
    check_positive_int(n, "n")
    check_positive_int(k, "k")
    check_choice(estimator, "estimator", IWAE_ESTIMATORS)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("params: expected a non-empty list of tensors with requires_grad=True")
    rows = []
    for _ in range(n):
        value = iwae_surrogate(x, encode(x), model, k, estimator=estimator).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)  # (n, n_params)
