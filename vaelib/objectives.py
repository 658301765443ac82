"""What :func:`~vaelib.train.fit` maximizes: the ELBO, the IWAE bound or a bound of your own.

An objective is a function ``(vae, x) -> (batch,)`` returning a differentiable
bound per data point (the :class:`Objective` protocol). :func:`resolve_objective`
turns ``fit``'s ``objective``, ``k``, ``analytic_kl`` and ``estimator``
arguments into one, checking that they fit together.
"""

from __future__ import annotations

import warnings
from typing import Literal, Protocol

from torch import Tensor

from vaelib._checks import OBJECTIVES, check_bool, check_choice, check_positive_int
from vaelib.iwae_gradients import IWAE_ESTIMATORS, iwae_objective
from vaelib.models import VAE

__all__ = [
    "DEFAULT_K",
    "IWAEEstimator",
    "Objective",
    "ObjectiveName",
    "bound",
    "iwae_at",
    "qualified_name",
    "resolve_objective",
]

ObjectiveName = Literal["elbo", "iwae"]
IWAEEstimator = Literal["reparam", "stl", "dreg"]

# Samples per data point when ``k`` is not given.
DEFAULT_K = {"elbo": 1, "iwae": 5}


class Objective(Protocol):
    """A training objective for :func:`~vaelib.train.fit`: a differentiable bound per data point.

    ``objective(vae, x)`` takes the model and a batch ``x`` of shape
    ``(batch, *event_shape)`` (binarized already when ``fit`` binarizes) and
    returns a tensor of shape ``(batch,)`` whose mean ``fit`` maximizes; it
    draws its own samples from the global torch generator, which ``fit`` seeds.
    Example: ``lambda vae, x: vae.iwae(x, k=10) - 0.1 * vae.elbo(x)``.
    """

    def __call__(self, vae: VAE, x: Tensor, /) -> Tensor: ...


def bound(vae: VAE, x: Tensor, objective: ObjectiveName | str, k: int, analytic_kl: bool) -> Tensor:
    """The training objective for a batch, shape (batch,)."""
    if objective == "iwae":
        return vae.iwae(x, k=k)
    return vae.elbo(x, k=k, analytic_kl=analytic_kl)


def iwae_at(k: int) -> Objective:
    """The IWAE bound with ``k`` samples (the ELBO when ``k = 1``) as an objective."""

    def iwae(vae: VAE, x: Tensor) -> Tensor:
        return vae.iwae(x, k=k)

    return iwae


def qualified_name(fn: object) -> str:
    """The name a checkpoint records for a function or callable object."""
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


def resolve_objective(
    objective: ObjectiveName | Objective, k: int | None, analytic_kl: bool, estimator: IWAEEstimator = "reparam"
) -> tuple[Objective, str, int]:
    """The objective as a function ``(vae, x) -> (batch,)``, its name and its k."""
    check_bool(analytic_kl, "analytic_kl")
    check_choice(estimator, "estimator", IWAE_ESTIMATORS)
    if callable(objective):
        if k is not None:
            raise ValueError("k: a callable objective draws its own samples; leave k unset")
        if analytic_kl:
            raise ValueError("analytic_kl: applies to objective='elbo' only")
        if estimator != "reparam":
            raise ValueError("estimator: a callable objective computes its own gradient; leave estimator unset")
        return objective, qualified_name(objective), 1
    check_choice(objective, "objective", OBJECTIVES)
    if analytic_kl and objective != "elbo":
        raise ValueError(f"analytic_kl: the closed-form KL applies to objective='elbo' only, got {objective!r}")
    if k is None:
        k = DEFAULT_K[objective]
    k = check_positive_int(k, "k")
    if objective == "iwae" and k == 1:
        warnings.warn("fit: objective='iwae' with k=1 is the ELBO; use k > 1 for a tighter bound", stacklevel=3)
    name = str(objective)
    if estimator != "reparam":
        # STL and DReG are estimators of the IWAE bound's gradient; at k = 1 that bound is the ELBO.
        if analytic_kl or (objective == "elbo" and k != 1):
            raise ValueError(
                f"estimator: {estimator!r} applies to objective='iwae' (or the ELBO with k=1 and no analytic KL)"
            )
        return iwae_objective(k, estimator=estimator), name, k

    def chosen(vae: VAE, x: Tensor) -> Tensor:
        return bound(vae, x, name, k, analytic_kl)

    return chosen, name, k
